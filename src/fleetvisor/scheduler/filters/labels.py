"""Labels and traits: the host must carry every required label (k=v) and every trait.

Traits are the host's driver capabilities and CPU features (`HostCandidate.traits`).
Both are looked up in inverted indexes built with the snapshot, so the cost is the
size of the matching host lists, not a scan of every host's labels.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.filters.base import Filter
from fleetvisor.scheduler.fleet import Mask


class LabelsFilter(Filter):
    name = "labels"
    order = 50
    static = True

    def cache_key(self, cycle: CycleState) -> Hashable:
        request = cycle.request
        return frozenset(request.required_labels.items()), request.required_traits

    def admits(self, cycle: CycleState, feasible: Mask) -> Mask | None:
        request = cycle.request
        if not request.required_labels and not request.required_traits:
            return None
        fleet = cycle.fleet
        empty = np.zeros(0, dtype=np.int64)
        count = np.zeros(len(fleet), dtype=np.int32)
        for item in request.required_labels.items():
            count[fleet.label_index.get(item, empty)] += 1
        for trait in request.required_traits:
            count[fleet.trait_index.get(trait, empty)] += 1
        return np.asarray(count == len(request.required_labels) + len(request.required_traits))

    def reason(self, cycle: CycleState, host: int) -> str:
        candidate = cycle.fleet.hosts[host]
        missing = [
            f"label {key}={value}"
            for key, value in sorted(cycle.request.required_labels.items())
            if candidate.labels.get(key) != value
        ]
        missing += [
            f"trait {trait}" for trait in sorted(cycle.request.required_traits - candidate.traits)
        ]
        return "lacks " + ", ".join(missing)

    def summary(self, cycle: CycleState) -> str:
        wanted = [f"{k}={v}" for k, v in sorted(cycle.request.required_labels.items())]
        wanted += sorted(cycle.request.required_traits)
        return "lacks a required label or trait (" + ", ".join(wanted) + ")"
