"""Hard placement-group constraints: affinity and anti-affinity at host, cluster or site scope.

Each rule reads only the group's member index (domains holding members), so its cost
is the number of those domains' hosts, not the number of instances in the fleet. See
`scheduler/groups.py` for the semantics.
"""

from __future__ import annotations

from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.filters.base import Filter, mask_of
from fleetvisor.scheduler.fleet import FleetSnapshot, Ints, Mask
from fleetvisor.scheduler.groups import GroupState


def group_admits(fleet: FleetSnapshot, group: GroupState, feasible: Mask) -> Mask | None:
    """Hosts where one more member of `group` keeps its hard rule; None when all do."""
    spec, counts, limit = group.spec, group.in_scope(), group.spec.limit
    n = len(fleet)
    if not counts:
        return None
    if spec.anti:
        assert limit is not None
        blocked = [d for d, c in counts.items() if c >= limit]
        if not blocked:
            return None
        return mask_of(n, fleet.hosts_in_domains(spec.scope, blocked), value=False)
    if limit is None:  # plain affinity: stay in the domain(s) already holding members
        return mask_of(n, fleet.hosts_in_domains(spec.scope, counts.keys()))
    open_domains = [d for d, c in counts.items() if c < limit]
    if open_domains:
        inside = mask_of(n, fleet.hosts_in_domains(spec.scope, open_domains))
        if (inside & feasible).any():
            return inside
    # Every domain with members is full (or cannot take this one): open a new domain.
    return mask_of(n, fleet.hosts_in_domains(spec.scope, counts.keys()), value=False)


def group_rejection(fleet: FleetSnapshot, group: GroupState, host: int) -> str:
    """Why `group`'s rule keeps a member off `host` (assumes it does)."""
    spec = group.spec
    counts = group.in_scope()
    domain = fleet.domain_of(spec.scope, host)
    where = f"{spec.scope} {fleet.domain_name(spec.scope, domain)}"
    here = counts.get(domain, 0)
    name = f"{spec.policy} group {spec.name!r}"
    if spec.anti:
        return f"{where} already has {here} member(s) of {name} (max {spec.limit})"
    if spec.limit is None:
        homes = ", ".join(fleet.domain_name(spec.scope, d) for d in sorted(counts)[:3])
        return f"{name} keeps its members together in {spec.scope} {homes}"
    if here >= spec.limit:
        return f"{where} is full for {name} ({here} of max {spec.limit})"
    return f"{name} fills the {spec.scope}s that already have members first"


class GroupConstraintsFilter(Filter):
    name = "placement_groups"
    order = 80

    def admits(self, cycle: CycleState, feasible: Mask) -> Mask | None:
        result: Mask | None = None
        masks: list[tuple[GroupState, Mask]] = []
        for group in cycle.hard_groups:
            admitted = group_admits(
                cycle.fleet, group, feasible if result is None else feasible & result
            )
            if admitted is None:
                continue
            masks.append((group, admitted))
            result = admitted if result is None else result & admitted
        cycle.scratch["group_masks"] = masks
        return result

    def _first_rejecting(self, cycle: CycleState, host: int) -> GroupState | None:
        for group, admitted in cycle.scratch.get("group_masks", []):
            if not admitted[host]:
                return group  # type: ignore[no-any-return]
        return None

    def reason(self, cycle: CycleState, host: int) -> str:
        group = self._first_rejecting(cycle, host)
        if group is None:
            return "placement group constraint"
        return group_rejection(cycle.fleet, group, host)

    def categories(self, cycle: CycleState, rejected: Ints) -> list[tuple[str, Ints]]:
        result = []
        remaining = rejected
        for group, admitted in cycle.scratch.get("group_masks", []):
            hit = remaining[~admitted[remaining]]
            if hit.size:
                result.append((f"{group.spec.describe()} not satisfied", hit))
            remaining = remaining[admitted[remaining]]
        if remaining.size:
            result.append(("placement group constraint", remaining))
        return result

    def summary(self, cycle: CycleState) -> str:
        return "placement group constraint"
