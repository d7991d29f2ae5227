"""All-or-nothing batches and the cross-cluster affinity / anti-affinity algorithm."""

from __future__ import annotations

import numpy as np
import pytest

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
    place_batch,
    violations,
)

AFFINITY, ANTI = PlacementPolicy.AFFINITY, PlacementPolicy.ANTI_AFFINITY
HARD = PlacementStrength.HARD
HOST, CLUSTER, SITE = PlacementScope.HOST, PlacementScope.CLUSTER, PlacementScope.SITE
CAP = Resources(8000, 16384, 100, 1000)


def host(name: str, cluster: str, site: str = "s0", **kwargs: object) -> HostCandidate:
    fields: dict[str, object] = {
        "id": name,
        "name": name,
        "state": "ready",
        "driver": "sim",
        "capacity": CAP,
        "allocated": Resources(),
        "generation": 7,
        "cluster": cluster,
        "site": site,
    }
    fields.update(kwargs)
    return HostCandidate(**fields)  # type: ignore[arg-type]


def clusters(count: int, hosts: int = 2, site_of: int = 0) -> list[HostCandidate]:
    """Cluster k holds hosts ck-h0.. ; clusters are spread over sites k // site_of."""
    return [
        host(f"c{k}-h{i}", f"c{k}", f"s{k // site_of}" if site_of else "s0")
        for k in range(count)
        for i in range(hosts)
    ]


DB = PlacementGroupSpec("db", AFFINITY, HARD, CLUSTER)
HA = PlacementGroupSpec("ha", ANTI, HARD, CLUSTER)


def req(name: str, *groups: str, cpu: int = 2000) -> PlacementRequest:
    return PlacementRequest(Resources(cpu, 2048), name=name, groups=groups)


def snapshot_state(eng: PlacementEngine) -> tuple[object, ...]:
    fleet = eng.fleet
    counts = {n: {s: dict(c) for s, c in g.counts.items()} for n, g in fleet.groups.items()}
    return (fleet.allocated.tobytes(), repr(sorted(counts.items())))


def test_batch_reservations_sum_per_host_with_the_generation_seen() -> None:
    eng = PlacementEngine(FleetSnapshot(clusters(1, hosts=1)))
    batch = place_batch(eng, [req("a"), req("b"), req("c", cpu=1000)])
    [(reserved_host, total)] = batch.reservations()
    assert reserved_host.generation == 7
    assert total == Resources(5000, 6144)
    assert batch.hosts() == ["c0-h0"] * 3


def test_a_failing_member_leaves_the_snapshot_as_it_was() -> None:
    eng = PlacementEngine(FleetSnapshot(clusters(2, hosts=1), [HA]))
    before = snapshot_state(eng)
    requests = [req(f"r{i}", "ha") for i in range(3)]  # 3 members, 2 clusters
    with pytest.raises(PlacementFailed) as info:
        place_batch(eng, requests)
    assert "none of the 3 instance(s) placed" in info.value.detail
    assert "anti-affinity group 'ha'" in info.value.detail
    assert snapshot_state(eng) == before
    assert len(place_batch(eng, requests[:2]).decisions) == 2  # and it still works


def test_invalid_member_is_refused_before_anything_is_reserved() -> None:
    eng = PlacementEngine(FleetSnapshot(clusters(1)))
    before = snapshot_state(eng)
    with pytest.raises(Exception, match="nope"):
        place_batch(eng, [req("ok"), req("bad", "nope")])
    assert snapshot_state(eng) == before


def test_large_members_go_first_so_the_batch_fits() -> None:
    # One 8-cpu host and one 4-cpu host: arrival order 4, 8 would fail greedily.
    hosts = [host("big", "c0"), host("small", "c0", capacity=Resources(4000, 16384, 100, 1000))]
    eng = PlacementEngine(FleetSnapshot(hosts))
    batch = place_batch(eng, [req("four", cpu=4000), req("eight", cpu=8000)])
    assert batch.hosts() == ["small", "big"]


def test_affinity_cluster_is_chosen_among_those_anti_affinity_allows() -> None:
    """The seed's algorithm: c0 already holds an `ha` member, so db (which has an `ha`
    member) goes to another cluster, and ha's other member to a third one."""
    eng = PlacementEngine(FleetSnapshot(clusters(3), [DB, HA], [GroupMember("ha", "c0-h0")]))
    requests = [req("db-1", "db", "ha"), req("db-2", "db"), req("db-3", "db"), req("replica", "ha")]
    batch = place_batch(eng, requests)
    where = dict(
        zip([r.name for r in requests], [d.host.cluster for d in batch.decisions], strict=True)
    )
    assert where["db-1"] == where["db-2"] == where["db-3"] != "c0"
    assert where["replica"] not in {"c0", where["db-1"]}
    assert not violations(eng.fleet)


def test_affinity_cluster_needs_room_for_all_members_together() -> None:
    hosts = clusters(2, hosts=1)
    hosts[0] = host("c0-h0", "c0", allocated=Resources(4000, 0, 0, 0))  # 4 cpu free only
    eng = PlacementEngine(FleetSnapshot(hosts, [DB]))
    batch = place_batch(eng, [req(f"db-{i}", "db", cpu=3000) for i in range(2)])  # 6 cpu
    assert {d.host.cluster for d in batch.decisions} == {"c1"}


def test_affinity_failure_names_the_group_and_every_cluster_reason() -> None:
    hosts = [
        host("c0-h0", "c0"),
        host("c0-h1", "c0"),  # room, but holds an `ha` member
        host("c1-h0", "c1", allocated=Resources(3000, 0, 0, 0)),  # 5 cpu: 1 member, not 2
        host("c2-h0", "c2", driver="qemu"),
    ]
    members = [GroupMember("ha", "c0-h0")]
    eng = PlacementEngine(FleetSnapshot(hosts, [DB, HA], members))
    requests = [
        PlacementRequest(Resources(4000, 2048), driver="sim", name="db-1", groups=("db", "ha")),
        PlacementRequest(Resources(4000, 2048), driver="sim", name="db-2", groups=("db",)),
    ]
    with pytest.raises(PlacementFailed) as info:
        place_batch(eng, requests)
    failure = info.value
    assert failure.constraint == "affinity group 'db' (hard, cluster scope)"
    assert set(failure.where) == {"c0", "c1", "c2"}
    assert "anti-affinity group 'ha'" in failure.where["c0"]
    assert "need 8 cpu" in failure.where["c1"]
    assert failure.where["c2"].endswith("(1 host(s): runs driver qemu, not sim)")
    assert "none of the 2 instance(s) placed" in failure.detail


def test_members_in_both_groups_that_must_share_a_cluster_conflict() -> None:
    eng = PlacementEngine(FleetSnapshot(clusters(3), [DB, HA]))
    with pytest.raises(PlacementFailed, match="conflict: 2 members are in both"):
        place_batch(eng, [req("a", "db", "ha"), req("b", "db", "ha")])


def test_a_cluster_is_removed_when_it_leaves_no_room_for_the_anti_affinity_members() -> None:
    # Site-scope anti-affinity, 2 sites: db must not take the only site left for `other`.
    hosts = clusters(2, hosts=2, site_of=1)  # c0 in s0, c1 in s1
    spec = PlacementGroupSpec("ha", ANTI, HARD, SITE)
    eng = PlacementEngine(FleetSnapshot(hosts, [DB, spec], [GroupMember("ha", "c0-h0")]))
    with pytest.raises(PlacementFailed) as info:
        place_batch(eng, [req("db-1", "db", "ha"), req("other", "ha")])
    assert "leaves room for only 0 of the 1 other member(s)" in info.value.where["c1"]


def test_host_scope_anti_affinity_inside_an_affinity_cluster() -> None:
    spread = PlacementGroupSpec("spread", ANTI, HARD, HOST)
    hosts = clusters(1, hosts=2) + clusters(2, hosts=3)[3:]  # c0: 2 hosts, c1: 3 hosts
    eng = PlacementEngine(FleetSnapshot(hosts, [DB, spread]))
    batch = place_batch(eng, [req(f"db-{i}", "db", "spread", cpu=500) for i in range(3)])
    assert {d.host.cluster for d in batch.decisions} == {"c1"}
    assert len({d.host.name for d in batch.decisions}) == 3


def test_group_with_members_keeps_its_cluster() -> None:
    eng = PlacementEngine(FleetSnapshot(clusters(3), [DB], [GroupMember("db", "c2-h1")]))
    batch = place_batch(eng, [req("db-4", "db"), req("db-5", "db")])
    assert {d.host.cluster for d in batch.decisions} == {"c2"}


def test_batch_of_a_thousand_is_fast_and_valid() -> None:
    hosts = [host(f"h{i:03d}", f"c{i // 20}") for i in range(200)]
    specs = [PlacementGroupSpec(f"g{k}", ANTI, HARD, HOST) for k in range(100)]
    eng = PlacementEngine(FleetSnapshot(hosts, specs))
    requests = [req(f"i{k}", f"g{k % 100}", cpu=500) for k in range(1000)]
    batch = place_batch(eng, requests)
    assert len(batch.decisions) == 1000 and not violations(eng.fleet)
    per_group_host = {
        (r.groups[0], d.host.name) for r, d in zip(requests, batch.decisions, strict=True)
    }
    assert len(per_group_host) == 1000
    assert np.all(eng.fleet.free >= 0)
