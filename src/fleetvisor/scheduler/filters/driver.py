"""Driver kind: a request for `qemu` goes only to hosts whose agent runs the qemu driver."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.filters.base import Filter
from fleetvisor.scheduler.fleet import Mask


class DriverFilter(Filter):
    name = "driver"
    order = 30
    static = True

    def cache_key(self, cycle: CycleState) -> Hashable:
        return cycle.request.driver

    def admits(self, cycle: CycleState, feasible: Mask) -> Mask | None:
        driver = cycle.request.driver
        if not driver:
            return None
        code = cycle.fleet.drivers.codes.get(driver, -1)
        return np.asarray(cycle.fleet.driver_code == code)

    def reason(self, cycle: CycleState, host: int) -> str:
        return f"runs driver {cycle.fleet.hosts[host].driver}, not {cycle.request.driver}"

    def summary(self, cycle: CycleState) -> str:
        return f"does not run driver {cycle.request.driver}"
