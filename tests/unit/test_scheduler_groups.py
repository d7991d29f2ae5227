"""Placement groups: affinity / anti-affinity, hard / soft, at host, cluster and site scope."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from fleetvisor.errors import InvalidInput
from fleetvisor.model.entities import PlacementPolicy, PlacementScope, PlacementStrength
from fleetvisor.model.resources import Resources
from fleetvisor.scheduler import (
    FleetSnapshot,
    GroupMember,
    HostCandidate,
    PlacementEngine,
    PlacementFailed,
    PlacementGroupSpec,
    PlacementRequest,
    violations,
)

AFFINITY, ANTI = PlacementPolicy.AFFINITY, PlacementPolicy.ANTI_AFFINITY
HARD, SOFT = PlacementStrength.HARD, PlacementStrength.SOFT
HOST, CLUSTER, SITE = PlacementScope.HOST, PlacementScope.CLUSTER, PlacementScope.SITE
SMALL = Resources(500, 512)


def fleet_of(sites: int = 2, clusters: int = 2, hosts: int = 3) -> list[HostCandidate]:
    """sites × clusters × hosts identical hosts, named s0-c1-h2."""
    return [
        HostCandidate(
            id=f"s{s}-c{c}-h{h}",
            name=f"s{s}-c{c}-h{h}",
            state="ready",
            driver="sim",
            capacity=Resources(8000, 16384, 100, 1000),
            allocated=Resources(),
            generation=0,
            cluster=f"s{s}-c{c}",
            site=f"s{s}",
        )
        for s in range(sites)
        for c in range(clusters)
        for h in range(hosts)
    ]


def engine(
    *specs: PlacementGroupSpec, members: tuple[GroupMember, ...] = (), **shape: int
) -> PlacementEngine:
    return PlacementEngine(FleetSnapshot(fleet_of(**shape), specs, members))


def place_many(eng: PlacementEngine, group: str, count: int) -> list[HostCandidate]:
    return [
        eng.place(PlacementRequest(SMALL, name=f"{group}-{i}", groups=(group,))).host
        for i in range(count)
    ]


def spread(hosts: list[HostCandidate], scope: PlacementScope) -> Counter[str]:
    key = {HOST: lambda h: h.name, CLUSTER: lambda h: h.cluster, SITE: lambda h: h.site}[scope]
    return Counter(key(h) for h in hosts)


@pytest.mark.parametrize(("scope", "domains"), [(HOST, 12), (CLUSTER, 4), (SITE, 2)])
def test_hard_anti_affinity_one_per_domain_then_fails(scope: PlacementScope, domains: int) -> None:
    eng = engine(PlacementGroupSpec("web", ANTI, HARD, scope))
    placed = place_many(eng, "web", domains)
    assert set(spread(placed, scope).values()) == {1}
    with pytest.raises(PlacementFailed) as info:
        eng.place(PlacementRequest(SMALL, name="web-extra", groups=("web",)))
    assert info.value.constraint == "placement_groups"
    assert "already has 1 member(s) of anti-affinity group 'web' (max 1)" in info.value.detail
    assert not violations(eng.fleet)


@pytest.mark.parametrize(
    ("scope", "limit", "domains"), [(HOST, 2, 12), (CLUSTER, 3, 4), (SITE, 5, 2)]
)
def test_hard_anti_affinity_with_max_per_scope(
    scope: PlacementScope, limit: int, domains: int
) -> None:
    eng = engine(PlacementGroupSpec("db", ANTI, HARD, scope, max_per_scope=limit))
    placed = place_many(eng, "db", limit * domains)
    assert set(spread(placed, scope).values()) == {limit}
    with pytest.raises(PlacementFailed):
        eng.place(PlacementRequest(SMALL, groups=("db",)))


@pytest.mark.parametrize("scope", [HOST, CLUSTER, SITE])
def test_hard_affinity_keeps_every_member_in_one_domain(scope: PlacementScope) -> None:
    eng = engine(PlacementGroupSpec("app", AFFINITY, HARD, scope))
    placed = place_many(eng, "app", 6)
    assert len(spread(placed, scope)) == 1
    assert not violations(eng.fleet)


def test_hard_affinity_on_a_full_host_fails_and_says_where_the_group_is() -> None:
    eng = engine(PlacementGroupSpec("pair", AFFINITY, HARD, HOST))
    first = eng.place(PlacementRequest(Resources(6000, 512), groups=("pair",)))
    with pytest.raises(PlacementFailed) as info:
        eng.place(PlacementRequest(Resources(4000, 512), groups=("pair",)))
    detail = info.value.detail
    assert "not enough cpu" in detail and first.host.name in detail


def test_affinity_with_max_fills_a_domain_before_opening_another() -> None:
    eng = engine(PlacementGroupSpec("batch", AFFINITY, HARD, CLUSTER, max_per_scope=4))
    placed = place_many(eng, "batch", 10)
    assert sorted(spread(placed, CLUSTER).values()) == [2, 4, 4]
    assert not violations(eng.fleet)


def test_affinity_with_max_opens_a_domain_when_the_open_one_has_no_room() -> None:
    eng = engine(PlacementGroupSpec("g", AFFINITY, HARD, HOST, max_per_scope=3))
    first = eng.place(PlacementRequest(Resources(7000, 512), groups=("g",)))
    second = eng.place(PlacementRequest(Resources(2000, 512), groups=("g",)))
    assert second.host.name != first.host.name  # the open host is out of cpu


def test_soft_anti_affinity_spreads_but_never_fails() -> None:
    eng = engine(PlacementGroupSpec("cache", ANTI, SOFT, CLUSTER), sites=1, clusters=2)
    placed = place_many(eng, "cache", 5)
    assert sorted(spread(placed, CLUSTER).values()) == [2, 3]  # spread first, then doubled up
    assert not violations(eng.fleet)  # soft rules are never violations


def test_soft_affinity_prefers_the_members_domain_over_bin_packing() -> None:
    empty, busy = fleet_of(sites=1, clusters=2, hosts=1)
    busy = replace(busy, allocated=Resources(6000, 8192))
    spec = PlacementGroupSpec("near", AFFINITY, SOFT, HOST)
    eng = PlacementEngine(FleetSnapshot([empty, busy], [spec], [GroupMember("near", empty.id)]))
    assert eng.place(PlacementRequest(SMALL)).host.name == busy.name  # bin-pack alone
    assert eng.place(PlacementRequest(SMALL, groups=("near",))).host.name == empty.name


def test_existing_members_count_including_on_hosts_missing_from_the_snapshot() -> None:
    spec = PlacementGroupSpec("ha", ANTI, HARD, CLUSTER)
    members = (
        GroupMember("ha", "s0-c0-h0"),
        GroupMember("ha", "gone-host", cluster="s0-c1", site="s0"),
    )
    eng = engine(spec, members=members)
    placed = place_many(eng, "ha", 2)
    assert {h.cluster for h in placed} == {"s1-c0", "s1-c1"}


def test_two_groups_on_one_request_must_both_hold() -> None:
    eng = engine(
        PlacementGroupSpec("zone-spread", ANTI, HARD, SITE),
        PlacementGroupSpec("rack-spread", ANTI, HARD, HOST),
    )
    a = eng.place(PlacementRequest(SMALL, groups=("zone-spread", "rack-spread")))
    b = eng.place(PlacementRequest(SMALL, groups=("zone-spread", "rack-spread")))
    assert a.host.site != b.host.site
    with pytest.raises(PlacementFailed, match="zone-spread"):
        eng.place(PlacementRequest(SMALL, groups=("zone-spread",)))


def test_invalid_max_per_scope_is_refused() -> None:
    with pytest.raises(InvalidInput, match="at least 1"):
        PlacementGroupSpec("bad", ANTI, HARD, HOST, max_per_scope=0)
