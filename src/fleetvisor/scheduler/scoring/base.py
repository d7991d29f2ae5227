"""The scoring-model extension point: rank the hosts that passed every filter.

A model returns raw scores (higher is better) for `hosts`: every host (`ALL`, a slice,
so each array is a contiguous view) or a few host indexes. Written with `arr[hosts]`
and `arr[:, hosts]`, one body serves both.

A `per_host` model promises that host h's score depends only on what `shape_key`
returns for the request (by default its resources) and on h's own data and
allocation. The engine then keeps its scores per shape key and recomputes only the
hosts whose allocation changed since (`score_cache.py`): a handful per placement
instead of 10,000. A model that ignores allocations (`reads_allocation = False`)
is computed once per shape key.

The engine normalizes each model's scores (its `normalization`), weighs them with the
operator's weights, and sums them. An ABSOLUTE model must return values in [0, 1].
A model with nothing to say for a request (no image layers, no telemetry) returns
False from `applies` and is left out of the weighted mean.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import ClassVar

from fleetvisor.scheduler.config import SchedulerConfig
from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.fleet import Floats, Hosts
from fleetvisor.scheduler.normalize import Normalization


class ScoringModel(ABC):
    name: ClassVar[str]
    normalization: ClassVar[Normalization] = Normalization.ABSOLUTE
    per_host: ClassVar[bool] = True
    reads_allocation: ClassVar[bool] = True
    depends_on: ClassVar[str] = "resources"  # the part of the request shape_key reads

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    def applies(self, cycle: CycleState) -> bool:
        return True

    def shape_key(self, cycle: CycleState) -> Hashable:
        """What of the request the scores depend on (for `per_host` models)."""
        return cycle.need_key

    @abstractmethod
    def score(self, cycle: CycleState, hosts: Hosts) -> Floats:
        """Raw scores of `hosts`, higher is better (a new array or a read-only view)."""


class ShapeCache:
    """Arrays that depend only on a request's shape and on static host data, kept per shape.

    Requests repeat a few shapes (flavours), and a term such as request / capacity for
    every host does not change when instances are placed, so it is computed once per
    shape. Keyed by the identity of the static array it derives from, so a new snapshot
    never reads an old snapshot's terms (copies share static arrays, and the terms).
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._items: OrderedDict[tuple[int, Hashable], Floats] = OrderedDict()

    def get(self, source: object, key: Hashable, compute: Callable[[], Floats]) -> Floats:
        full = (id(source), key)
        found = self._items.get(full)
        if found is None:
            found = compute()
            found.flags.writeable = False
            self._items[full] = found
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(full)
        return found
