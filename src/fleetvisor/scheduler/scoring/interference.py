"""Interference: avoid noisy neighbours that press on what the new instance needs.

The snapshot sums the co-located instances' recent usage per metric (cpu, memory,
net) as a fraction of the host's capacity, counting neighbours at their limit twice
(`telemetry.neighbour_pressure`). The request's sensitivity to each metric is its
share of the host in that metric, normalized to sum to 1: a network-heavy instance
cares about network-heavy neighbours, a CPU-bound one about CPU pressure.

    contention = Σ_m share_m × pressure_m / Σ_m share_m,   score = 1 − min(1, contention)

with share_m = request_m / capacity_m. Pressure is as of the snapshot (placements
in this engine have no usage yet), so the score depends only on the request's shape
and is computed once per shape.
"""

from __future__ import annotations

import numpy as np

from fleetvisor.scheduler.config import SchedulerConfig
from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.fleet import FleetSnapshot, Floats, Hosts
from fleetvisor.scheduler.scoring.base import ScoringModel, ShapeCache
from fleetvisor.scheduler.telemetry import METRIC_DIMENSION_INDEX


class Interference(ScoringModel):
    name = "interference"
    reads_allocation = False  # neighbours' usage is as of the snapshot

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self._scores = ShapeCache()

    def applies(self, cycle: CycleState) -> bool:
        return cycle.fleet.has_pressure and any(cycle.need_key[i] for i in METRIC_DIMENSION_INDEX)

    def score(self, cycle: CycleState, hosts: Hosts) -> Floats:
        fleet = cycle.fleet
        scores = self._scores.get(
            fleet.pressure_per_unit, cycle.need_key, lambda: _score(fleet, cycle.metric_need)
        )
        return scores[hosts]


def _score(fleet: FleetSnapshot, need: Floats) -> Floats:
    contention = need @ fleet.pressure_per_unit
    share = need @ fleet.metric_inverse_capacity
    share += 1e-300  # hosts with no capacity in these metrics: contention 0
    contention /= share
    np.minimum(contention, 1.0, out=contention)
    return np.subtract(1.0, contention, out=contention)
