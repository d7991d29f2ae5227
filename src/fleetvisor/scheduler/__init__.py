"""Placement: pure functions and classes over a snapshot of hosts. No database, no HTTP.

FleetSnapshot (numpy columns over hosts + per-group member indexes)
  └─ PlacementEngine: PreFilter → filters → scoring models → normalize + weights
                      → reserve in the snapshot; `explain` tells why
       ├─ place_batch: all or nothing; hard affinity groups via cross_cluster
       ├─ optimize_batch: CP-SAT, hinted by and falling back to the heuristic
       └─ plan_rebalance: CP-SAT target, sequenced into valid steps, move budget
first_fit: the baseline (and the original API)
"""

from fleetvisor.scheduler.batch import BatchPlacement, place_batch
from fleetvisor.scheduler.config import FitStrategy, ForecastConfig, SchedulerConfig
from fleetvisor.scheduler.engine import PlacementEngine
from fleetvisor.scheduler.errors import PlacementFailed
from fleetvisor.scheduler.explain import Explanation, FilterOutcome, ScoreRow
from fleetvisor.scheduler.first_fit import first_fit
from fleetvisor.scheduler.fleet import FleetSnapshot
from fleetvisor.scheduler.groups import GroupMember, PlacementGroupSpec
from fleetvisor.scheduler.invariants import Violation, violations
from fleetvisor.scheduler.optimizer import Objective, OptimizedBatch, optimize_batch
from fleetvisor.scheduler.rebalance import Move, PlacedInstance, RebalancePlan, plan_rebalance
from fleetvisor.scheduler.scoring import known_models
from fleetvisor.scheduler.snapshot import (
    HostCandidate,
    InstanceUsage,
    PlacementDecision,
    PlacementRequest,
)
from fleetvisor.scheduler.telemetry import neighbour_pressure, utilization_from_metrics

__all__ = [
    "BatchPlacement",
    "Explanation",
    "FilterOutcome",
    "FitStrategy",
    "FleetSnapshot",
    "ForecastConfig",
    "GroupMember",
    "HostCandidate",
    "InstanceUsage",
    "Move",
    "Objective",
    "OptimizedBatch",
    "PlacedInstance",
    "PlacementDecision",
    "PlacementEngine",
    "PlacementFailed",
    "PlacementGroupSpec",
    "PlacementRequest",
    "RebalancePlan",
    "SchedulerConfig",
    "ScoreRow",
    "Violation",
    "first_fit",
    "known_models",
    "neighbour_pressure",
    "optimize_batch",
    "place_batch",
    "plan_rebalance",
    "utilization_from_metrics",
    "violations",
]
