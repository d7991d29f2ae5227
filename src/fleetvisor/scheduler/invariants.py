"""What must hold in every state the scheduler produces: capacity and hard group rules.

- capacity: no host's allocation exceeds its capacity in any dimension;
- hard anti-affinity, and affinity with a max: no domain holds more than the max;
- hard affinity without a max: all members in one domain.

(The "fill domains with members first" part of affinity-with-max is a placement rule,
not an invariant: deleting members can leave any pattern behind.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleetvisor.model.resources import DIMENSIONS
from fleetvisor.scheduler.fleet import FleetSnapshot, Ints
from fleetvisor.scheduler.groups import GroupState


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str  # "capacity" | "group"
    subject: str  # host name or group name
    detail: str


def group_violation(fleet: FleetSnapshot, group: GroupState) -> str | None:
    """Why `group` breaks its hard rule now, or None."""
    spec = group.spec
    if not spec.hard:
        return None
    counts = group.in_scope()
    limit = spec.limit
    if limit is not None:
        for domain, count in counts.items():
            if count > limit:
                name = fleet.domain_name(spec.scope, domain) if domain >= 0 else "?"
                return f"{spec.scope} {name} holds {count} members (max {limit})"
    if not spec.anti and limit is None and len(counts) > 1:
        return f"members are spread over {len(counts)} {spec.scope}s"
    return None


def violations(fleet: FleetSnapshot) -> list[Violation]:
    found = [
        Violation("capacity", fleet.hosts[int(h)].name, _overage(fleet, int(h)))
        for h in fleet.oversubscribed()
    ]
    for name, group in sorted(fleet.groups.items()):
        why = group_violation(fleet, group)
        if why:
            found.append(Violation("group", name, why))
    return found


def move_violation(
    fleet: FleetSnapshot, source: int, target: int, need: Ints, groups: tuple[str, ...]
) -> str | None:
    """Why moving one instance (need, groups) from source to target breaks an invariant now.

    Checks the state after the move: the target's capacity and the hard rules of the
    instance's groups. The fleet is left unchanged.
    """
    if source == target:
        return None
    if bool((fleet.free[:, target] < need).any()):
        return f"{fleet.hosts[target].name} lacks the capacity"
    fleet.unassign(source, need, groups)
    fleet.assign(target, need, groups)
    try:
        for name in groups:
            why = group_violation(fleet, fleet.groups[name])
            if why:
                return f"{fleet.groups[name].spec.describe()}: {why}"
        return None
    finally:
        fleet.unassign(target, need, groups)
        fleet.assign(source, need, groups)


def _overage(fleet: FleetSnapshot, host: int) -> str:
    over = np.flatnonzero(fleet.free[:, host] < 0)
    return ", ".join(f"{DIMENSIONS[d]} over by {-int(fleet.free[d, host])}" for d in over)
