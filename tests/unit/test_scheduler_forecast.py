"""Load forecast: Holt-Winters beats the last sample on series with trend and seasonality."""

from __future__ import annotations

import numpy as np
import pytest

from fleetvisor.model.resources import Resources
from fleetvisor.scheduler import FleetSnapshot, ForecastConfig, HostCandidate
from fleetvisor.scheduler.forecast import Smoothing, fit_holt_winters, holt_winters, window_peak

SEASON = 24
HORIZON = 6


def synthetic(series: int, hours: int, seed: int = 0) -> np.ndarray:
    """Utilization with a daily cycle, a drift and noise, one row per host."""
    rng = np.random.default_rng(seed)
    t = np.arange(hours)
    base = rng.uniform(0.2, 0.5, (series, 1))
    trend = rng.uniform(-0.003, 0.004, (series, 1))
    amplitude = rng.uniform(0.05, 0.25, (series, 1))
    phase = rng.uniform(0, 2 * np.pi, (series, 1))
    noise = rng.normal(0, 0.02, (series, hours))
    return np.asarray(base + trend * t + amplitude * np.sin(2 * np.pi * t / SEASON + phase) + noise)


def mae_against_last_sample(forecaster: str) -> tuple[float, float]:
    data = synthetic(500, 7 * SEASON + HORIZON)
    train, test = data[:, :-HORIZON], data[:, -HORIZON:]
    if forecaster == "fixed":
        forecast, _ = holt_winters(train, HORIZON, SEASON, Smoothing(0.5, 0.1, 0.3))
    else:
        forecast, _ = fit_holt_winters(train, HORIZON, SEASON)
    model = float(np.abs(forecast - test).mean())
    last = float(np.abs(train[:, -1:] - test).mean())
    return model, last


@pytest.mark.parametrize("forecaster", ["fixed", "fitted"])
def test_holt_winters_beats_the_last_sample(forecaster: str) -> None:
    model, last = mae_against_last_sample(forecaster)
    assert model < 0.5 * last, (model, last)


def test_fitting_the_smoothing_constants_does_not_lose_to_fixed_ones() -> None:
    fixed, _ = mae_against_last_sample("fixed")
    fitted, _ = mae_against_last_sample("fitted")
    assert fitted <= fixed * 1.05


def test_a_pure_daily_cycle_is_predicted_closely() -> None:
    t = np.arange(6 * SEASON + SEASON)
    series = 0.5 + 0.3 * np.sin(2 * np.pi * t / SEASON)
    forecast, _ = holt_winters(
        series[None, : 6 * SEASON], SEASON, SEASON, Smoothing(0.3, 0.05, 0.3)
    )
    assert np.abs(forecast[0] - series[6 * SEASON :]).max() < 0.03


def test_short_history_falls_back_to_holt_then_to_the_sample() -> None:
    ramp = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])  # less than two seasons: no seasonal term
    forecast, _ = holt_winters(ramp, 2, SEASON, Smoothing(0.5, 0.5, 0.3, damping=1.0))
    assert forecast[0].tolist() == pytest.approx([0.6, 0.7], abs=0.05)
    single, _ = holt_winters(np.array([[0.4]]), 3, SEASON, Smoothing(0.5, 0.1, 0.3))
    assert single.tolist() == [[0.4, 0.4, 0.4]]
    empty, _ = holt_winters(np.zeros((2, 0)), 3, SEASON, Smoothing(0.5, 0.1, 0.3))
    assert empty.shape == (2, 3)


def test_window_peak_is_the_highest_prediction_clipped() -> None:
    assert window_peak(
        np.array([[0.1, 0.7, 0.3], [-0.2, -0.1, 0.0], [2.0, 3.0, 1.0]])
    ).tolist() == [
        0.7,
        0.0,
        1.5,
    ]


def test_snapshot_forecasts_per_host_and_falls_back_to_allocation() -> None:
    cap = Resources(8000, 16384, 100, 1000)
    hours = 3 * SEASON
    busy = tuple([0.9] * hours)
    hosts = [
        HostCandidate(
            "a",
            "a",
            "ready",
            "sim",
            cap,
            Resources(),
            0,
            utilization_history={"vcpus": busy, "memory": busy, "net": busy},
        ),
        HostCandidate("b", "b", "ready", "sim", cap, Resources(2000, 8192, 0, 0), 0),
    ]
    fleet = FleetSnapshot(hosts, forecast=ForecastConfig(season_length=SEASON, horizon=2))
    assert fleet.forecast_peak[:, 0] == pytest.approx([0.9, 0.9, 0.9], abs=1e-6)
    assert fleet.forecast_peak[:, 1].tolist() == [0.25, 0.5, 0.0]  # allocated / capacity
    assert fleet.has_history
