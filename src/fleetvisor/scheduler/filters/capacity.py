"""Capacity: free capacity covers the request in every dimension (vcpus, memory, disk, net).

Exact integer comparison over the (dimension × host) free array kept by the snapshot.
"""

from __future__ import annotations

import numpy as np

from fleetvisor.model.resources import DIMENSIONS, UNITS
from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.filters.base import Filter
from fleetvisor.scheduler.fleet import ALL, Hosts, Ints, Mask

LABELS = {"vcpus": "cpu", "memory": "memory", "disk": "disk", "net": "net"}


def describe_shortfall(dimension: str, amount: int) -> str:
    if dimension == "vcpus":
        return f"cpu (short by {amount / 1000:g})"
    return f"{dimension} (short by {amount} {UNITS[dimension]})"


class CapacityFilter(Filter):
    name = "capacity"
    order = 70
    per_host = True

    def admits(self, cycle: CycleState, feasible: Mask) -> Mask | None:
        return self.verdict(cycle, ALL)

    def verdict(self, cycle: CycleState, hosts: Hosts) -> Mask:
        need = cycle.need
        if isinstance(hosts, slice):  # every host: dimension rows are contiguous
            free = cycle.fleet.free
            return np.asarray(
                (free[0] >= need[0])
                & (free[1] >= need[1])
                & (free[2] >= need[2])
                & (free[3] >= need[3])
            )
        return np.asarray((cycle.fleet.free_by_host[hosts] >= need).all(axis=1))

    def reason(self, cycle: CycleState, host: int) -> str:
        free = cycle.fleet.free[:, host]
        short = [
            describe_shortfall(dim, int(need - have))
            for dim, need, have in zip(DIMENSIONS, cycle.need, free, strict=True)
            if need > have
        ]
        return "not enough " + ", ".join(short)

    def categories(self, cycle: CycleState, rejected: Ints) -> list[tuple[str, Ints]]:
        short = cycle.fleet.free[:, rejected] < cycle.need[:, None]
        first = short.argmax(axis=0)  # the first dimension each host is short of
        return [
            (f"not enough {LABELS[dim]}", rejected[first == k])
            for k, dim in enumerate(DIMENSIONS)
            if (first == k).any()
        ]
