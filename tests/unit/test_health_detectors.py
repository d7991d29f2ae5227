"""Execution monitoring detectors: each fires after its hold (not before), carries its
evidence, fires once per episode and re-arms only after its condition cleared."""

from __future__ import annotations

from typing import Any

import pytest

from fleetvisor.agent.health.detectors import (
    CounterWindow,
    ExitDetector,
    Held,
    MemoryDetector,
    Neighbour,
    NoisyNeighbourDetector,
    OomDetector,
    ProbeFailedDetector,
    Sample,
    ThrottleDetector,
)
from fleetvisor.model.health import Detectors, Issue, Probe

THRESHOLDS = Detectors(hold_s=2.0, throttled=0.5, memory=0.9, cpu_wait=0.5)
WALL0 = 1_700_000_000.0


def sample(t: float, state: str = "running", expect: bool = True, **usage: float) -> Sample:
    return Sample(
        instance="victim",
        at=t,
        wall=WALL0 + t,
        state=state,
        usage=usage,
        expect_running=expect,
        memory_allocated_mib=256,
        neighbours=(Neighbour("hog", "cpu-hog", 1900.0), Neighbour("idle", "quiet", 5.0)),
        host_capacity_millicores=2000,
    )


def feed(detector: Any, samples: list[Sample]) -> list[tuple[float, Any]]:
    """(time, detection) for every sample that made the detector fire."""
    fired = []
    for s in samples:
        found = detector.observe(s)
        if found is not None:
            fired.append((s.at, found))
    return fired


def test_held_fires_once_after_the_hold_and_rearms_after_clearing() -> None:
    held = Held(2.0)
    assert held.update(0.0, True) is None
    assert held.update(1.9, True) is None
    assert held.update(2.0, True) == 0.0
    assert held.update(5.0, True) is None  # still the same episode
    assert held.update(5.5, None) is None  # not measurable: nothing changes
    assert held.update(6.0, False) is None
    assert held.update(7.0, True) is None
    assert held.update(9.0, True) == 7.0


def test_counter_window_restarts_when_a_counter_goes_back() -> None:
    window = CounterWindow(1.0)
    assert window.observe(0.0, (10.0,)) == (0.0, (0.0,))
    assert window.observe(0.5, (11.0,)) == (0.5, (1.0,))
    assert window.observe(1.0, (12.0,)) == (1.0, (2.0,))
    assert window.observe(1.5, (13.0,)) == (1.0, (2.0,))  # the oldest reading left
    assert window.observe(2.0, (0.5,)) == (0.0, (0.0,))  # a new container


def throttle_samples(shares: list[float], step: float = 0.5) -> list[Sample]:
    """Samples every `step` s; in each interval 5 periods pass, share of them throttled."""
    periods = throttled = 0.0
    out = [sample(0.0, cpu_periods=0, throttled_periods=0)]
    for i, share in enumerate(shares, start=1):
        periods += 5
        throttled += 5 * share
        out.append(sample(i * step, cpu_periods=periods, throttled_periods=throttled))
    return out


def test_throttle_fires_after_hold_not_before_and_rearms() -> None:
    detector = ThrottleDetector(THRESHOLDS, window=1.0)
    # 0.8 throttled from t=0.5 on: the condition holds from the first rate (t=0.5).
    fired = feed(detector, throttle_samples([0.8] * 8))
    assert [t for t, _ in fired] == [2.5]  # 0.5 + hold 2.0, once
    detection = fired[0][1]
    assert detection.issue == Issue.CPU_THROTTLED
    assert detection.evidence["throttled_share"] == pytest.approx(0.8)
    assert detection.evidence["threshold"] == 0.5 and detection.evidence["hold_s"] == 2.0
    assert detection.since == WALL0 + 0.5 and detection.at == WALL0 + 2.5

    detector = ThrottleDetector(THRESHOLDS, window=1.0)
    # held 1.5 s only, then clears, then comes back and holds: exactly one detection
    shares = [0.8] * 4 + [0.0] * 3 + [0.9] * 8
    fired = feed(detector, throttle_samples(shares))
    assert len(fired) == 1 and fired[0][0] > 5.0


def test_throttle_never_fires_without_a_quota() -> None:
    detector = ThrottleDetector(THRESHOLDS, window=1.0)
    samples = [sample(t * 0.5, cpu_periods=0, throttled_periods=0) for t in range(20)]
    assert feed(detector, samples) == []
    assert detector.share == 0.0


def test_memory_pressure_uses_the_working_set_and_the_limit() -> None:
    detector = MemoryDetector(THRESHOLDS)
    high = [sample(t * 0.5, memory_working_set_mib=95, memory_mib=120, memory_limit_mib=100)
            for t in range(8)]  # fmt: skip
    fired = feed(detector, high)
    assert [t for t, _ in fired] == [2.0]
    evidence = fired[0][1].evidence
    assert evidence["ratio"] == pytest.approx(0.95) and evidence["memory_limit_mib"] == 100
    # page cache above the limit alone is no pressure
    detector = MemoryDetector(THRESHOLDS)
    cache = [sample(t * 0.5, memory_working_set_mib=20, memory_mib=99, memory_limit_mib=100)
             for t in range(8)]  # fmt: skip
    assert feed(detector, cache) == []
    # without a driver limit, the allocation (256 MiB) is the limit
    detector = MemoryDetector(THRESHOLDS)
    fired = feed(detector, [sample(t * 0.5, memory_mib=250, memory_limit_mib=0) for t in range(6)])
    assert fired and fired[0][1].evidence["memory_limit_mib"] == 256


def test_oom_fires_on_new_kills_once_per_storm() -> None:
    detector = OomDetector()
    kills = [0, 0, 1, 1, 3, 5, 5, 6, 0, 1]
    fired = feed(detector, [sample(i * 0.5, oom_kills=k) for i, k in enumerate(kills)])
    # t=1.0 (0->1), t=2.0 (1->3; 3->5 is the same storm), t=3.5 (5->6), t=4.5 (new container)
    assert [t for t, _ in fired] == [1.0, 2.0, 3.5, 4.5]
    assert fired[1][1].evidence["new_kills"] == 2
    assert all(d.issue == Issue.OOM_KILLED and d.since is None for _, d in fired)
    # a count already there at the first reading is a baseline, not a detection
    detector = OomDetector()
    assert feed(detector, [sample(0, oom_kills=4), sample(0.5, oom_kills=4)]) == []


def test_exit_fires_only_when_nobody_asked_for_the_stop() -> None:
    detector = ExitDetector()
    samples = [
        sample(0.0),
        sample(0.5, state="stopped", expect=False),  # the agent stopped it
        sample(1.0, state="running"),
        sample(1.5, state="stopped"),  # it ended on its own
        sample(2.0, state="stopped"),  # same episode
        sample(2.5, state="running"),
        sample(3.0, state="stopped"),
    ]
    fired = feed(detector, samples)
    assert [t for t, _ in fired] == [1.5, 3.0]
    assert fired[0][1].evidence == {"state": "stopped", "last_seen_running_s_ago": 0.5}


def test_noisy_neighbour_names_the_busiest_neighbour() -> None:
    detector = NoisyNeighbourDetector(THRESHOLDS, window=1.0)
    # waits 0.8 CPU-s per s from the start
    samples = [sample(i * 0.5, cpu_wait_seconds=0.4 * i, cpu_millicores=400) for i in range(9)]
    fired = feed(detector, samples)
    assert [t for t, _ in fired] == [2.5]
    evidence = fired[0][1].evidence
    assert evidence["cpu_wait"] == pytest.approx(0.8)
    assert evidence["neighbour"] == "hog" and evidence["neighbour_name"] == "cpu-hog"
    assert evidence["neighbour_cpu_millicores"] == 1900
    assert evidence["host_cpu_millicores"] == pytest.approx(2305)
    assert evidence["host_capacity_millicores"] == 2000
    assert "cpu-hog" in fired[0][1].message
    # a wait below the threshold never fires
    detector = NoisyNeighbourDetector(THRESHOLDS, window=1.0)
    calm = [sample(i * 0.5, cpu_wait_seconds=0.1 * i) for i in range(20)]
    assert feed(detector, calm) == []


def test_a_stopped_instance_clears_sustained_conditions() -> None:
    detector = NoisyNeighbourDetector(THRESHOLDS, window=1.0)
    busy = [sample(i * 0.5, cpu_wait_seconds=0.4 * i) for i in range(4)]  # 1.5 s held
    gap = [sample(2.0, state="stopped", cpu_wait_seconds=0.0)]
    again = [sample(2.5 + i * 0.5, cpu_wait_seconds=0.4 * i) for i in range(6)]
    fired = feed(detector, busy + gap + again)
    assert [t for t, _ in fired] == [5.0]  # rate from 3.0 on, held 2 s after the restart


def test_probe_failed_fires_for_liveness_only() -> None:
    detector = ProbeFailedDetector()
    liveness = Probe(kind="tcp", port=80, failure_threshold=3)
    found = detector.observe_probe("i", liveness, "tcp 10.0.0.2:80", 3, "refused", 5.0, WALL0)
    assert found is not None and found.issue == Issue.PROBE_FAILED
    assert found.evidence["failures"] == 3 and found.evidence["last_error"] == "refused"
    readiness = Probe(kind="tcp", port=80, role="readiness")
    assert detector.observe_probe("i", readiness, "t", 3, "refused", 5.0, WALL0) is None
