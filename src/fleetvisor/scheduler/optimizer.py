"""Exact batch placement: CP-SAT over the same capacity and group rules, heuristic as backstop.

    heuristic (place_batch on a copy of the snapshot) ─ hint ─> CP-SAT (time limit)
        OPTIMAL / FEASIBLE and no worse than the heuristic: take CP-SAT's assignment
        otherwise (timeout without a solution, solver error): take the heuristic's
    the chosen assignment is reserved in the engine's snapshot, like place_batch

Objectives: MIN_HOSTS (fewest hosts in use after the batch: consolidation) or
MAX_SCORE (the sum of the engine's weighted scores, computed once against the
snapshot before the batch). On fleets larger than `max_hosts` the model sees the hosts
already in use, the heuristic's hosts, and enough other hosts to reach `max_hosts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from fleetvisor.scheduler.batch import BatchPlacement, place_batch
from fleetvisor.scheduler.cpsat import AssignmentModel, Item
from fleetvisor.scheduler.cycle import prepare
from fleetvisor.scheduler.engine import PlacementEngine
from fleetvisor.scheduler.errors import PlacementFailed
from fleetvisor.scheduler.fleet import FleetSnapshot, Mask
from fleetvisor.scheduler.snapshot import PlacementDecision, PlacementRequest

SCORE_SCALE = 10  # engine scores (0..100) to integers with one decimal


class Objective(StrEnum):
    MIN_HOSTS = "min_hosts"
    MAX_SCORE = "max_score"


@dataclass(frozen=True, slots=True)
class OptimizedBatch:
    placement: BatchPlacement
    status: str  # CP-SAT's status, or "HEURISTIC" when the heuristic's answer was kept
    objective: Objective
    hosts_used: int  # hosts holding any allocation after the batch
    heuristic_hosts_used: int | None  # the same for the heuristic (None: it failed)
    solver_wall_time_s: float
    bound: float  # CP-SAT's best bound on the objective (a proof of how far optimal is)


def optimize_batch(
    engine: PlacementEngine,
    requests: Sequence[PlacementRequest],
    *,
    objective: Objective = Objective.MIN_HOSTS,
    time_limit_s: float = 10.0,
    workers: int = 1,
    max_hosts: int = 400,
    seed: int = 0,
) -> OptimizedBatch:
    """Place every request (or none) with CP-SAT, hinted by and falling back to the heuristic."""
    fleet = engine.fleet
    cycles = [prepare(fleet, r) for r in requests]
    trial = PlacementEngine(fleet.copy(), engine.config, engine.filters, engine.models)
    heuristic: list[int] | None
    heuristic_failure: PlacementFailed | None = None
    try:
        done = place_batch(trial, requests)
        heuristic = [fleet.index_of[d.host.id] for d in done.decisions]
    except PlacementFailed as failure:
        heuristic, heuristic_failure = None, failure
    universe = _universe(fleet, heuristic, max_hosts)
    items = []
    for cycle in cycles:
        allowed = engine.feasible(cycle, group_rules=False) & universe
        items.append(Item(cycle.need, cycle.request.groups, np.flatnonzero(allowed)))
    fixed_used = fleet.used()
    model = AssignmentModel(fleet, items, fleet.free, fleet.groups, fixed_used)
    if objective == Objective.MIN_HOSTS:
        model.minimize(model.hosts_used_expression())
    else:
        model.maximize_scores(
            [
                dict(
                    zip(
                        (int(h) for h in item.candidates),
                        (int(round(s * SCORE_SCALE)) for s in engine.score(cycle, item.candidates)),
                        strict=True,
                    )
                )
                for cycle, item in zip(cycles, items, strict=True)
            ]
        )
    if heuristic is not None and all(
        h in item.candidates for h, item in zip(heuristic, items, strict=True)
    ):
        model.hint(heuristic)
    solution = model.solve(time_limit_s, workers, seed)
    heuristic_used = _hosts_used_after(fleet, requests, heuristic)
    chosen, status = solution.hosts, solution.status
    if (
        chosen is not None
        and objective == Objective.MIN_HOSTS
        and heuristic is not None
        and (_hosts_used_after(fleet, requests, list(chosen)) or 0) > (heuristic_used or 0)
    ):
        chosen, status = None, "HEURISTIC"
    if chosen is None:
        if heuristic is None:
            assert heuristic_failure is not None
            if solution.status == "INFEASIBLE":
                raise PlacementFailed(
                    "no assignment of the batch satisfies capacity and the hard group "
                    f"constraints (CP-SAT proved it); the heuristic says: "
                    f"{heuristic_failure.detail}",
                    constraint=heuristic_failure.constraint,
                    where=heuristic_failure.where,
                    explanation=heuristic_failure.explanation,
                )
            raise heuristic_failure
        chosen, status = tuple(heuristic), "HEURISTIC"
    placement = _commit(engine, requests, chosen)
    return OptimizedBatch(
        placement=placement,
        status=status,
        objective=objective,
        hosts_used=int(fleet.used().sum()),
        heuristic_hosts_used=heuristic_used,
        solver_wall_time_s=solution.wall_time_s,
        bound=solution.bound,
    )


def _universe(fleet: FleetSnapshot, heuristic: list[int] | None, max_hosts: int) -> Mask:
    if len(fleet) <= max_hosts:
        return np.ones(len(fleet), dtype=bool)
    universe = fleet.used().copy()
    if heuristic:
        universe[heuristic] = True
    spare = max_hosts - int(universe.sum())
    if spare > 0:
        others = np.flatnonzero(~universe & fleet.ready())[:spare]
        universe[others] = True
    return universe


def _hosts_used_after(
    fleet: FleetSnapshot, requests: Sequence[PlacementRequest], hosts: list[int] | None
) -> int | None:
    if hosts is None:
        return None
    used = fleet.used().copy()
    for request, host in zip(requests, hosts, strict=True):
        if any(request.resources.as_tuple()):
            used[host] = True
    return int(used.sum())


def _commit(
    engine: PlacementEngine, requests: Sequence[PlacementRequest], hosts: Sequence[int]
) -> BatchPlacement:
    fleet = engine.fleet
    decisions = []
    for request, host in zip(requests, hosts, strict=True):
        fleet.assign(host, np.array(request.resources.as_tuple()), request.groups)
        decisions.append(PlacementDecision(host=fleet.hosts[host], rejected={}, request=request))
    return BatchPlacement(tuple(decisions))
