"""Placement groups: their spec, and a per-group index of where the members are.

The index counts members per host, per cluster and per site, so a group constraint is
checked by looking at the domains that hold members (a handful), never by scanning
every instance or every host.

Semantics (the same everywhere: filters, scores, CP-SAT model, invariants):

- anti-affinity, max m (default 1): no domain of the scope holds more than m members.
- affinity, no max: all members in one domain of the scope.
- affinity, max m: no domain holds more than m members, and a member opens a new
  domain only when no domain that already holds members (and has room) can take it.
- hard: a filter (never broken). soft: a score (preferred, may be broken).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from fleetvisor.errors import InvalidInput
from fleetvisor.model.entities import PlacementPolicy, PlacementScope, PlacementStrength

SCOPES: tuple[PlacementScope, ...] = (
    PlacementScope.HOST,
    PlacementScope.CLUSTER,
    PlacementScope.SITE,
)


@dataclass(frozen=True, slots=True)
class PlacementGroupSpec:
    """A placement group as the store defines it (PlacementGroupRow)."""

    name: str
    policy: PlacementPolicy
    strength: PlacementStrength = PlacementStrength.HARD
    scope: PlacementScope = PlacementScope.HOST
    max_per_scope: int | None = None

    def __post_init__(self) -> None:
        if self.max_per_scope is not None and self.max_per_scope < 1:
            raise InvalidInput(
                f"placement group {self.name!r}: max per scope must be at least 1, "
                f"got {self.max_per_scope}"
            )

    @property
    def hard(self) -> bool:
        return self.strength == PlacementStrength.HARD

    @property
    def anti(self) -> bool:
        return self.policy == PlacementPolicy.ANTI_AFFINITY

    @property
    def limit(self) -> int | None:
        """Members allowed per domain: anti-affinity defaults to 1, affinity to no limit."""
        if self.max_per_scope is not None:
            return self.max_per_scope
        return 1 if self.anti else None

    def describe(self) -> str:
        limit = f", max {self.limit} per {self.scope}" if self.limit is not None else ""
        return f"{self.policy} group {self.name!r} ({self.strength}, {self.scope} scope{limit})"


@dataclass(frozen=True, slots=True)
class GroupMember:
    """One existing instance of a group and where it runs.

    `cluster`/`site` are needed only when the host is missing from the snapshot (a host
    that is down, say): its member still counts in its cluster and site.
    """

    group: str
    host_id: str
    cluster: str = ""
    site: str = ""


@dataclass(slots=True)
class GroupState:
    """Where a group's members are: counts per domain index, for every scope."""

    spec: PlacementGroupSpec
    counts: dict[PlacementScope, dict[int, int]] = field(
        default_factory=lambda: {scope: defaultdict(int) for scope in SCOPES}
    )
    total: int = 0

    def add(self, host: int, cluster: int, site: int, delta: int = 1) -> None:
        self.total += delta
        for scope, domain in (
            (PlacementScope.HOST, host),
            (PlacementScope.CLUSTER, cluster),
            (PlacementScope.SITE, site),
        ):
            if domain < 0:
                continue
            by_domain = self.counts[scope]
            by_domain[domain] += delta
            if by_domain[domain] <= 0:
                del by_domain[domain]

    def in_scope(self) -> dict[int, int]:
        """Members per domain of the group's own scope (domains with members only)."""
        return self.counts[self.spec.scope]

    def copy(self) -> GroupState:
        clone = GroupState(self.spec, total=self.total)
        for scope in SCOPES:
            clone.counts[scope].update(self.counts[scope])
        return clone
