"""Load forecast: additive Holt-Winters with a damped trend, vectorized over series.

Each row of `history` is one series (a host's CPU, memory or net utilization, oldest
first). One pass over time updates every series at once with numpy, so 10,000 hosts ×
3 metrics × a week of hourly samples costs tens of milliseconds.

    level_t    = α (y_t − season_{t−L}) + (1 − α)(level_{t−1} + φ trend_{t−1})
    trend_t    = β (level_t − level_{t−1}) + (1 − β) φ trend_{t−1}
    season_t   = γ (y_t − level_t) + (1 − γ) season_{t−L}
    ŷ_{T+k}    = level_T + (φ + … + φ^k) trend_T + season_{T+k−L}

With fewer than two seasons of history the seasonal term is dropped (Holt's linear
trend); with one sample the forecast is that sample. Why this model: it captures the
daily cycle and the drift of a host's load, costs O(T) per series with no fitting
library, and beats "the last sample" whenever the load has a cycle or a trend.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
from numpy.typing import NDArray

Floats = NDArray[np.float64]

# Candidate smoothing constants for `fit_holt_winters` (per series, by one-step SSE).
ALPHAS = (0.2, 0.5, 0.8)
BETAS = (0.02, 0.15)
GAMMAS = (0.1, 0.4)


@dataclass(frozen=True, slots=True)
class Smoothing:
    alpha: float | Floats
    beta: float | Floats
    gamma: float | Floats
    damping: float = 0.98


def holt_winters(
    history: Floats, horizon: int, season_length: int, smoothing: Smoothing
) -> tuple[Floats, Floats]:
    """Forecast `horizon` steps for every row.

    Returns (forecast (n, horizon), sum of squared one-step errors over the history (n,)).
    """
    series = np.asarray(history, dtype=np.float64)
    if series.ndim != 2:
        raise ValueError("history must be a 2-D array: one row per series")
    n, length = series.shape
    if horizon < 1:
        raise ValueError("horizon must be at least 1")
    if length == 0:
        return np.zeros((n, horizon)), np.zeros(n)
    if length == 1:
        return np.repeat(series[:, :1], horizon, axis=1), np.zeros(n)
    seasonal = season_length >= 2 and length >= 2 * season_length
    alpha, beta, gamma, phi = smoothing.alpha, smoothing.beta, smoothing.gamma, smoothing.damping
    sse = np.zeros(n)
    if seasonal:
        first = series[:, :season_length].mean(axis=1)
        second = series[:, season_length : 2 * season_length].mean(axis=1)
        level = first
        trend = (second - first) / season_length
        season = series[:, :season_length] - first[:, None]
        start = season_length
    else:
        level = series[:, 0].copy()
        trend = series[:, 1] - series[:, 0]
        season = np.zeros((n, 1))
        start = 1
    for t in range(start, length):
        slot = t % season_length if seasonal else 0
        y = series[:, t]
        previous = level
        damped = phi * trend
        error = y - (previous + damped + season[:, slot])
        sse += error * error
        level = alpha * (y - season[:, slot]) + (1 - alpha) * (previous + damped)
        trend = beta * (level - previous) + (1 - beta) * damped
        if seasonal:
            season[:, slot] = gamma * (y - level) + (1 - gamma) * season[:, slot]
    steps = np.arange(1, horizon + 1)
    damp_sum = np.cumsum(phi**steps)  # φ + φ² + … + φ^k
    forecast = level[:, None] + damp_sum[None, :] * trend[:, None]
    if seasonal:
        slots = (length + steps - 1) % season_length
        forecast = forecast + season[:, slots]
    return forecast, sse


def fit_holt_winters(
    history: Floats, horizon: int, season_length: int, damping: float = 0.98
) -> tuple[Floats, Floats]:
    """Holt-Winters with (α, β, γ) chosen per series from a small grid by one-step SSE.

    Every grid point runs over every series in one vectorized pass (series × grid rows).
    Returns (forecast (n, horizon), chosen parameters (n, 3)).
    """
    series = np.asarray(history, dtype=np.float64)
    n = series.shape[0]
    grid = np.array(list(product(ALPHAS, BETAS, GAMMAS)))
    stacked = np.repeat(series, len(grid), axis=0)
    params = np.tile(grid, (n, 1))
    forecast, sse = holt_winters(
        stacked,
        horizon,
        season_length,
        Smoothing(params[:, 0], params[:, 1], params[:, 2], damping),
    )
    best = sse.reshape(n, len(grid)).argmin(axis=1)
    rows = np.arange(n) * len(grid) + best
    return forecast[rows], grid[best]


def window_peak(forecast: Floats) -> Floats:
    """The highest predicted value over the window, clipped to [0, 1.5] (a fraction)."""
    if forecast.shape[1] == 0:
        return np.zeros(forecast.shape[0])
    return np.clip(forecast.max(axis=1), 0.0, 1.5)
