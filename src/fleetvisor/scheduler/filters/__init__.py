"""Filters (hard rules), one per file; every Filter subclass here is found automatically."""

from __future__ import annotations

import sys

from fleetvisor.scheduler.filters.base import Filter
from fleetvisor.scheduler.plugins import discover


def default_filters() -> list[Filter]:
    """One instance of every filter in this package, in their `order`."""
    classes: list[type[Filter]] = discover(sys.modules[__name__], Filter)
    return [cls() for cls in sorted(classes, key=lambda c: c.order)]


__all__ = ["Filter", "default_filters"]
