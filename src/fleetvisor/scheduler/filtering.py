"""The Filter stage: run the filters, fast (a mask) or explained (who rejected whom, why).

Fast path, per request:

    static filters  ── one mask per (filter, cache_key), and their AND per key tuple
    per_host filters ─ AND-ed in, kept per (static keys, request shape) and patched at
                       the hosts whose allocation changed since (the snapshot's log)
    other filters   ── evaluated afresh (placement groups, a batch's pinned domain)

The explained path runs every filter in order over what is still standing and turns
the rejections into FilterOutcome rows (counts per reason, a few named examples).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fleetvisor.scheduler.config import SchedulerConfig
from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.explain import FilterOutcome
from fleetvisor.scheduler.filters import Filter
from fleetvisor.scheduler.fleet import FleetSnapshot, Mask

CACHE_SIZE = 1024
T = TypeVar("T")


@dataclass(slots=True)
class _Fits:
    version: int
    static: Mask  # the static filters' AND
    mask: Mask  # static AND per_host filters, as of `version`


class FilterPipeline:
    def __init__(self, filters: Sequence[Filter], config: SchedulerConfig) -> None:
        self.filters = sorted(filters, key=lambda f: f.order)
        self.config = config
        self._static = [f for f in self.filters if f.static]
        self._per_host = [f for f in self.filters if f.per_host and not f.static]
        self._rest = [f for f in self.filters if not f.static and not f.per_host]
        self._masks: OrderedDict[Hashable, Mask | None] = OrderedDict()
        self._fits: OrderedDict[Hashable, _Fits] = OrderedDict()

    def feasible(self, cycle: CycleState) -> Mask:
        """Hosts passing every filter. May be a cached array: read it, never change it."""
        mask = self._fitting(cycle)
        for f in self._rest:
            admitted = f.admits(cycle, mask)
            if admitted is not None:
                mask = mask & admitted
        return mask

    def explain(self, cycle: CycleState, outcomes: list[FilterOutcome]) -> Mask:
        """Run every filter in order, appending who rejected which hosts and why."""
        fleet = cycle.fleet
        passed = np.ones(len(fleet), dtype=bool)
        examples = self.config.explain_examples
        for f in self.filters:
            admitted = self._static_mask(f, cycle) if f.static else f.admits(cycle, passed)
            if admitted is None:
                continue
            rejected = np.flatnonzero(passed & ~admitted)
            for reason, members in f.categories(cycle, rejected) if rejected.size else []:
                named = tuple(
                    (fleet.hosts[int(h)].name, f.reason(cycle, int(h))) for h in members[:examples]
                )
                outcomes.append(FilterOutcome(f.name, reason, int(members.size), named))
            passed &= admitted
        return passed

    def _fitting(self, cycle: CycleState) -> Mask:
        fleet = cycle.fleet
        keys = tuple(f.cache_key(cycle) for f in self._static)
        key = (id(fleet), keys, cycle.need_key)
        fits = self._fits.get(key)
        if fits is None:
            static = self._static_and(cycle, fleet, keys)
            mask = static.copy()
            for f in self._per_host:
                admitted = f.admits(cycle, mask)
                if admitted is not None:
                    mask &= admitted
            fits = _Fits(fleet.version, static, mask)
            _remember(self._fits, key, fits)
        elif fits.version != fleet.version:
            changed = fleet.changed_since(fits.version)
            passing = fits.static[changed]
            for f in self._per_host:
                passing &= f.verdict(cycle, changed)
            fits.mask[changed] = passing
            fits.version = fleet.version
        return fits.mask

    def _static_and(
        self, cycle: CycleState, fleet: FleetSnapshot, keys: tuple[Hashable, ...]
    ) -> Mask:
        mask = np.ones(len(fleet), dtype=bool)
        for f in self._static:
            admitted = self._static_mask(f, cycle)
            if admitted is not None:
                mask &= admitted
        return mask

    def _static_mask(self, f: Filter, cycle: CycleState) -> Mask | None:
        key = (id(cycle.fleet), f.name, f.cache_key(cycle))
        if key in self._masks:
            return self._masks[key]
        admitted = f.admits(cycle, np.ones(len(cycle.fleet), dtype=bool))
        _remember(self._masks, key, admitted)
        return admitted


def _remember(cache: OrderedDict[Hashable, T], key: Hashable, value: T) -> None:
    cache[key] = value
    if len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
