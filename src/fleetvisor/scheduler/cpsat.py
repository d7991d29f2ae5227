"""The exact assignment model (OR-Tools CP-SAT) shared by batch placement and rebalancing.

    x[i, h] ∈ {0, 1}     item i goes to candidate host h; Σ_h x[i, h] = 1
    capacity             Σ_i need[i, d] · x[i, h] ≤ free[d, h] · y[h]   (every dimension)
    used                 y[h] = 1 if anything new lands on h (hosts already used: constant)
    anti-affinity        Σ_{i ∈ G, h ∈ D} x[i, h] ≤ max − members already in D
    affinity             one domain z_D for the group (or the one it already uses)
    affinity with max    per-domain max; new domains only as many as the members need

Identical empty hosts (same capacity, domain and candidate items) are interchangeable:
`y` is ordered among them, which removes the symmetric solutions the solver would
otherwise enumerate. Soft groups are not constraints here; they enter through the
score objective.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ortools.sat.python import cp_model

from fleetvisor.model.entities import PlacementScope
from fleetvisor.scheduler.fleet import FleetSnapshot, Ints, Mask
from fleetvisor.scheduler.groups import GroupState


@dataclass(frozen=True, slots=True)
class Item:
    """One instance to assign: its resources, groups and allowed hosts."""

    need: Ints
    groups: tuple[str, ...]
    candidates: Ints  # host indexes
    current: int = -1  # its host now (rebalancing), -1 when new


@dataclass(frozen=True, slots=True)
class Solution:
    status: str  # "OPTIMAL", "FEASIBLE", "INFEASIBLE", "UNKNOWN", "MODEL_INVALID"
    hosts: tuple[int, ...] | None  # host index per item, None without a solution
    objective: float
    bound: float
    wall_time_s: float


class AssignmentModel:
    def __init__(
        self,
        fleet: FleetSnapshot,
        items: Sequence[Item],
        free: Ints,
        groups: Mapping[str, GroupState],
        fixed_used: Mask,
    ) -> None:
        """`free` and `groups` describe the fleet without the items; `fixed_used` marks
        hosts that stay used whatever the items do."""
        self.fleet = fleet
        self.items = items
        self.model = cp_model.CpModel()
        self.x: list[dict[int, cp_model.IntVar]] = []
        on_host: dict[int, list[tuple[int, cp_model.IntVar]]] = defaultdict(list)
        for i, item in enumerate(items):
            choices = {int(h): self.model.new_bool_var(f"x{i}_{h}") for h in item.candidates}
            self.x.append(choices)
            self.model.add_exactly_one(choices.values())
            for h, var in choices.items():
                on_host[h].append((i, var))
        self.on_host = on_host
        self.y: dict[int, cp_model.IntVar] = {}
        for h, assigned in on_host.items():
            used: cp_model.IntVar | int = 1
            if not fixed_used[h]:
                y = self.model.new_bool_var(f"y{h}")
                self.y[h] = y
                used = y
                for _, var in assigned:
                    self.model.add_implication(var, y)
            for d in range(free.shape[0]):
                coeffs = [int(items[i].need[d]) for i, _ in assigned]
                if sum(coeffs) == 0 or (sum(coeffs) <= free[d, h] and isinstance(used, int)):
                    continue  # never binding
                self.model.add(
                    sum(c * var for c, (_, var) in zip(coeffs, assigned, strict=True))
                    <= max(int(free[d, h]), 0) * used
                )
        self._group_constraints(groups)
        self._break_symmetry(free, groups, fixed_used)

    def _group_constraints(self, groups: Mapping[str, GroupState]) -> None:
        members: dict[str, list[int]] = defaultdict(list)
        for i, item in enumerate(self.items):
            for name in item.groups:
                if groups[name].spec.hard:
                    members[name].append(i)
        for name, indexes in members.items():
            state = groups[name]
            spec = state.spec
            domains = self.fleet.domains(spec.scope)
            per_domain: dict[int, list[cp_model.IntVar]] = defaultdict(list)
            for i in indexes:
                for h, var in self.x[i].items():
                    per_domain[int(domains[h])].append(var)
            counts = state.in_scope()
            limit = spec.limit
            if limit is not None:
                for domain, variables in per_domain.items():
                    room = limit - counts.get(domain, 0)
                    if room < len(variables):
                        self.model.add(sum(variables) <= max(room, 0))
            if spec.anti:
                continue
            if limit is None:
                homes = {d for d, c in counts.items() if c > 0}
                if homes:
                    for domain, variables in per_domain.items():
                        if domain not in homes:
                            for var in variables:
                                self.model.add(var == 0)
                    continue
                chosen = {d: self.model.new_bool_var(f"z_{name}_{d}") for d in per_domain}
                self.model.add_exactly_one(chosen.values())
                for domain, variables in per_domain.items():
                    for var in variables:
                        self.model.add_implication(var, chosen[domain])
                continue
            room_in_homes = sum(max(0, limit - c) for c in counts.values())
            new_needed = max(0, math.ceil((len(indexes) - room_in_homes) / limit))
            opened = []
            for domain, variables in per_domain.items():
                if counts.get(domain, 0) == 0:
                    flag = self.model.new_bool_var(f"u_{name}_{domain}")
                    opened.append(flag)
                    for var in variables:
                        self.model.add_implication(var, flag)
            if opened:
                self.model.add(sum(opened) <= new_needed)

    def _break_symmetry(
        self, free: Ints, groups: Mapping[str, GroupState], fixed_used: Mask
    ) -> None:
        fleet = self.fleet
        with_members = {h for state in groups.values() for h in state.counts[PlacementScope.HOST]}
        # A host some item is on now is not interchangeable: staying there is no move.
        current = {item.current for item in self.items}
        classes: dict[tuple[object, ...], list[int]] = defaultdict(list)
        for h, assigned in self.on_host.items():
            empty = bool((fleet.free[:, h] == fleet.capacity[:, h]).all())
            if fixed_used[h] or not empty or h in with_members or h in current:
                continue
            key = (
                tuple(int(v) for v in free[:, h]),
                int(fleet.cluster_of[h]),
                int(fleet.site_of[h]),
                tuple(i for i, _ in assigned),
            )
            classes[key].append(h)
        for hosts in classes.values():
            hosts.sort()
            for a, b in zip(hosts, hosts[1:], strict=False):
                self.model.add(self.y[a] >= self.y[b])

    # -- objectives -------------------------------------------------------------------

    def hosts_used_expression(self) -> cp_model.LinearExpr:
        """New hosts put in use (hosts used already are constants, left out)."""
        return cp_model.LinearExpr.sum(list(self.y.values()))

    def moves_expression(self) -> cp_model.LinearExpr:
        """Items not on their current host (an item whose host is not a candidate: 1)."""
        terms: list[cp_model.LinearExprT] = []
        for i, item in enumerate(self.items):
            stay = self.x[i].get(item.current)
            terms.append(1 if stay is None else 1 - stay)
        return cp_model.LinearExpr.sum(terms)

    def minimize(self, expression: cp_model.LinearExpr) -> None:
        self.model.minimize(expression)

    def maximize_scores(self, scores: Sequence[Mapping[int, int]]) -> None:
        self.model.maximize(
            sum(
                scores[i].get(h, 0) * var
                for i, choices in enumerate(self.x)
                for h, var in choices.items()
            )
        )

    def hint(self, hosts: Sequence[int]) -> None:
        """Start from a known assignment (the heuristic's): CP-SAT repairs or improves it."""
        self.model.clear_hints()
        used = set(hosts)
        for i, choices in enumerate(self.x):
            for h, var in choices.items():
                self.model.add_hint(var, 1 if hosts[i] == h else 0)
        for h, y in self.y.items():
            self.model.add_hint(y, 1 if h in used else 0)

    def solve(self, time_limit_s: float, workers: int = 1, seed: int = 0) -> Solution:
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = time_limit_s
        solver.parameters.num_workers = workers
        solver.parameters.random_seed = seed
        started = time.perf_counter()
        status = solver.solve(self.model)
        wall = time.perf_counter() - started
        name = solver.status_name(status)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return Solution(name, None, float("nan"), float("nan"), wall)
        hosts = tuple(
            next(h for h, var in choices.items() if solver.boolean_value(var)) for choices in self.x
        )
        return Solution(name, hosts, solver.objective_value, solver.best_objective_bound, wall)
