"""NormalizeScore and weights: every model's raw scores onto 0..100, then a weighted mean.

- ABSOLUTE: the model's raw score is already a fraction in [0, 1] with a meaning of its
  own (utilization, share of image bytes cached): scaled to 0..100, so a tiny raw
  difference stays a tiny difference.
- MIN_MAX: the raw score only ranks hosts (a count, a penalty): rescaled so the best
  candidate gets 100 and the worst 0. When all candidates tie, all get 100.

The engine's total is Σ weight × normalized / Σ weight over the models that apply to
the request, so it stays in 0..100 whatever the operator's weights.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np

from fleetvisor.scheduler.fleet import Floats, Mask


class Normalization(StrEnum):
    ABSOLUTE = "absolute"
    MIN_MAX = "min_max"


def normalize_over(raw: Floats, feasible: Mask, mode: Normalization) -> Floats:
    """Scores of every host on 0..100; MIN_MAX bounds come from the feasible hosts."""
    if mode == Normalization.ABSOLUTE:
        return np.clip(raw, 0.0, 1.0) * 100.0
    if not feasible.any():
        return np.zeros(raw.shape)
    low, high = float(raw[feasible].min()), float(raw[feasible].max())
    if high - low <= 1e-12:
        return np.full(raw.shape, 100.0)
    return np.clip((raw - low) * (100.0 / (high - low)), 0.0, 100.0)
