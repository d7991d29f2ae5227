"""The Filter extension point: a hard rule that admits or rejects each host, with a reason.

A filter answers for all hosts at once (a boolean mask), so its cost is a few numpy
operations whatever the fleet size. Filters run in `order`; a rejected host's reason is
the first filter that rejected it.

- `static`: the answer depends only on the request and on host data placements do not
  change (state, driver, labels): the engine caches it per `cache_key`.
- `per_host`: the answer for host h depends only on the request's shape and on h's own
  allocation (capacity): the engine caches it per request shape and asks `verdict` again
  only for the hosts whose allocation changed since.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import ClassVar

import numpy as np

from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.fleet import Hosts, Ints, Mask


class Filter(ABC):
    name: ClassVar[str]
    order: ClassVar[int]
    static: ClassVar[bool] = False
    per_host: ClassVar[bool] = False

    def cache_key(self, cycle: CycleState) -> Hashable:
        """For static filters: the part of the request the mask depends on."""
        return None

    @abstractmethod
    def admits(self, cycle: CycleState, feasible: Mask) -> Mask | None:
        """Hosts this filter admits, as a mask over all hosts; None when it admits all.

        `feasible` is what earlier filters admitted (read-only), for filters whose rule
        depends on where else the instance could go.
        """

    def verdict(self, cycle: CycleState, hosts: Hosts) -> Mask:
        """For per_host filters: which of `hosts` pass (the admits answer, restricted)."""
        raise NotImplementedError(f"filter {self.name} is not per_host")

    @abstractmethod
    def reason(self, cycle: CycleState, host: int) -> str:
        """Why `host` was rejected, for a person: name the rule and the shortfall."""

    def summary(self, cycle: CycleState) -> str:
        """The reason shared by every host this filter rejected, for aggregate counts."""
        return self.name

    def categories(self, cycle: CycleState, rejected: Ints) -> list[tuple[str, Ints]]:
        """Split the hosts this filter rejected by reason (a capacity filter by dimension)."""
        return [(self.summary(cycle), rejected)]


def mask_of(n: int, hosts: Ints, value: bool = True) -> Mask:
    """A mask over n hosts that is `value` exactly at `hosts`."""
    mask = np.full(n, not value, dtype=bool)
    mask[hosts] = value
    return mask
