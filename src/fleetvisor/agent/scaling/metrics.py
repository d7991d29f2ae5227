"""Group metrics from driver stats: the parent and its siblings measured as one service.

Drivers report cumulative counters (CPU seconds, seconds throttled) where they have
them; a rate needs two readings, so each member keeps a short history and rates are
taken over the last `window` seconds. A driver without counters (the sim driver)
reports an instantaneous `cpu_millicores`, used as is.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fleetvisor.model.resources import Resources


@dataclass
class _History:
    readings: deque[tuple[float, float, float]] = field(default_factory=deque)  # t, cpu_s, thr_s

    def rates(
        self, now: float, cpu_s: float, throttled_s: float, window: float
    ) -> tuple[float, float] | None:
        self.readings.append((now, cpu_s, throttled_s))
        while len(self.readings) > 2 and now - self.readings[1][0] >= window:
            self.readings.popleft()
        first = self.readings[0]
        elapsed = now - first[0]
        if elapsed <= 0 or cpu_s < first[1]:  # first reading, or the counters restarted
            if cpu_s < first[1]:
                self.readings.clear()
                self.readings.append((now, cpu_s, throttled_s))
            return None
        return (cpu_s - first[1]) / elapsed, max(0.0, throttled_s - first[2]) / elapsed


class GroupSampler:
    def __init__(self, window: float = 1.0) -> None:
        self.window = window
        self._history: dict[str, _History] = {}

    def observe(
        self, now: float, stats: dict[str, dict[str, float]], allocations: dict[str, Resources]
    ) -> dict[str, float]:
        """cpu, memory and throttled for the group; a metric is absent until measurable."""
        for gone in set(self._history) - set(stats):
            del self._history[gone]
        cores_used = 0.0
        throttled = 0.0
        measured = 0
        memory_used = 0.0
        for member, figures in stats.items():
            if "cpu_usage_seconds" in figures:
                rates = self._history.setdefault(member, _History()).rates(
                    now,
                    figures["cpu_usage_seconds"],
                    figures.get("throttled_seconds", 0.0),
                    self.window,
                )
                if rates is None:
                    continue
                cores_used += rates[0]
                throttled += min(rates[1], 1.0)
            else:
                cores_used += figures.get("cpu_millicores", 0.0) / 1000
            measured += 1
            memory_used += figures.get("memory_mib", 0.0)
        allocated = Resources()
        for member in stats:
            allocated = allocated + allocations.get(member, Resources())
        values: dict[str, float] = {}
        if measured == len(stats) and stats:
            if allocated.vcpus > 0:
                values["cpu"] = cores_used * 1000 / allocated.vcpus
            values["throttled"] = throttled / measured
        if allocated.memory > 0:
            values["memory"] = memory_used / allocated.memory
        return values
