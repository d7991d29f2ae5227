"""Total points per request shape, recomputed only where allocations changed.

A `per_host` ABSOLUTE model's score of host h depends only on what the model's
`shape_key` names (the request's resources, its image layers) and on h itself. Models
that depend on the same part of the request (`depends_on`) form a group; per group and
shape the engine keeps the sum of the group's points over every host:

    static part   Σ points of models that do not read allocations (computed once)
    totals        static part + Σ points of models that do

At the next request of that shape only the hosts the snapshot's change log names
since (the hosts placements touched) are recomputed, and only for the models that
read allocations: a batch of thousands of instances of a few flavours rescores a
handful of hosts per placement instead of every host. Grouping by `depends_on` keeps
the entries few: 7 flavours and 40 images are 7 + 40 entries, not 280.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.fleet import ALL, Floats, Ints
from fleetvisor.scheduler.normalize import Normalization
from fleetvisor.scheduler.scoring import ScoringModel

ENTRIES = 256  # shapes kept: 256 × 10,000 hosts × 16 bytes = 41 MB at most
REBUILD_FRACTION = 8  # more than 1/8 of the hosts changed: recompute them all


def cacheable(model: ScoringModel) -> bool:
    return model.per_host and model.normalization == Normalization.ABSOLUTE


@dataclass(slots=True)
class ShapeScores:
    version: int  # the snapshot's version `totals` is current for
    models: tuple[ScoringModel, ...]  # the cached models that apply to this shape
    weight: float  # their weights' sum
    dynamic: tuple[tuple[ScoringModel, float], ...]  # (model, factor) reading allocations
    static: Floats  # Σ points of the others, every host
    totals: Floats  # static + Σ dynamic points, every host (read-only for callers)


class ScoreCache:
    def __init__(self, weighted: Sequence[tuple[ScoringModel, float]]) -> None:
        """`weighted`: the models and their weights (the cacheable ones are used)."""
        groups: dict[str, list[tuple[ScoringModel, float]]] = {}
        for model, weight in weighted:
            if cacheable(model):
                groups.setdefault(model.depends_on, []).append((model, weight))
        self.groups = list(groups.items())
        self._entries: OrderedDict[Hashable, ShapeScores] = OrderedDict()

    def scores(self, cycle: CycleState) -> list[ShapeScores]:
        """One current entry per group with a model that applies to the request."""
        found = []
        for name, members in self.groups:
            keys = tuple(m.shape_key(cycle) if m.applies(cycle) else None for m, _ in members)
            if any(k is not None for k in keys):
                found.append(self._current(cycle, (id(cycle.fleet), name, keys), members))
        return found

    def _current(
        self, cycle: CycleState, key: Hashable, members: list[tuple[ScoringModel, float]]
    ) -> ShapeScores:
        fleet = cycle.fleet
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _build(cycle, members)
            if len(self._entries) > ENTRIES:
                self._entries.popitem(last=False)
            return entry
        self._entries.move_to_end(key)
        if entry.version != fleet.version and not entry.dynamic:
            entry.version = fleet.version  # nothing here reads allocations
        elif entry.version != fleet.version:
            changed = fleet.changed_since(entry.version)
            if changed.size * REBUILD_FRACTION > len(fleet):
                entry = self._entries[key] = _build(cycle, members)
            else:
                _patch(cycle, entry, changed)
        return entry


def _build(cycle: CycleState, members: list[tuple[ScoringModel, float]]) -> ShapeScores:
    static = np.zeros(len(cycle.fleet))
    dynamic = []
    models = []
    weight = 0.0
    for model, w in members:
        if not model.applies(cycle):
            continue
        models.append(model)
        weight += w
        if model.reads_allocation:
            dynamic.append((model, 100.0 * w))
        else:
            static += np.multiply(model.score(cycle, ALL), 100.0 * w)
    totals = static.copy()
    for model, factor in dynamic:
        totals += np.multiply(model.score(cycle, ALL), factor)
    return ShapeScores(cycle.fleet.version, tuple(models), weight, tuple(dynamic), static, totals)


def _patch(cycle: CycleState, entry: ShapeScores, changed: Ints) -> None:
    totals = entry.static[changed]
    for model, factor in entry.dynamic:
        totals += model.score(cycle, changed) * factor
    entry.totals[changed] = totals
    entry.version = cycle.fleet.version
