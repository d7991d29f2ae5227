"""Choosing the domain of a hard affinity group across clusters (the placement seed's algorithm).

"Automatic placement of clients in a distributed computer system satisfying
constraints": given the clients (batch members) of an affinity group,

    1. list the domains (clusters, or sites / hosts at those scopes) compatible with
       the request: each member fits some host there by itself, and the members'
       total fits the domain's free capacity;
    2. remove every domain that cannot satisfy the members' anti-affinity constraints
       together with the affinity constraint (an anti-affinity group already full
       there; not enough distinct hosts for members that must be apart; no room left
       elsewhere for the anti-affinity group's other members of the batch);
    3. choose the affinity domain among the rest (ranked by the engine's score of the
       largest member) and place every member in it, trying the next on failure;
    4. the anti-affinity members are placed afterwards by the engine, whose hard
       group filter puts them on other domains as required.

When no domain is left, the error names the affinity group and, per domain, the
constraint that removed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fleetvisor.model.entities import PlacementScope
from fleetvisor.scheduler.cycle import prepare
from fleetvisor.scheduler.engine import PlacementEngine
from fleetvisor.scheduler.errors import PlacementFailed
from fleetvisor.scheduler.explain import FilterOutcome
from fleetvisor.scheduler.filters.base import mask_of
from fleetvisor.scheduler.fleet import FleetSnapshot, Ints, Mask
from fleetvisor.scheduler.groups import GroupState
from fleetvisor.scheduler.snapshot import PlacementDecision, PlacementRequest

RANK = {PlacementScope.HOST: 0, PlacementScope.CLUSTER: 1, PlacementScope.SITE: 2}
MAX_DOMAIN_ATTEMPTS = 8
NAMED_DOMAINS = 12  # domains named in a failure message


@dataclass(slots=True)
class DomainChoice:
    group: GroupState
    domain: int
    decisions: list[tuple[int, PlacementDecision]]  # (request index, decision)


def place_affinity_group(
    engine: PlacementEngine,
    group: GroupState,
    members: Sequence[int],
    requests: Sequence[PlacementRequest],
    *,
    explain: bool = False,
) -> DomainChoice:
    """Steps 1-3 for one hard affinity group: choose its domain and place its members there.

    Raises PlacementFailed naming, per domain, why it could not take the group.
    """
    fleet = engine.fleet
    scope = group.spec.scope
    cycles = {i: prepare(fleet, requests[i]) for i in members}
    feasible = {i: engine.feasible(c, group_rules=False) for i, c in cycles.items()}
    removed: dict[int, str] = {}
    candidates = _compatible(engine, group, members, requests, feasible, removed)
    candidates = _without_anti_affinity_conflicts(
        fleet, group, members, requests, feasible, candidates, removed
    )
    order = sorted(members, key=lambda i: -fleet.dominant_share(requests[i].resources))
    ranked = _rank(engine, requests[order[0]], feasible[order[0]], scope, candidates)
    for domain in ranked[:MAX_DOMAIN_ATTEMPTS]:
        pin = mask_of(len(fleet), fleet.hosts_in(scope, domain))
        reason = (
            f"kept in {scope} {fleet.domain_name(scope, domain)} "
            f"with the other members of {group.spec.describe()}"
        )
        placed: list[tuple[int, PlacementDecision]] = []
        try:
            for i in order:
                decision = engine.place(
                    requests[i], explain=explain, pinned=pin, pin_reason="not " + reason
                )
                placed.append((i, decision))
        except PlacementFailed as failure:
            for _, decision in reversed(placed):
                engine.release(decision)
            removed[domain] = f"{requests[i].name or 'a member'} does not fit: {failure.detail}"
            continue
        return DomainChoice(group, domain, placed)
    raise _failure(fleet, group, members, requests, removed)


def _compatible(
    engine: PlacementEngine,
    group: GroupState,
    members: Sequence[int],
    requests: Sequence[PlacementRequest],
    feasible: dict[int, Mask],
    removed: dict[int, str],
) -> Ints:
    """Step 1: domains where every member fits some host, and all of them fit in total.

    Group rules are left to step 2, which names them; only the affinity group's own
    home counts here (a group with members elsewhere already has its domain).
    """
    fleet = engine.fleet
    scope = group.spec.scope
    count = fleet.domain_count(scope)
    domains = fleet.domains(scope)
    ok = np.ones(count, dtype=bool)
    homes = [d for d, c in group.in_scope().items() if c > 0 and d >= 0]
    if homes:
        ok[:] = False
        ok[homes] = True
        where = ", ".join(fleet.domain_name(scope, d) for d in homes)
        for d in range(min(count, NAMED_DOMAINS)):
            if not ok[d]:
                removed[d] = f"the group's members already run in {scope} {where}"
    for i in members:
        here = np.bincount(domains[feasible[i]], minlength=count) > 0
        for d in np.flatnonzero(ok & ~here)[:NAMED_DOMAINS]:
            removed[int(d)] = _why_no_host(engine, requests[i], scope, int(d))
        ok &= here
    union = np.zeros(len(fleet), dtype=bool)
    for i in members:
        union |= feasible[i]
    need = sum((requests[i].resources for i in members[1:]), requests[members[0]].resources)
    free = np.maximum(fleet.free, 0)
    for k, amount in enumerate(need.as_tuple()):
        if amount == 0:
            continue
        total = np.bincount(domains[union], weights=free[k][union], minlength=count)
        short = ok & (total < amount)
        for d in np.flatnonzero(short)[:NAMED_DOMAINS]:
            removed[int(d)] = (
                f"the {len(members)} members need {need.describe()} together; "
                "its hosts that fit them have less free"
            )
        ok &= ~short
    return np.flatnonzero(ok)


def _why_no_host(
    engine: PlacementEngine, request: PlacementRequest, scope: PlacementScope, domain: int
) -> str:
    """The filter outcomes of `request` inside one domain, summarized."""
    fleet = engine.fleet
    pin = mask_of(len(fleet), fleet.hosts_in(scope, domain))
    cycle = prepare(fleet, request, pin)
    cycle.hard_groups = ()
    outcomes: list[FilterOutcome] = []
    engine.explain_filters(cycle, outcomes)
    inside = [o for o in outcomes if o.filter != "pinned"]
    detail = "; ".join(
        f"{o.count} host(s): {o.examples[0][1] if o.examples else o.reason}" for o in inside
    )
    return f"no host there can take {request.describe()} ({detail or 'no hosts'})"


def _without_anti_affinity_conflicts(
    fleet: FleetSnapshot,
    group: GroupState,
    members: Sequence[int],
    requests: Sequence[PlacementRequest],
    feasible: dict[int, Mask],
    candidates: Ints,
    removed: dict[int, str],
) -> Ints:
    """Step 2: drop domains where an anti-affinity group of the members cannot hold."""
    scope = group.spec.scope
    member_set = set(members)
    keep = np.ones(candidates.size, dtype=bool)
    for other_name in sorted({g for i in members for g in requests[i].groups}):
        other = fleet.groups[other_name]
        if not (other.spec.anti and other.spec.hard):
            continue
        limit = other.spec.limit
        assert limit is not None
        together = [i for i in members if other_name in requests[i].groups]
        apart = [
            i for i, r in enumerate(requests) if other_name in r.groups and i not in member_set
        ]
        if RANK[other.spec.scope] >= RANK[scope] and len(together) > limit:
            raise PlacementFailed(
                f"{group.spec.describe()} and {other.spec.describe()} conflict: "
                f"{len(together)} members are in both, so they must share a "
                f"{other.spec.scope} that allows only {limit}",
                constraint=f"{group.spec.name} with {other.spec.name}",
            )
        for k, domain in enumerate(candidates):
            if not keep[k]:
                continue
            why = _anti_affinity_conflict(
                fleet, scope, int(domain), other, together, apart, feasible, requests
            )
            if why:
                keep[k] = False
                removed[int(domain)] = why
    return candidates[keep]


def _anti_affinity_conflict(
    fleet: FleetSnapshot,
    scope: PlacementScope,
    domain: int,
    other: GroupState,
    together: list[int],
    apart: list[int],
    feasible: dict[int, Mask],
    requests: Sequence[PlacementRequest],
) -> str | None:
    spec = other.spec
    limit = spec.limit
    assert limit is not None
    counts = other.in_scope()
    hosts = fleet.hosts_in(scope, domain)
    if RANK[spec.scope] >= RANK[scope]:
        # The members share one domain of the anti-affinity group's scope.
        outer = fleet.domain_of(spec.scope, int(hosts[0]))
        there = counts.get(outer, 0)
        if there + len(together) > limit:
            return (
                f"{spec.describe()} has {there} member(s) in {spec.scope} "
                f"{fleet.domain_name(spec.scope, outer)}; {len(together)} more would exceed it"
            )
        if apart:
            room_elsewhere = sum(
                max(0, limit - counts.get(d, 0))
                for d in range(fleet.domain_count(spec.scope))
                if d != outer
            )
            room_here = max(0, limit - there - len(together))
            if room_elsewhere + room_here < len(apart):
                return (
                    f"leaves room for only {room_elsewhere + room_here} of the "
                    f"{len(apart)} other member(s) of {spec.describe()}"
                )
        return None
    # Finer scope (e.g. anti-affinity per host inside an affinity cluster): the members
    # need distinct sub-domains with room inside this domain.
    if not together:
        return None
    union = np.zeros(len(fleet), dtype=bool)
    for i in together:
        union |= feasible[i]
    inner = np.unique(fleet.domains(spec.scope)[hosts[union[hosts]]])
    room = sum(max(0, limit - counts.get(int(d), 0)) for d in inner)
    if room < len(together):
        return (
            f"room for {room} of the {len(together)} member(s) of {spec.describe()} "
            f"(e.g. {requests[together[0]].name or 'a member'})"
        )
    return None


def _rank(
    engine: PlacementEngine,
    request: PlacementRequest,
    feasible: Mask,
    scope: PlacementScope,
    candidates: Ints,
) -> list[int]:
    """Step 3's order: the best engine score of the largest member among each domain's hosts."""
    fleet = engine.fleet
    hosts = np.flatnonzero(feasible)
    if candidates.size == 0 or hosts.size == 0:
        return [int(d) for d in candidates]
    totals = engine.score(prepare(fleet, request), hosts)
    best = np.full(fleet.domain_count(scope), -1.0)
    np.maximum.at(best, fleet.domains(scope)[hosts], totals)
    return sorted((int(d) for d in candidates), key=lambda d: (-best[d], d))


def _failure(
    fleet: FleetSnapshot,
    group: GroupState,
    members: Sequence[int],
    requests: Sequence[PlacementRequest],
    removed: dict[int, str],
) -> PlacementFailed:
    scope = group.spec.scope
    where = {fleet.domain_name(scope, d): why for d, why in sorted(removed.items())}
    named = list(where.items())[:NAMED_DOMAINS]
    more = len(where) - len(named)
    names = ", ".join(requests[i].name or f"#{i}" for i in members)
    detail = "; ".join(f"{scope} {d}: {why}" for d, why in named)
    if more > 0:
        detail += f"; and {more} more {scope}(s)"
    if not where:
        detail = f"no {scope} is compatible with the request"
    return PlacementFailed(
        f"{group.spec.describe()} cannot be satisfied for {names}: {detail}",
        constraint=group.spec.describe(),
        where=where,
    )


def affinity_groups(
    fleet: FleetSnapshot, requests: Sequence[PlacementRequest]
) -> list[tuple[GroupState, list[int]]]:
    """Hard plain-affinity groups with members in the batch, largest first."""
    found: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        for name in request.groups:
            state = fleet.groups.get(name)
            if state and state.spec.hard and not state.spec.anti and state.spec.limit is None:
                found.setdefault(name, []).append(i)
    return sorted(
        ((fleet.groups[name], members) for name, members in found.items()),
        key=lambda item: (-len(item[1]), item[0].spec.name),
    )
