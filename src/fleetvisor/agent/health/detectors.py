"""Detectors: one small class per issue a host can see in one of its instances.

Each detector is fed one `Sample` per sampling tick (the instance's state and counters,
and what its neighbours on the host use) and answers a `Detection` when its issue is
confirmed, else None. A detection carries its evidence: the measured values, the
threshold and the window. A detector fires once per episode: it re-arms only after its
condition cleared, so a lasting problem is reported once, not at every tick.

    sustained (hold_s):  cpu_throttled, memory_pressure, noisy_neighbour
    at once:             oom_killed (the counter grew), exited (not running, but should)
    from probe results:  probe_failed (a liveness probe's status turned "failed")

Counters are cumulative (they restart with the instance): rates are taken over the
last `window` seconds, and a counter that goes back resets its window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from fleetvisor.model.health import Detection, Detectors, Issue, Probe


@dataclass(frozen=True)
class Neighbour:
    """Another instance running on the same host, with its CPU use now."""

    id: str
    name: str
    cpu_millicores: float


@dataclass(frozen=True)
class Sample:
    """One reading of an instance, as the detectors see it."""

    instance: str  # id
    at: float  # monotonic seconds
    wall: float  # the host's wall clock (for the detection's `at`)
    state: str  # as the driver reports it: created | running | stopped
    usage: Mapping[str, float]  # the driver's usage figures and counters
    expect_running: bool = True  # nobody asked it to stop
    memory_allocated_mib: float = 0.0  # its spec's memory (when the driver has no limit)
    neighbours: tuple[Neighbour, ...] = ()  # the other running instances of this host
    host_capacity_millicores: float = 0.0

    @property
    def running(self) -> bool:
        return self.state == "running"

    def wall_of(self, monotonic: float) -> float:
        return self.wall - (self.at - monotonic)


class Detector(Protocol):
    issue: Issue

    def observe(self, sample: Sample) -> Detection | None: ...

    def reset(self, fresh: bool = False) -> None:
        """Conditions and rate windows start over. `fresh`: the instance was just
        (re)started, so its counters start from zero (a first reading is no baseline)."""


# -- building blocks ------------------------------------------------------------------------


@dataclass
class Held:
    """A condition that counts once it has held `hold_s`; fires once per episode."""

    hold_s: float
    since: float | None = None
    fired: bool = False

    def update(self, now: float, condition: bool | None) -> float | None:
        """Feed the condition now (None: not measurable now, nothing changes).
        Returns when the condition began, at the one update where it is confirmed."""
        if condition is None:
            return None
        if not condition:
            self.since, self.fired = None, False
            return None
        if self.since is None:
            self.since = now
        if not self.fired and now - self.since >= self.hold_s:
            self.fired = True
            return self.since
        return None

    def reset(self) -> None:
        self.since, self.fired = None, False


@dataclass
class CounterWindow:
    """Increments of cumulative counters over the last `window` seconds."""

    window: float
    readings: deque[tuple[float, tuple[float, ...]]] = field(default_factory=deque)

    def observe(self, now: float, values: tuple[float, ...]) -> tuple[float, tuple[float, ...]]:
        """(elapsed seconds, increment of each counter) over the window; elapsed is 0 on
        the first reading and after a counter went back (the instance restarted)."""
        if self.readings and any(v < p for v, p in zip(values, self.readings[-1][1], strict=True)):
            self.readings.clear()
        self.readings.append((now, values))
        while len(self.readings) > 2 and now - self.readings[1][0] >= self.window:
            self.readings.popleft()
        began, first = self.readings[0]
        return now - began, tuple(v - f for v, f in zip(values, first, strict=True))

    def reset(self) -> None:
        self.readings.clear()


def _round(value: float) -> float:
    return round(float(value), 4)


def _detection(
    sample: Sample,
    issue: Issue,
    message: str,
    evidence: dict[str, float | str],
    since: float | None = None,
) -> Detection:
    return Detection(
        issue=issue,
        instance=sample.instance,
        at=sample.wall,
        since=sample.wall_of(since) if since is not None else None,
        message=message[:1000],
        evidence={k: v[:1000] if isinstance(v, str) else _round(v) for k, v in evidence.items()},
    )


# -- the detectors ---------------------------------------------------------------------------


class ThrottleDetector:
    """cpu_throttled: Δthrottled_periods / Δcpu_periods ≥ `throttled`, held `hold_s`.

    The instance wanted more CPU than its CFS quota gives it: the remedy is a larger
    quota, not another host. An instance without a quota has no periods: never fires."""

    issue = Issue.CPU_THROTTLED

    def __init__(self, thresholds: Detectors, window: float) -> None:
        self.threshold = thresholds.throttled
        self.held = Held(thresholds.hold_s)
        self.counters = CounterWindow(window)
        self.share: float | None = None

    def observe(self, sample: Sample) -> Detection | None:
        periods = sample.usage.get("cpu_periods")
        throttled = sample.usage.get("throttled_periods")
        if not sample.running or periods is None or throttled is None:
            self.counters.reset()
            self.share = None
            self.held.update(sample.at, False)
            return None
        elapsed, (d_periods, d_throttled) = self.counters.observe(sample.at, (periods, throttled))
        if elapsed <= 0:
            return None
        self.share = min(1.0, d_throttled / d_periods) if d_periods > 0 else 0.0
        since = self.held.update(sample.at, self.share >= self.threshold)
        if since is None:
            return None
        held = sample.at - since
        return _detection(
            sample,
            self.issue,
            f"CPU throttled in {self.share:.0%} of CFS periods (threshold {self.threshold:.0%}) "
            f"for {held:.1f} s: the instance needs more CPU than its quota",
            {
                "throttled_share": self.share,
                "threshold": self.threshold,
                "held_s": held,
                "hold_s": self.held.hold_s,
                "window_s": elapsed,
                "throttled_periods": d_throttled,
                "cpu_periods": d_periods,
                "cpu_millicores": sample.usage.get("cpu_millicores", 0.0),
            },
            since,
        )

    def reset(self, fresh: bool = False) -> None:
        self.held.reset()
        self.counters.reset()
        self.share = None


class MemoryDetector:
    """memory_pressure: memory in use / its limit ≥ `memory`, held `hold_s`.

    In use is the working set where the driver reports one (page cache the kernel can
    drop does not count), else all memory charged to the instance. The limit is the
    driver's (`memory_limit_mib`), else the instance's allocation."""

    issue = Issue.MEMORY_PRESSURE

    def __init__(self, thresholds: Detectors) -> None:
        self.threshold = thresholds.memory
        self.held = Held(thresholds.hold_s)
        self.ratio: float | None = None

    def observe(self, sample: Sample) -> Detection | None:
        usage = sample.usage
        in_use = usage.get("memory_working_set_mib", usage.get("memory_mib"))
        limit = usage.get("memory_limit_mib") or sample.memory_allocated_mib
        if not sample.running or in_use is None or limit <= 0:
            self.ratio = None
            self.held.update(sample.at, False)
            return None
        self.ratio = in_use / limit
        since = self.held.update(sample.at, self.ratio >= self.threshold)
        if since is None:
            return None
        held = sample.at - since
        return _detection(
            sample,
            self.issue,
            f"memory in use {in_use:.0f} MiB is {self.ratio:.0%} of its {limit:.0f} MiB limit "
            f"(threshold {self.threshold:.0%}) for {held:.1f} s",
            {
                "memory_mib": in_use,
                "memory_limit_mib": limit,
                "ratio": self.ratio,
                "threshold": self.threshold,
                "held_s": held,
                "hold_s": self.held.hold_s,
            },
            since,
        )

    def reset(self, fresh: bool = False) -> None:
        self.held.reset()
        self.ratio = None


class OomDetector:
    """oom_killed: the kernel's OOM-kill counter of the instance grew.

    Fires at the reading that shows new kills; re-arms after a reading without new ones
    (a storm of kills is one episode). The first reading is the baseline."""

    issue = Issue.OOM_KILLED

    def __init__(self) -> None:
        self.last: float | None = None
        self.fired = False

    def observe(self, sample: Sample) -> Detection | None:
        kills = sample.usage.get("oom_kills")
        if kills is None:
            return None
        previous, self.last = self.last, kills
        if previous is None or kills < previous:  # baseline, or a new container
            self.fired = False
            return None
        if kills == previous:
            self.fired = False
            return None
        if self.fired:
            return None
        self.fired = True
        limit = sample.usage.get("memory_limit_mib") or sample.memory_allocated_mib
        return _detection(
            sample,
            self.issue,
            f"the kernel killed {kills - previous:.0f} process(es) of the instance for lack of "
            f"memory ({kills:.0f} since its start; limit {limit:.0f} MiB)",
            {
                "new_kills": kills - previous,
                "oom_kills": kills,
                "memory_limit_mib": limit,
                "memory_max_mib": sample.usage.get("memory_max_mib", 0.0),
                "state": sample.state,
            },
        )

    def reset(self, fresh: bool = False) -> None:
        self.last = 0.0 if fresh else None
        self.fired = False


class ExitDetector:
    """exited: the driver reports the instance not running while nobody asked it to stop.

    Fires at once; re-arms when the instance is seen running again."""

    issue = Issue.EXITED

    def __init__(self) -> None:
        self.fired = False
        self.last_running: float | None = None

    def observe(self, sample: Sample) -> Detection | None:
        if sample.running or not sample.expect_running:
            self.fired = False
            if sample.running:
                self.last_running = sample.at
            return None
        if self.fired:
            return None
        self.fired = True
        evidence: dict[str, float | str] = {"state": sample.state}
        if self.last_running is not None:
            evidence["last_seen_running_s_ago"] = sample.at - self.last_running
        return _detection(
            sample,
            self.issue,
            f"the instance is {sample.state} although nobody asked it to stop: "
            "its main process ended",
            evidence,
        )

    def reset(self, fresh: bool = False) -> None:
        self.fired = False


class NoisyNeighbourDetector:
    """noisy_neighbour: run-queue wait (CPU-seconds per second) ≥ `cpu_wait`, held.

    The instance was runnable but another task held the CPU. The evidence names the
    neighbour using the most CPU on this host and what all instances use together."""

    issue = Issue.NOISY_NEIGHBOUR

    def __init__(self, thresholds: Detectors, window: float) -> None:
        self.threshold = thresholds.cpu_wait
        self.held = Held(thresholds.hold_s)
        self.counters = CounterWindow(window)
        self.rate: float | None = None

    def observe(self, sample: Sample) -> Detection | None:
        wait = sample.usage.get("cpu_wait_seconds")
        if not sample.running or wait is None:
            self.counters.reset()
            self.rate = None
            self.held.update(sample.at, False)
            return None
        elapsed, (d_wait,) = self.counters.observe(sample.at, (wait,))
        if elapsed <= 0:
            return None
        self.rate = d_wait / elapsed
        since = self.held.update(sample.at, self.rate >= self.threshold)
        if since is None:
            return None
        held = sample.at - since
        own = sample.usage.get("cpu_millicores", 0.0)
        host = own + sum(n.cpu_millicores for n in sample.neighbours)
        evidence: dict[str, float | str] = {
            "cpu_wait": self.rate,
            "threshold": self.threshold,
            "held_s": held,
            "hold_s": self.held.hold_s,
            "window_s": elapsed,
            "cpu_millicores": own,
            "host_cpu_millicores": host,
            "host_capacity_millicores": sample.host_capacity_millicores,
        }
        message = (
            f"waited {self.rate:.2f} CPU-s/s on a run queue (threshold {self.threshold:.2f}) "
            f"for {held:.1f} s; instances on this host use {host:.0f} m"
        )
        if sample.host_capacity_millicores > 0:
            message += f" of {sample.host_capacity_millicores:.0f} m"
        if sample.neighbours:
            top = max(sample.neighbours, key=lambda n: n.cpu_millicores)
            evidence.update(
                neighbour=top.id,
                neighbour_name=top.name,
                neighbour_cpu_millicores=top.cpu_millicores,
            )
            message += (
                f"; the busiest neighbour, {top.name} ({top.id}), uses {top.cpu_millicores:.0f} m"
            )
        else:
            evidence["neighbour"] = ""
            message += "; no other instance runs here (the host's own processes hold the CPU)"
        return _detection(sample, self.issue, message, evidence, since)

    def reset(self, fresh: bool = False) -> None:
        self.held.reset()
        self.counters.reset()
        self.rate = None


class ProbeFailedDetector:
    """probe_failed: a liveness probe's status turned "failed" (failure_threshold
    consecutive failures). Re-arms when the probe is "ok" again (success_threshold)."""

    issue = Issue.PROBE_FAILED

    def observe_probe(
        self,
        instance: str,
        probe: Probe,
        target: str,
        failures: int,
        message: str,
        at: float,
        wall: float,
    ) -> Detection | None:
        """Called when a probe's status turned "failed"; readiness probes do not fire."""
        if probe.role != "liveness":
            return None
        sample = Sample(instance=instance, at=at, wall=wall, state="running", usage={})
        return _detection(
            sample,
            self.issue,
            f"liveness probe {target} failed {failures} times in a row: {message}",
            {
                "probe": probe.kind,
                "target": target,
                "failures": float(failures),
                "failure_threshold": float(probe.failure_threshold),
                "interval_s": probe.interval_s,
                "timeout_s": probe.timeout_s,
                "last_error": message,
            },
        )


def default_detectors(thresholds: Detectors, window: float) -> list[Detector]:
    """The counter and state detectors every watched instance gets."""
    return [
        ExitDetector(),
        OomDetector(),
        ThrottleDetector(thresholds, window),
        MemoryDetector(thresholds),
        NoisyNeighbourDetector(thresholds, window),
    ]
