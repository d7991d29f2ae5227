"""Operator settings of the engine: scoring weights, bin-pack or spread, forecast window.

A weight of 0 turns a scoring model off. Unknown model names are refused, so a typo in
the controller's settings fails at start rather than silently weighting nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from fleetvisor.errors import InvalidInput


class FitStrategy(StrEnum):
    BINPACK = "binpack"  # fill hosts: fewer hosts used, more room for large instances
    SPREAD = "spread"  # even out utilization: smaller blast radius, less contention


DEFAULT_WEIGHTS: dict[str, float] = {
    "resource_fit": 3.0,
    "load_forecast": 1.0,
    "interference": 1.0,
    "image_locality": 1.0,
    "group_preference": 5.0,  # soft placement-group constraints
}


@dataclass(frozen=True, slots=True)
class ForecastConfig:
    """Holt-Winters settings. Histories are sampled every `sample_interval_s`."""

    sample_interval_s: float = 3600.0
    season_length: int = 24  # samples per season (a day of hourly samples)
    horizon: int = 3  # samples ahead: the window the load-forecast model looks at
    alpha: float = 0.5  # level smoothing
    beta: float = 0.1  # trend smoothing
    gamma: float = 0.3  # seasonal smoothing
    damping: float = 0.98  # damped trend: forecasts flatten instead of running away
    fit: bool = False  # pick (alpha, beta, gamma) per host from a small grid (slower)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    fit_strategy: FitStrategy = FitStrategy.BINPACK
    forecast: ForecastConfig = ForecastConfig()
    explain_top_k: int = 5  # rows of the score table in an explanation
    explain_examples: int = 3  # example hosts named per filter reason

    def weight(self, model: str) -> float:
        return float(self.weights.get(model, 0.0))

    def with_weights(self, **weights: float) -> SchedulerConfig:
        """A copy where only the named models count (others weigh 0)."""
        return replace(self, weights=dict(weights))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], known_models: frozenset[str]) -> SchedulerConfig:
        """Settings as an operator writes them: {"weights": {...}, "fit_strategy": ...}."""
        weights = dict(DEFAULT_WEIGHTS)
        for name, value in dict(data.get("weights", {})).items():
            if name not in known_models:
                raise InvalidInput(
                    f"unknown scoring model {name!r} in scheduler weights; "
                    f"known: {sorted(known_models)}"
                )
            if float(value) < 0:
                raise InvalidInput(f"scheduler weight of {name!r} must be >= 0, got {value}")
            weights[name] = float(value)
        try:
            strategy = FitStrategy(data.get("fit_strategy", FitStrategy.BINPACK))
        except ValueError:
            raise InvalidInput(
                f"fit_strategy must be one of {[s.value for s in FitStrategy]}"
            ) from None
        forecast = ForecastConfig(**dict(data.get("forecast", {})))
        return cls(weights=weights, fit_strategy=strategy, forecast=forecast)
