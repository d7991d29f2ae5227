"""Scoring models, one per file; every ScoringModel subclass here is found automatically."""

from __future__ import annotations

import sys

from fleetvisor.scheduler.config import SchedulerConfig
from fleetvisor.scheduler.plugins import discover
from fleetvisor.scheduler.scoring.base import ScoringModel


def model_classes() -> dict[str, type[ScoringModel]]:
    classes: list[type[ScoringModel]] = discover(sys.modules[__name__], ScoringModel)
    return {cls.name: cls for cls in classes}


def known_models() -> frozenset[str]:
    return frozenset(model_classes())


def enabled_models(config: SchedulerConfig) -> list[ScoringModel]:
    """An instance of every model the operator gave a weight above 0, by name."""
    return [cls(config) for name, cls in sorted(model_classes().items()) if config.weight(name) > 0]


__all__ = ["ScoringModel", "enabled_models", "known_models", "model_classes"]
