"""The resource vector: exact integers, so sums and differences never drift.

vcpus are millicores (1000 = one CPU), memory MiB, disk GiB, net Mbit/s.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from fractions import Fraction

from fleetvisor.errors import InvalidInput

DIMENSIONS = ("vcpus", "memory", "disk", "net")
UNITS = {"vcpus": "millicores", "memory": "MiB", "disk": "GiB", "net": "Mbit/s"}


@dataclass(frozen=True, slots=True)
class Resources:
    vcpus: int = 0  # millicores
    memory: int = 0  # MiB
    disk: int = 0  # GiB
    net: int = 0  # Mbit/s

    def __post_init__(self) -> None:
        for name in DIMENSIONS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidInput(f"resource {name} must be an integer, got {value!r}")

    def __add__(self, other: Resources) -> Resources:
        return Resources(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def __sub__(self, other: Resources) -> Resources:
        return Resources(*(a - b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def __mul__(self, factor: int) -> Resources:
        return Resources(*(a * factor for a in self.as_tuple()))

    def fits_in(self, available: Resources) -> bool:
        """True when every dimension of self is <= the same one of available."""
        return all(a <= b for a, b in zip(self.as_tuple(), available.as_tuple(), strict=True))

    def is_nonnegative(self) -> bool:
        return all(v >= 0 for v in self.as_tuple())

    def shortfall(self, available: Resources) -> dict[str, int]:
        """The dimensions where self exceeds available, and by how much."""
        return {
            name: need - have
            for name, need, have in zip(
                DIMENSIONS, self.as_tuple(), available.as_tuple(), strict=True
            )
            if need > have
        }

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.vcpus, self.memory, self.disk, self.net)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> Resources:
        unknown = set(data) - set(DIMENSIONS)
        if unknown:
            raise InvalidInput(
                f"unknown resource dimension(s) {sorted(unknown)}; use {list(DIMENSIONS)}"
            )
        return cls(**{k: int(v) for k, v in data.items()})

    def describe(self) -> str:
        cpu = Fraction(self.vcpus, 1000)
        cpu_text = f"{float(cpu):g}" if cpu.denominator != 1 else str(cpu.numerator)
        return f"{cpu_text} cpu, {self.memory} MiB, {self.disk} GiB, {self.net} Mbit/s"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B?)?|(B))?\s*$", re.IGNORECASE)
_MIB_PER: dict[str, Fraction] = {
    "K": Fraction(1, 1024),
    "M": Fraction(1),
    "G": Fraction(1024),
    "T": Fraction(1024 * 1024),
}


def parse_size_mib(text: str | int, *, what: str = "memory", default_unit: str = "M") -> int:
    """'256M', '1G', '1.5Gi', '512' (MiB) -> MiB. Binary units; must be whole MiB."""
    if isinstance(text, int):
        return int(text * _MIB_PER[default_unit])
    match = _SIZE.match(text)
    if not match:
        raise InvalidInput(
            f"{what} {text!r} is not a size; write a number with an optional unit, e.g. 256M or 2G"
        )
    number = Fraction(match.group(1))
    if match.group(3):  # plain bytes
        mib = number / (1024 * 1024)
    else:
        mib = number * _MIB_PER[(match.group(2) or default_unit).upper()]
    if mib.denominator != 1:
        raise InvalidInput(f"{what} {text!r} is not a whole number of MiB; round it, e.g. 256M")
    return int(mib)


def parse_size_gib(text: str | int, *, what: str = "disk") -> int:
    """'500', '500G', '1T' -> GiB (a bare number is GiB)."""
    mib = parse_size_mib(text, what=what, default_unit="G")
    if mib % 1024:
        raise InvalidInput(f"{what} {text!r} is not a whole number of GiB; round it, e.g. 20G")
    return mib // 1024


def parse_cpu(text: str | float | int) -> int:
    """'0.5' -> 500 millicores, '2' -> 2000, '250m' -> 250."""
    raw = str(text).strip()
    try:
        milli = Fraction(raw[:-1]) if raw.endswith("m") else Fraction(raw) * 1000
    except (ValueError, ZeroDivisionError):
        raise InvalidInput(
            f"cpu {text!r} is not a number of CPUs; write e.g. 0.5, 2 or 250m (millicores)"
        ) from None
    if milli.denominator != 1:
        raise InvalidInput(f"cpu {text!r} is finer than a millicore; round it to 3 decimals")
    return int(milli)


def parse_capacity(text: str) -> dict[str, int]:
    """'cpu=2,memory=4G,disk=500,net=1000' -> {"vcpus": 2000, "memory": 4096, ...}: only
    the dimensions given ('' -> {}), for a driver to lay over what it measured."""
    values: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = (x.strip() for x in part.partition("="))
        if not sep:
            raise InvalidInput(f"capacity part {part!r} needs key=value, e.g. cpu=2,memory=4G")
        if key in ("cpu", "vcpus"):
            values["vcpus"] = parse_cpu(value)
        elif key == "memory":
            values["memory"] = parse_size_mib(value)
        elif key == "disk":
            values["disk"] = parse_size_gib(value)
        elif key == "net":
            if not value.isdigit():
                raise InvalidInput(f"net {value!r} is not a whole number of Mbit/s, e.g. net=1000")
            values["net"] = int(value)
        else:
            raise InvalidInput(f"unknown capacity key {key!r}; use cpu, memory, disk or net")
    return values
