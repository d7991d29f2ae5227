"""Pinned domain: batch placement keeps an affinity group's members in its chosen domain."""

from __future__ import annotations

from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.filters.base import Filter
from fleetvisor.scheduler.fleet import Mask


class PinnedFilter(Filter):
    name = "pinned"
    order = 5  # first: outside the chosen domain is the reason that matters

    def admits(self, cycle: CycleState, feasible: Mask) -> Mask | None:
        return cycle.pinned

    def reason(self, cycle: CycleState, host: int) -> str:
        return cycle.pin_reason or "outside the domain the batch chose for this instance"

    def summary(self, cycle: CycleState) -> str:
        return self.reason(cycle, -1)
