"""Scoring models, normalization, weights, explanations, and the incremental caches."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetvisor.errors import InvalidInput
from fleetvisor.model.resources import Resources
from fleetvisor.scheduler import (
    FitStrategy,
    FleetSnapshot,
    HostCandidate,
    InstanceUsage,
    PlacementEngine,
    PlacementRequest,
    SchedulerConfig,
    known_models,
    neighbour_pressure,
    utilization_from_metrics,
)
from fleetvisor.scheduler.cycle import prepare
from fleetvisor.scheduler.fleet import ALL
from fleetvisor.scheduler.normalize import Normalization, normalize_over
from fleetvisor.scheduler.scoring import enabled_models, model_classes

CAP = Resources(8000, 16384, 200, 1000)


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


def only(model: str, **config: object) -> SchedulerConfig:
    return SchedulerConfig(weights={model: 1.0}, **config)  # type: ignore[arg-type]


def winner(hosts: list[HostCandidate], request: PlacementRequest, config: SchedulerConfig) -> str:
    return PlacementEngine(FleetSnapshot(hosts), config).place(request).host.name


def test_the_five_models_are_discovered() -> None:
    assert known_models() == {
        "resource_fit",
        "load_forecast",
        "interference",
        "image_locality",
        "group_preference",
    }
    assert [m.name for m in enabled_models(only("interference"))] == ["interference"]


def test_binpack_fills_the_fullest_host_and_opens_the_largest() -> None:
    hosts = [
        host("a-empty-small", capacity=Resources(4000, 8192, 100, 1000)),
        host("b-half", allocated=Resources(4000, 8192, 0, 0)),
        host("c-quarter", allocated=Resources(2000, 4096, 0, 0)),
        host("d-empty-large"),
    ]
    request = PlacementRequest(Resources(1000, 1024))
    assert winner(hosts, request, only("resource_fit")) == "b-half"
    empty = [hosts[0], hosts[3]]
    assert winner(empty, request, only("resource_fit")) == "d-empty-large"


def test_spread_picks_the_emptiest_host() -> None:
    hosts = [host("a", allocated=Resources(4000, 8192, 0, 0)), host("b")]
    config = only("resource_fit", fit_strategy=FitStrategy.SPREAD)
    assert winner(hosts, PlacementRequest(Resources(1000, 1024)), config) == "b"


def test_load_forecast_avoids_the_host_whose_load_is_rising() -> None:
    hours = np.arange(72)
    daily = 0.1 * np.sin(2 * np.pi * hours / 24)
    rising = tuple((0.2 + 0.008 * hours + daily).tolist())  # ends near 0.77 and climbing
    falling = tuple((0.8 - 0.006 * hours + daily).tolist())  # ends near 0.37 and falling
    history = {"a-rising": rising, "b-falling": falling}
    hosts = [
        host(name, utilization_history={"vcpus": series, "memory": series, "net": series})
        for name, series in history.items()
    ]
    explanation = PlacementEngine(FleetSnapshot(hosts), only("load_forecast")).explain(
        PlacementRequest(Resources(500, 512))
    )
    assert explanation.winner == "b-falling"
    raw = {row.host: row.raw["load_forecast"] for row in explanation.scores}
    assert raw["b-falling"] - raw["a-rising"] > 0.1


def test_interference_avoids_neighbours_pressing_on_what_the_request_needs() -> None:
    net_heavy = InstanceUsage(Resources(1000, 1024, 0, 200), net_mbps=200)  # at its limit
    cpu_heavy = InstanceUsage(Resources(4000, 1024, 0, 100), cpu_millicores=3900)
    hosts = [
        host("a-net-noisy", neighbours=(net_heavy,)),
        host("b-cpu-noisy", neighbours=(cpu_heavy,)),
    ]
    config = only("interference")
    assert winner(hosts, PlacementRequest(Resources(100, 128, 0, 500)), config) == "b-cpu-noisy"
    assert winner(hosts, PlacementRequest(Resources(4000, 128, 0, 0)), config) == "a-net-noisy"
    assert neighbour_pressure((net_heavy,), CAP)[2] == pytest.approx(2 * 200 / 1000)


def test_image_locality_prefers_cached_bytes() -> None:
    hosts = [
        host("a-small-layer", cached_layers=frozenset({"sha256:small"})),
        host("b-big-layer", cached_layers=frozenset({"sha256:big"})),
        host("c-nothing"),
    ]
    request = PlacementRequest(
        Resources(100, 128), image_layers={"sha256:small": 10, "sha256:big": 90}
    )
    explanation = PlacementEngine(FleetSnapshot(hosts), only("image_locality")).explain(request)
    assert explanation.winner == "b-big-layer"
    assert {r.host: r.raw["image_locality"] for r in explanation.scores} == {
        "b-big-layer": 0.9,
        "a-small-layer": 0.1,
        "c-nothing": 0.0,
    }


def test_models_without_data_stay_out_of_the_weighted_mean() -> None:
    explanation = PlacementEngine(FleetSnapshot([host("a")])).explain(
        PlacementRequest(Resources(100, 128))
    )
    assert set(explanation.weights) == {"resource_fit"}  # no history, neighbours, layers, groups


def test_normalization_modes() -> None:
    raw = np.array([0.2, 0.5, 2.0, 0.8])
    feasible = np.array([True, True, False, True])
    assert normalize_over(raw, feasible, Normalization.ABSOLUTE).tolist() == [20, 50, 100, 80]
    scaled = normalize_over(raw, feasible, Normalization.MIN_MAX)
    assert scaled[[0, 1, 3]].tolist() == pytest.approx([0, 50, 100])  # bounds from feasible
    tie = normalize_over(np.ones(3), np.ones(3, dtype=bool), Normalization.MIN_MAX)
    assert tie.tolist() == [100, 100, 100]


def test_weights_decide_between_models_and_totals_are_weighted_means() -> None:
    hosts = [
        host("a-full-nocache", allocated=Resources(6000, 12288, 0, 0)),
        host("b-empty-cached", cached_layers=frozenset({"sha256:l"})),
    ]
    request = PlacementRequest(Resources(1000, 1024), image_layers={"sha256:l": 1})
    fit_heavy = SchedulerConfig(weights={"resource_fit": 5, "image_locality": 1})
    cache_heavy = SchedulerConfig(weights={"resource_fit": 1, "image_locality": 5})
    assert winner(hosts, request, fit_heavy) == "a-full-nocache"
    assert winner(hosts, request, cache_heavy) == "b-empty-cached"
    explanation = PlacementEngine(FleetSnapshot(hosts), cache_heavy).explain(request)
    top = explanation.scores[0]
    expected = (1 * top.normalized["resource_fit"] + 5 * top.normalized["image_locality"]) / 6
    assert top.total == pytest.approx(expected, abs=1e-2)
    assert "image_locality" in explanation.render() and "winner: b-empty-cached" in (
        explanation.render()
    )


def test_ties_go_to_the_first_host_by_name() -> None:
    hosts = [host("c"), host("a"), host("b")]
    assert winner(hosts, PlacementRequest(Resources(100, 100)), SchedulerConfig()) == "a"


def test_config_from_operator_settings() -> None:
    config = SchedulerConfig.from_mapping(
        {"weights": {"interference": 0, "resource_fit": 2}, "fit_strategy": "spread"},
        known_models(),
    )
    assert config.weight("interference") == 0 and config.weight("resource_fit") == 2
    assert config.fit_strategy == FitStrategy.SPREAD
    with pytest.raises(InvalidInput, match="unknown scoring model 'intereference'"):
        SchedulerConfig.from_mapping({"weights": {"intereference": 1}}, known_models())
    with pytest.raises(InvalidInput, match="fit_strategy"):
        SchedulerConfig.from_mapping({"fit_strategy": "random"}, known_models())


def test_agent_metrics_become_fractions_of_capacity() -> None:
    metrics = {"cpu_millicores": 2000.0, "memory_mib": 4096.0, "net_mbps": 100.0}
    assert utilization_from_metrics(metrics, CAP) == {"vcpus": 0.25, "memory": 0.25, "net": 0.1}


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[HostCandidate], list[PlacementRequest]]:
    count = draw(st.integers(1, 12))
    hosts = []
    for i in range(count):
        cap = Resources(draw(st.sampled_from([4000, 8000])), 8192, 100, 1000)
        series = tuple(draw(st.lists(st.floats(0, 1), min_size=0, max_size=30)))
        hosts.append(
            host(
                f"h{i:02d}",
                capacity=cap,
                allocated=Resources(draw(st.integers(0, 2000)), draw(st.integers(0, 4096))),
                cached_layers=frozenset(draw(st.sets(st.sampled_from("xyz")))),
                utilization_history={"vcpus": series} if series else {},
                neighbours=(InstanceUsage(Resources(1000, 1024), cpu_millicores=500.0),)
                if draw(st.booleans())
                else (),
            )
        )
    flavours = [Resources(500, 512, 1, 10), Resources(1000, 2048), Resources(250, 256, 0, 50)]
    requests = [
        PlacementRequest(
            draw(st.sampled_from(flavours)),
            image_layers={layer: 1 for layer in draw(st.sets(st.sampled_from("xyz")))},
        )
        for _ in range(draw(st.integers(1, 25)))
    ]
    return hosts, requests


@settings(max_examples=40, deadline=None)
@given(fleets())
def test_cached_engine_decides_like_a_fresh_one(
    case: tuple[list[HostCandidate], list[PlacementRequest]],
) -> None:
    """The shape caches (scores and fits, patched at changed hosts) never go stale."""
    hosts, requests = case
    cached = PlacementEngine(FleetSnapshot(hosts))
    fleet = cached.fleet
    forecast = fleet.forecast_peak.copy()
    for request in requests:
        # the derived arrays never drift from (or alias) what they derive from
        assert (fleet.free == fleet.capacity - fleet.allocated).all()
        assert (fleet.free_by_host == fleet.free.T).all()
        assert (fleet.forecast_peak == forecast).all()
        fresh = PlacementEngine(cached.fleet.copy())  # empty caches, same state
        try:
            expected = fresh.place(request, explain=False).host.name
        except Exception as error:  # noqa: BLE001 - both must fail alike
            with pytest.raises(type(error)):
                cached.place(request, explain=False)
            continue
        assert cached.place(request, explain=False).host.name == expected


def test_every_model_scores_a_subset_like_the_whole() -> None:
    hosts = [
        host(
            f"h{i}",
            allocated=Resources(500 * i, 1024 * i),
            cached_layers=frozenset({"sha256:a"}) if i % 2 else frozenset(),
            utilization_history={"vcpus": (0.1 * i, 0.2, 0.3)},
            neighbours=(InstanceUsage(Resources(100, 100), cpu_millicores=90.0 * i),),
        )
        for i in range(6)
    ]
    fleet = FleetSnapshot(hosts)
    request = PlacementRequest(Resources(700, 900, 1, 5), image_layers={"sha256:a": 3})
    cycle = prepare(fleet, request)
    subset = np.array([4, 1, 5])
    for cls in model_classes().values():
        model = cls(SchedulerConfig())
        if model.applies(cycle):
            whole = np.asarray(model.score(cycle, ALL))
            assert np.allclose(model.score(cycle, subset), whole[subset]), cls.name
            assert ((whole >= 0) & (whole <= 1)).all(), cls.name


@pytest.mark.parametrize("count", [1, 2])
def test_derived_arrays_own_their_memory(count: int) -> None:
    """A (4, 1) array's transpose is already contiguous: copies must still be copies."""
    fleet = FleetSnapshot(
        [host(f"h{i}", utilization_history={"vcpus": (0.5, 0.5)}) for i in range(count)]
    )
    forecast = fleet.forecast_peak.copy()
    engine = PlacementEngine(fleet)
    for _ in range(3):
        engine.place(PlacementRequest(Resources(1000, 1024, 1, 1)), explain=False)
    assert (fleet.free == fleet.capacity - fleet.allocated).all()
    assert (fleet.free_by_host == fleet.free.T).all()
    assert (fleet.forecast_peak == forecast).all()
