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
