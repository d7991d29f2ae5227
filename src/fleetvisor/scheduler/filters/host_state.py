"""Host state: only `ready` hosts take new instances (not booting, draining, down...)."""

from __future__ import annotations

from collections.abc import Hashable

from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.filters.base import Filter
from fleetvisor.scheduler.fleet import Mask


class HostStateFilter(Filter):
    name = "host_state"
    order = 10
    static = True

    def cache_key(self, cycle: CycleState) -> Hashable:
        return ()

    def admits(self, cycle: CycleState, feasible: Mask) -> Mask | None:
        return cycle.fleet.ready()

    def reason(self, cycle: CycleState, host: int) -> str:
        return f"host is {cycle.fleet.hosts[host].state}, not ready"

    def summary(self, cycle: CycleState) -> str:
        return "host is not ready"
