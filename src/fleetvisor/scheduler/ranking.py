"""The Score stage: every applicable model, normalized, weighed and summed per host.

A model's contribution is its points: normalized score (0..100) × its weight; a host's
total is Σ points, and Σ points / Σ weights is the weighted mean shown to people
(0..100). Cacheable models (`per_host`, ABSOLUTE) come summed from the shape cache
(`score_cache.py`); the others are scored afresh. Per-model columns are built only
when an explanation asks for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fleetvisor.scheduler.config import SchedulerConfig
from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.fleet import ALL, Floats, Mask
from fleetvisor.scheduler.normalize import normalize_over
from fleetvisor.scheduler.score_cache import ScoreCache, cacheable
from fleetvisor.scheduler.scoring import ScoringModel


@dataclass(frozen=True, slots=True)
class ScoreColumn:
    model: str
    weight: float
    raw: Floats  # the model's own figures, every host
    normalized: Floats  # 0..100, every host


@dataclass(frozen=True, slots=True)
class Ranking:
    totals: Floats  # Σ points, every host (may be the cache's array: read only)
    weight_sum: float
    columns: tuple[ScoreColumn, ...] = ()  # only when asked for

    def mean(self, host: int) -> float:
        """The weighted mean score of one host, 0..100."""
        return float(self.totals[host] / self.weight_sum) if self.weight_sum > 0 else 0.0


class ScorePipeline:
    def __init__(self, models: Sequence[ScoringModel], config: SchedulerConfig) -> None:
        self.weighted = [(m, config.weight(m.name)) for m in models if config.weight(m.name) > 0]
        self.cache = ScoreCache(self.weighted)
        self.fresh = [(m, w) for m, w in self.weighted if not cacheable(m)]

    def rank(self, cycle: CycleState, feasible: Mask, *, columns: bool = False) -> Ranking:
        entries = self.cache.scores(cycle)
        weight_sum = sum(e.weight for e in entries)
        if not entries:
            totals = np.zeros(len(feasible))
        elif len(entries) == 1:
            totals = entries[0].totals
        else:
            totals = entries[0].totals + entries[1].totals
            for entry in entries[2:]:
                totals += entry.totals
        for model, weight in self.fresh:
            if model.applies(cycle):
                raw = np.asarray(model.score(cycle, ALL), dtype=np.float64)
                totals = totals + normalize_over(raw, feasible, model.normalization) * weight
                weight_sum += weight
        if not columns:
            return Ranking(totals, weight_sum)
        return Ranking(totals, weight_sum, self._columns(cycle, feasible))

    def _columns(self, cycle: CycleState, feasible: Mask) -> tuple[ScoreColumn, ...]:
        found = []
        for model, weight in self.weighted:
            if model.applies(cycle):
                raw = np.asarray(model.score(cycle, ALL), dtype=np.float64)
                mode = model.normalization
                found.append(
                    ScoreColumn(model.name, weight, raw, normalize_over(raw, feasible, mode))
                )
        return tuple(found)
