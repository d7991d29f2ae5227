"""Resource fit: bin-pack (fewest hosts in use) or spread (even utilization).

utilization after = mean over the four dimensions of (allocated + request) / capacity.
The snapshot keeps the allocated part current; the request's part depends only on the
request's shape and is kept per shape.

- bin-pack: a host already in use always ranks above an empty one (raw 0.5..1, the
  fuller after placement the better: best fit); among empty hosts the largest ranks
  first (raw 0..0.5 by capacity relative to the largest host), since it will hold the
  most before another host must be opened.
- spread: 1 − utilization after, so the emptiest host wins.
"""

from __future__ import annotations

import numpy as np

from fleetvisor.scheduler.config import FitStrategy, SchedulerConfig
from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.fleet import Floats, Hosts
from fleetvisor.scheduler.scoring.base import ScoringModel, ShapeCache


class ResourceFit(ScoringModel):
    name = "resource_fit"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self._terms = ShapeCache()

    def score(self, cycle: CycleState, hosts: Hosts) -> Floats:
        fleet = cycle.fleet
        need = cycle.need
        request = self._terms.get(
            fleet.inverse_capacity,
            cycle.need_key,
            lambda: (need / need.size) @ fleet.inverse_capacity,
        )
        after = request[hosts] + fleet.utilization[hosts]
        if self.config.fit_strategy == FitStrategy.SPREAD:
            np.subtract(1.0, after, out=after)
            return np.maximum(after, 0.0, out=after)
        # in_use × (0.5 + 0.5 u) + (1 − in_use) × 0.5 share; u ≤ 1 on feasible hosts
        half_share = 0.5 * fleet.capacity_share[hosts]
        after *= 0.5
        after += 0.5
        after -= half_share
        after *= fleet.in_use[hosts]
        after += half_share
        return np.minimum(after, 1.0, out=after)
