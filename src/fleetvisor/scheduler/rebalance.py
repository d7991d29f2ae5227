"""Rebalancing: a move plan that is valid at every step and within a move budget.

    target      CP-SAT over the movable instances (same capacity and group model as
                batch placement) with Σ moved ≤ max_moves; objective: fewest hosts
                in use (ties: fewest moves) or the highest total score. Hinted by a
                greedy drain (empty the emptiest host into the others, step by step),
                which is also the fallback.
    sequence    execute target moves one at a time, each only when the state after it
                keeps every invariant (capacity, hard groups). When every remaining
                move waits on another (a swap), park one instance on a third host if
                the budget allows; otherwise drop the rest.

The executed prefix is always valid, so a plan is safe to stop at any step. Hard
plain-affinity groups move within their domain only (moving one member elsewhere
would split the group for a step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fleetvisor.errors import InvalidInput
from fleetvisor.model.resources import Resources
from fleetvisor.scheduler.config import SchedulerConfig
from fleetvisor.scheduler.cpsat import AssignmentModel, Item
from fleetvisor.scheduler.cycle import prepare
from fleetvisor.scheduler.engine import PlacementEngine
from fleetvisor.scheduler.fleet import FleetSnapshot, Ints, vector
from fleetvisor.scheduler.invariants import move_violation
from fleetvisor.scheduler.optimizer import SCORE_SCALE, Objective
from fleetvisor.scheduler.snapshot import PlacementRequest


@dataclass(frozen=True, slots=True)
class PlacedInstance:
    """An instance as it runs now. `request` says what a new host must offer (driver,
    labels, traits); None means the driver of the host it is on."""

    id: str
    host_id: str
    resources: Resources
    groups: tuple[str, ...] = ()
    name: str = ""
    request: PlacementRequest | None = None
    movable: bool = True


@dataclass(frozen=True, slots=True)
class Move:
    instance: str  # instance id
    name: str
    source: str  # host id
    target: str  # host id
    resources: Resources


@dataclass(frozen=True, slots=True)
class RebalancePlan:
    moves: tuple[Move, ...]  # execute in order; every prefix is a valid state
    max_moves: int
    hosts_used_before: int
    hosts_used_after: int
    status: str  # CP-SAT status of the target, or "HEURISTIC"
    target_moves: int  # moves in the target assignment
    parked: int  # extra moves that broke a cycle of waiting moves
    dropped: int  # target moves left out (no valid order within the budget)


@dataclass(slots=True)
class _Movable:
    instance: PlacedInstance
    need: Ints
    current: int
    candidates: Ints


def plan_rebalance(
    fleet: FleetSnapshot,
    instances: Sequence[PlacedInstance],
    *,
    max_moves: int,
    objective: Objective = Objective.MIN_HOSTS,
    time_limit_s: float = 5.0,
    workers: int = 1,
    seed: int = 0,
    config: SchedulerConfig | None = None,
) -> RebalancePlan:
    """Plan moves of `instances` (their allocation is part of `fleet`). Pure: `fleet` is
    not changed."""
    if max_moves < 0:
        raise InvalidInput("max moves must be >= 0")
    base = fleet.copy()  # the fleet without the movable instances
    movable = _movables(fleet, base, instances, config)
    before = int(fleet.used().sum())
    if not movable or max_moves == 0:
        return RebalancePlan((), max_moves, before, before, "NOTHING", 0, 0, 0)
    current = [m.current for m in movable]
    greedy = _greedy_drain(fleet, movable, max_moves)
    target, status = _solve(
        fleet, base, movable, max_moves, objective, time_limit_s, workers, seed, greedy, config
    )
    if target is None:
        target, status = greedy, "HEURISTIC"
    work = fleet.copy()
    moves, parked, dropped = _sequence(work, movable, current, target, max_moves)
    after = int(work.used().sum())
    if objective == Objective.MIN_HOSTS and after >= before:
        moves, after, status = [], before, f"{status}, NO_GAIN"  # moving would free nothing
    return RebalancePlan(
        moves=tuple(moves),
        max_moves=max_moves,
        hosts_used_before=before,
        hosts_used_after=after,
        status=status,
        target_moves=sum(t != c for t, c in zip(target, current, strict=True)),
        parked=parked,
        dropped=dropped,
    )


def _movables(
    fleet: FleetSnapshot,
    base: FleetSnapshot,
    instances: Sequence[PlacedInstance],
    config: SchedulerConfig | None,
) -> list[_Movable]:
    found = []
    for inst in instances:
        if not inst.movable:
            continue
        host = fleet.index_of.get(inst.host_id)
        if host is None:
            raise InvalidInput(f"instance {inst.name or inst.id} is on a host the snapshot lacks")
        need = vector(inst.resources)
        base.unassign(host, need, inst.groups)
        found.append(_Movable(inst, need, host, np.zeros(0, dtype=np.int64)))
    engine = PlacementEngine(base, config, models=[])
    for m in found:
        request = m.instance.request or PlacementRequest(
            m.instance.resources, driver=fleet.hosts[m.current].driver, groups=m.instance.groups
        )
        allowed = engine.feasible(prepare(base, request), group_rules=False)
        for name in m.instance.groups:
            spec = base.groups[name].spec
            if spec.hard and not spec.anti and spec.limit is None:
                home = fleet.domain_of(spec.scope, m.current)
                allowed &= fleet.domains(spec.scope) == home
        allowed[m.current] = True
        m.candidates = np.flatnonzero(allowed)
    return found


def _solve(
    fleet: FleetSnapshot,
    base: FleetSnapshot,
    movable: list[_Movable],
    max_moves: int,
    objective: Objective,
    time_limit_s: float,
    workers: int,
    seed: int,
    hint: list[int],
    config: SchedulerConfig | None,
) -> tuple[list[int] | None, str]:
    items = [Item(m.need, m.instance.groups, m.candidates, m.current) for m in movable]
    model = AssignmentModel(base, items, base.free, base.groups, base.used())
    moves = model.moves_expression()
    model.model.add(moves <= max_moves)
    if objective == Objective.MIN_HOSTS:
        model.minimize((len(items) + 1) * model.hosts_used_expression() + moves)
    else:
        engine = PlacementEngine(base, config)
        scores = []
        for m in movable:
            request = m.instance.request or PlacementRequest(
                m.instance.resources, groups=m.instance.groups
            )
            totals = engine.score(prepare(base, request), m.candidates)
            scores.append(
                {
                    int(h): int(round(s * SCORE_SCALE))
                    for h, s in zip(m.candidates, totals, strict=True)
                }
            )
        model.maximize_scores(scores)
    model.hint(hint)
    solution = model.solve(time_limit_s, workers, seed)
    if solution.hosts is None:
        return None, solution.status
    return list(solution.hosts), solution.status


def _greedy_drain(fleet: FleetSnapshot, movable: list[_Movable], max_moves: int) -> list[int]:
    """Empty the least-loaded hosts into the others (fullest first), every step valid."""
    work = fleet.copy()
    location = [m.current for m in movable]
    on_host: dict[int, list[int]] = {}
    for k, m in enumerate(movable):
        on_host.setdefault(m.current, []).append(k)
    fixed = work.allocated.copy()
    for m in movable:
        fixed[:, m.current] -= m.need
    load = (work.allocated / np.maximum(work.capacity, 1)).mean(axis=0)
    budget = max_moves
    drained: set[int] = set()
    for host in sorted(on_host, key=lambda h: (load[h], h)):
        if fixed[:, host].any() or len(on_host[host]) > budget:
            continue  # something unmovable stays: emptying it would not free the host
        done: list[tuple[int, int]] = []
        used = work.used()
        for k in sorted(on_host[host], key=lambda k: -int(movable[k].need.sum())):
            m = movable[k]
            targets = [
                int(h)
                for h in m.candidates
                if h != host
                and h not in drained
                and used[h]
                and move_violation(work, host, int(h), m.need, m.instance.groups) is None
            ]
            if not targets:
                break
            best = max(targets, key=lambda h: (load[h], -h))
            work.unassign(host, m.need, m.instance.groups)
            work.assign(best, m.need, m.instance.groups)
            done.append((k, best))
        if len(done) == len(on_host[host]):
            for k, target in done:
                location[k] = target
            budget -= len(done)
            drained.add(host)
            load = (work.allocated / np.maximum(work.capacity, 1)).mean(axis=0)
        else:
            for k, target in reversed(done):
                work.unassign(target, movable[k].need, movable[k].instance.groups)
                work.assign(host, movable[k].need, movable[k].instance.groups)
    return location


def _sequence(
    work: FleetSnapshot,
    movable: list[_Movable],
    current: list[int],
    target: list[int],
    max_moves: int,
) -> tuple[list[Move], int, int]:
    """Order the target's moves so each step is valid; park to break cycles; drop the rest."""
    location = list(current)
    pending = {k: t for k, t in enumerate(target) if t != current[k]}
    moves: list[Move] = []
    parked = 0

    def step(k: int, host: int) -> None:
        m = movable[k]
        work.unassign(location[k], m.need, m.instance.groups)
        work.assign(host, m.need, m.instance.groups)
        moves.append(
            Move(
                instance=m.instance.id,
                name=m.instance.name,
                source=work.hosts[location[k]].id,
                target=work.hosts[host].id,
                resources=m.instance.resources,
            )
        )
        location[k] = host

    def valid(k: int, host: int) -> bool:
        m = movable[k]
        return move_violation(work, location[k], host, m.need, m.instance.groups) is None

    while pending:
        ready = [k for k in sorted(pending) if valid(k, pending[k])]
        for k in ready:
            if valid(k, pending[k]):  # an earlier move of this round may have changed it
                step(k, pending.pop(k))
        if len(moves) >= max_moves or not pending:
            break
        if ready:
            continue
        if len(moves) + len(pending) + 1 > max_moves:
            break
        destinations = set(pending.values())
        spot = next(
            (
                (k, int(h))
                for k in sorted(pending)
                for h in movable[k].candidates
                if h != location[k] and h not in destinations and valid(k, int(h))
            ),
            None,
        )
        if spot is None:
            break
        step(*spot)
        parked += 1
    return moves, parked, len(pending)
