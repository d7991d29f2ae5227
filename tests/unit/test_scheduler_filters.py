"""Engine filters: every rejected host keeps its reason; failures name the constraint."""

from __future__ import annotations

import pytest

from fleetvisor.errors import InvalidInput
from fleetvisor.model.resources import Resources
from fleetvisor.scheduler import (
    FleetSnapshot,
    HostCandidate,
    PlacementEngine,
    PlacementFailed,
    PlacementRequest,
    SchedulerConfig,
)

CAP = Resources(4000, 8192, 100, 1000)


def host(name: str, **kwargs: object) -> HostCandidate:
    fields: dict[str, object] = {
        "id": name,
        "name": name,
        "state": "ready",
        "driver": "sim",
        "capacity": CAP,
        "allocated": Resources(),
        "generation": 0,
        "cluster": "c1",
        "site": "s1",
    }
    fields.update(kwargs)
    return HostCandidate(**fields)  # type: ignore[arg-type]


def engine(*hosts: HostCandidate) -> PlacementEngine:
    return PlacementEngine(FleetSnapshot(list(hosts)), SchedulerConfig(explain_examples=5))


def reasons(eng: PlacementEngine, request: PlacementRequest) -> dict[str, str]:
    return eng.explain(request).rejected_sample()


def test_each_filter_names_its_reason() -> None:
    eng = engine(
        host("a-down", state="down"),
        host("b-qemu", driver="qemu"),
        host("c-full", allocated=Resources(3900, 0, 0, 0)),
        host("d-hdd", labels={"disk": "hdd"}),
        host("e-noavx", labels={"disk": "ssd"}),
        host("f-ok", labels={"disk": "ssd"}, cpu_features=frozenset({"avx512"})),
        host("g-excluded", labels={"disk": "ssd"}, cpu_features=frozenset({"avx512"})),
    )
    request = PlacementRequest(
        Resources(500, 256),
        driver="sim",
        required_labels={"disk": "ssd"},
        required_traits=frozenset({"avx512"}),
        exclude_hosts=frozenset({"g-excluded"}),
    )
    why = reasons(eng, request)
    assert why["a-down"] == "host is down, not ready"
    assert why["b-qemu"] == "runs driver qemu, not sim"
    assert why["g-excluded"] == "excluded by the request"
    assert "label disk=ssd" in why["c-full"]  # the first failing filter wins (labels < capacity)
    assert why["d-hdd"] == "lacks label disk=ssd, trait avx512"
    assert why["e-noavx"] == "lacks trait avx512"
    decision = eng.place(request)
    assert decision.host.name == "f-ok"
    assert decision.explanation is not None and decision.explanation.feasible == 1


def test_capacity_reason_names_every_short_dimension() -> None:
    eng = engine(host("a", allocated=Resources(3800, 8000, 0, 0)), host("b"))
    why = reasons(eng, PlacementRequest(Resources(500, 512)))
    assert why["a"] == "not enough cpu (short by 0.3), memory (short by 320 MiB)"


def test_image_availability_keeps_real_image_hosts_out() -> None:
    eng = engine(host("real", capabilities=frozenset({"oci_images"})), host("sim"))
    decision = eng.place(PlacementRequest(Resources(1, 1), image="web:1", image_available=False))
    assert decision.host.name == "sim"
    assert "web:1 is not in the fleet's registry" in decision.rejected["real"]


def test_reasons_are_aggregated_with_counts_and_examples() -> None:
    hosts = [host(f"h{i:03d}", allocated=Resources(4000, 0, 0, 0)) for i in range(200)]
    hosts += [host(f"m{i:03d}", allocated=Resources(0, 8192, 0, 0)) for i in range(50)]
    hosts += [host("ok")]
    eng = PlacementEngine(FleetSnapshot(hosts))
    explanation = eng.explain(PlacementRequest(Resources(100, 100)))
    by_reason = {o.reason: o for o in explanation.filtered}
    assert by_reason["not enough cpu"].count == 200
    assert by_reason["not enough memory"].count == 50
    assert len(by_reason["not enough cpu"].examples) == 3  # a few, not 200
    assert explanation.winner == "ok"
    assert "filtered    200 by capacity: not enough cpu" in explanation.render()


def test_no_host_fits_names_the_failed_constraint_and_where() -> None:
    eng = engine(host("a", state="draining"), host("b", allocated=Resources(0, 8000, 0, 0)))
    with pytest.raises(PlacementFailed) as info:
        eng.place(PlacementRequest(Resources(100, 512), name="web-1"))
    failure = info.value
    assert failure.constraint == "capacity"
    assert failure.where == {"b": "not enough memory (short by 320 MiB)"}
    assert "web-1" in failure.detail and "1 host(s): host is not ready" in failure.detail
    assert failure.explanation is not None
    assert failure.explanation.failed == "capacity: not enough memory on 1 host(s)"
    assert failure.status == 409


def test_no_hosts_says_how_to_add_one() -> None:
    with pytest.raises(PlacementFailed, match="fleetvisor up"):
        engine().place(PlacementRequest(Resources(1, 1)))


def test_negative_resources_and_unknown_groups_are_refused() -> None:
    eng = engine(host("a"))
    with pytest.raises(InvalidInput, match="negative"):
        eng.place(PlacementRequest(Resources(-1, 1)))
    with pytest.raises(InvalidInput, match="group 'nope'"):
        eng.place(PlacementRequest(Resources(1, 1), groups=("nope",)))


def test_capacity_follows_placements_exactly() -> None:
    eng = engine(host("a"), host("b"))
    placed = [eng.place(PlacementRequest(Resources(1000, 2048)), explain=False) for _ in range(8)]
    assert sorted(d.host.name for d in placed).count("a") == 4
    with pytest.raises(PlacementFailed):
        eng.place(PlacementRequest(Resources(1, 1)))
    eng.release(placed[0])
    assert eng.place(PlacementRequest(Resources(1000, 2048))).host.name == placed[0].host.name
    assert not eng.fleet.oversubscribed().size


def test_a_long_lived_snapshot_follows_the_store_generation() -> None:
    eng = engine(host("a"))
    assert eng.place(PlacementRequest(Resources(1, 1))).host.generation == 0
    eng.fleet.set_generation("a", 1)  # the controller bound the reservation
    assert eng.place(PlacementRequest(Resources(1, 1))).host.generation == 1
