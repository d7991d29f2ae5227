"""All-or-nothing batch placement: N instances (e.g. the members of a group) at once.

    hard affinity groups first (cross_cluster: choose each group's domain, place its
    members there) ─ then the rest, most constrained and largest first
    ─ any failure: release everything this batch reserved, raise naming the member

The order is first-fit decreasing (by dominant share of an average host) within "in a
hard group" before "free": constrained and large instances take their places while
the choice is widest. The result tells the controller what to reserve per host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fleetvisor.model.resources import Resources
from fleetvisor.scheduler.cross_cluster import affinity_groups, place_affinity_group
from fleetvisor.scheduler.cycle import prepare
from fleetvisor.scheduler.engine import PlacementEngine
from fleetvisor.scheduler.errors import PlacementFailed
from fleetvisor.scheduler.snapshot import HostCandidate, PlacementDecision, PlacementRequest


@dataclass(frozen=True, slots=True)
class BatchPlacement:
    decisions: tuple[PlacementDecision, ...]  # in the order of the requests

    def reservations(self) -> list[tuple[HostCandidate, Resources]]:
        """One (host, total) per host used: reserve each against host.generation, in one
        transaction; any stale generation means place the whole batch again."""
        totals: dict[str, tuple[HostCandidate, Resources]] = {}
        for decision in self.decisions:
            assert decision.request is not None
            host = decision.host
            _, sofar = totals.get(host.id, (host, Resources()))
            totals[host.id] = (host, sofar + decision.request.resources)
        return sorted(totals.values(), key=lambda item: item[0].name)

    def hosts(self) -> list[str]:
        return [d.host.name for d in self.decisions]


def place_batch(
    engine: PlacementEngine,
    requests: Sequence[PlacementRequest],
    *,
    explain: bool = False,
) -> BatchPlacement:
    """Place every request or none (the snapshot is left as it was on failure)."""
    fleet = engine.fleet
    for request in requests:
        prepare(fleet, request)  # refuse bad input before reserving anything
    placed: dict[int, PlacementDecision] = {}
    history: list[PlacementDecision] = []
    current = -1
    try:
        for group, members in affinity_groups(fleet, requests):
            pending = [i for i in members if i not in placed]
            if not pending:
                continue
            current = pending[0]
            choice = place_affinity_group(engine, group, pending, requests, explain=explain)
            for i, decision in choice.decisions:
                placed[i] = decision
                history.append(decision)
        rest = [i for i in range(len(requests)) if i not in placed]
        rest.sort(
            key=lambda i: (
                not _in_hard_group(engine, requests[i]),
                -fleet.dominant_share(requests[i].resources),
                i,
            )
        )
        for i in rest:
            current = i
            decision = engine.place(requests[i], explain=explain)
            placed[i] = decision
            history.append(decision)
    except PlacementFailed as failure:
        for decision in reversed(history):
            engine.release(decision)
        who = requests[current].name if 0 <= current < len(requests) else ""
        raise PlacementFailed(
            f"none of the {len(requests)} instance(s) placed (a batch is all or nothing): "
            + (f"{who}: " if who else "")
            + failure.detail,
            constraint=failure.constraint,
            where=failure.where,
            explanation=failure.explanation,
            request=who,
        ) from failure
    except BaseException:
        for decision in reversed(history):
            engine.release(decision)
        raise
    return BatchPlacement(tuple(placed[i] for i in range(len(requests))))


def _in_hard_group(engine: PlacementEngine, request: PlacementRequest) -> bool:
    groups = engine.fleet.groups
    return any(name in groups and groups[name].spec.hard for name in request.groups)
