"""Hosts the request itself excludes (e.g. the host an instance migrates away from)."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.filters.base import Filter, mask_of
from fleetvisor.scheduler.fleet import Mask


class ExcludedHostsFilter(Filter):
    name = "excluded"
    order = 20
    static = True

    def cache_key(self, cycle: CycleState) -> Hashable:
        return cycle.request.exclude_hosts

    def admits(self, cycle: CycleState, feasible: Mask) -> Mask | None:
        excluded = cycle.request.exclude_hosts
        if not excluded:
            return None
        index = cycle.fleet.index_of
        hosts = np.array([index[h] for h in excluded if h in index], dtype=np.int64)
        return mask_of(len(cycle.fleet), hosts, value=False)

    def reason(self, cycle: CycleState, host: int) -> str:
        return "excluded by the request"
