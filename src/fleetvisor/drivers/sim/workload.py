"""A seeded workload model: what a simulated instance uses at time t.

CPU use, as a fraction of the allocation, is a daily cycle plus an AR(1)-like noise
that changes every `step` seconds; memory grows towards a working set and then
wobbles. Everything is a pure function of (seed, instance id, t), so a restarted
agent or a replayed simulation sees the same numbers.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WorkloadProfile:
    cpu_base: float  # mean fraction of the CPU allocation in use
    cpu_amplitude: float  # daily swing around the mean
    cpu_phase: float  # radians
    memory_working_set: float  # fraction of the memory allocation
    net_base: float  # fraction of the net allocation


class WorkloadModel:
    DAY = 86_400.0

    def __init__(self, seed: int = 0, step: float = 10.0) -> None:
        self.seed = seed
        self.step = step

    def profile(self, instance_id: str) -> WorkloadProfile:
        rng = np.random.default_rng([self.seed, _stable_hash(instance_id)])
        base = float(rng.uniform(0.15, 0.6))
        return WorkloadProfile(
            cpu_base=base,
            # The daily swing stays within the mean: a running instance never idles to
            # zero for hours (noise can still touch zero for a sample).
            cpu_amplitude=base * float(rng.uniform(0.2, 0.8)),
            cpu_phase=float(rng.uniform(0, 2 * math.pi)),
            memory_working_set=float(rng.uniform(0.3, 0.85)),
            net_base=float(rng.uniform(0.01, 0.2)),
        )

    def usage(self, instance_id: str, t: float, age: float) -> dict[str, float]:
        """Fractions of the allocation in use: cpu, memory, net (each in [0, 1])."""
        p = self.profile(instance_id)
        bucket = int(t // self.step)
        noise = np.random.default_rng([self.seed, _stable_hash(instance_id), bucket]).normal(
            0, 0.05, 3
        )
        cpu = p.cpu_base + p.cpu_amplitude * math.sin(2 * math.pi * t / self.DAY + p.cpu_phase)
        warmup = 1.0 - math.exp(-max(age, 0.0) / 60.0)
        memory = p.memory_working_set * (0.3 + 0.7 * warmup)
        net = p.net_base * (1 + cpu)
        values = np.clip(np.array([cpu, memory, net]) + noise, 0.0, 1.0)
        return {"cpu": float(values[0]), "memory": float(values[1]), "net": float(values[2])}


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


# -- injected faults ----------------------------------------------------------------------

LEVEL_FAULTS = {"throttled", "cpu_wait", "memory", "probe"}  # hold from their time on
EVENT_FAULTS = {"oom", "exit"}  # happen once, at their time
PROBE_ANSWERS = ("ok", "fail", "timeout")
FAULTS_HELP = (
    "use name[=value][@seconds];... with names throttled=<share 0-1>, "
    "cpu_wait=<cpu-seconds per second>, memory=<fraction of the allocation>, oom[=<kills>], "
    "exit, probe=ok|fail|timeout; e.g. throttled=0.8@5;oom@8;exit@12"
)


class FaultSchedule:
    """What goes wrong in a simulated instance, by seconds since its latest start.

    A level fault (throttled, cpu_wait, memory, probe) holds from its time until the next
    entry of the same name; an event fault (oom, exit) happens once, at its time.
    Everything is a pure function of the time since the start, like the workload model.
    """

    def __init__(self, text: str = "") -> None:
        self.levels: dict[str, list[tuple[float, float | str]]] = {}
        self.events: dict[str, list[tuple[float, float]]] = {}
        for entry in filter(None, (part.strip() for part in text.split(";"))):
            self._add(text, entry)
        for steps in self.levels.values():
            steps.sort(key=lambda step: step[0])
        for happenings in self.events.values():
            happenings.sort()

    def _add(self, text: str, entry: str) -> None:
        head, _, when = entry.partition("@")
        name, has_value, value = head.strip().partition("=")
        name, value = name.strip(), value.strip()
        try:
            at = float(when) if when.strip() else 0.0
            if not at >= 0 or at == float("inf"):
                raise ValueError
            if name == "probe":
                if value not in PROBE_ANSWERS:
                    raise ValueError
                self.levels.setdefault(name, []).append((at, value))
            elif name in LEVEL_FAULTS:
                amount = float(value)
                if not 0 <= amount < float("inf"):
                    raise ValueError
                self.levels.setdefault(name, []).append((at, amount))
            elif name in EVENT_FAULTS:
                if name == "exit" and has_value:
                    raise ValueError
                count = float(value) if has_value else 1.0
                if not 0 < count < float("inf"):
                    raise ValueError
                self.events.setdefault(name, []).append((at, count))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"sim faults {text!r}: cannot read {entry!r}: {FAULTS_HELP}") from None

    def level(self, name: str, t: float, default: float | str) -> float | str:
        """The level in force `t` seconds after the start (default before its first entry)."""
        value = default
        for at, step in self.levels.get(name, []):
            if t >= at:
                value = step
        return value

    def integral(self, name: str, t: float) -> float:
        """∫ level dt from the start to `t` (a numeric level; 0 before its first entry)."""
        total = 0.0
        steps = self.levels.get(name, [])
        for i, (at, amount) in enumerate(steps):
            if at >= t:
                break
            end = min(t, steps[i + 1][0]) if i + 1 < len(steps) else t
            total += float(amount) * max(0.0, end - at)
        return total

    def count(self, name: str, t: float) -> float:
        """Events of this name that happened by `t` (with their counts)."""
        return sum(count for at, count in self.events.get(name, []) if at <= t)

    def first(self, name: str) -> float | None:
        happenings = self.events.get(name)
        return happenings[0][0] if happenings else None
