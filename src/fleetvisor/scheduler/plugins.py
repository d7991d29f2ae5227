"""Plugin discovery: every concrete subclass of a base class found in a package's modules.

This is what makes "adding a scoring model (or a filter) is one class in one file" true:
drop the file into `scheduler/scoring/` (or `scheduler/filters/`) and it is found.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType
from typing import Any


def discover(package: ModuleType, base: type[Any]) -> list[type[Any]]:
    """Concrete subclasses of `base` defined in the modules of `package`, by module name."""
    found: list[type[Any]] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(obj, base)
                and obj is not base
                and obj.__module__ == module.__name__
                and not inspect.isabstract(obj)
            ):
                found.append(obj)
    return found
