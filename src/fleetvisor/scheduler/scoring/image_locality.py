"""Image locality: prefer hosts that already cache the request's image layers.

Raw score = bytes of the request's layers in the host's cache / bytes of all its
layers (each layer counts 1 when sizes are unknown). Computed over every host once per
distinct layer set from the snapshot's inverted index (layer -> hosts caching it) and
kept, so a batch of a thousand instances of one image pays for it once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping

import numpy as np

from fleetvisor.scheduler.config import SchedulerConfig
from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.fleet import FleetSnapshot, Floats, Hosts
from fleetvisor.scheduler.scoring.base import ScoringModel

KEEP = 256  # distinct layer sets remembered


class ImageLocality(ScoringModel):
    name = "image_locality"
    reads_allocation = False
    depends_on = "image_layers"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self._cache: OrderedDict[tuple[int, frozenset[tuple[str, int]]], Floats] = OrderedDict()

    def applies(self, cycle: CycleState) -> bool:
        return bool(cycle.request.image_layers)

    def shape_key(self, cycle: CycleState) -> Hashable:
        return frozenset(cycle.request.image_layers.items())

    def score(self, cycle: CycleState, hosts: Hosts) -> Floats:
        return self.cached_fraction(cycle.fleet, cycle.request.image_layers)[hosts]

    def cached_fraction(self, fleet: FleetSnapshot, layers: Mapping[str, int]) -> Floats:
        items = frozenset(layers.items())
        key = (id(fleet.layer_index), items)
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        sized = all(size > 0 for _, size in items)
        weights = {digest: (size if sized else 1) for digest, size in items}
        total = float(sum(weights.values()))
        fraction = np.zeros(len(fleet))
        for digest, weight in weights.items():
            holders = fleet.layer_index.get(digest)
            if holders is not None:
                fraction[holders] += weight / total
        fraction.flags.writeable = False
        self._cache[key] = fraction
        if len(self._cache) > KEEP:
            self._cache.popitem(last=False)
        return fraction
