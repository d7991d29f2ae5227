"""`fleetvisor bench launch` end to end: a throwaway runc fleet, busybox, two rounds.

Checks the JSON document's keys and that its values are consistent; no timing
thresholds (those depend on the machine). Needs root, runc and busybox-static.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetvisor.drivers.runc import PrerequisiteMissing, check_prerequisites

FLEETVISOR = str(Path(sys.executable).with_name("fleetvisor"))
MODES = ("cold", "cached", "raw_runc")
KEYS = {
    "image_bytes",
    "count",
    "layers",
    "cold_p50_ms",
    "cold_p95_ms",
    "cached_p50_ms",
    "cached_p95_ms",
    "raw_runc_p50_ms",
    "raw_runc_p95_ms",
    "cached_over_raw",
    "cold_over_cached",
    "cached_over_raw_target_met",
    "cold_over_cached_target_met",
    "cold_target_applies",
    "samples_ms",
}


def _missing_part() -> str | None:
    if os.geteuid() != 0:
        return "the launch benchmark needs root (runc, overlayfs, network namespaces)"
    try:
        check_prerequisites()
    except PrerequisiteMissing as exc:
        return str(exc)
    if not os.access("/bin/busybox", os.X_OK):
        return "the busybox image needs Debian's busybox-static: apt-get install busybox-static"
    return None


MISSING = _missing_part()
if MISSING:
    print(f"\nskipping the launch benchmark test: {MISSING}")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as info:
        return [line.split()[4] for line in info if line.split()[4].startswith(prefix)]


def _run_bench(tmp_path: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETVISOR_")}
    env["TMPDIR"] = str(tmp_path)  # the bench's temp dir lands here, so leftovers show
    done = subprocess.run(
        [FLEETVISOR, "bench", "launch", "--image", "busybox", "--count", "2", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_launch_bench_reports_every_mode_and_cleans_up(tmp_path: Path) -> None:
    result = _run_bench(tmp_path)

    assert not KEYS - result.keys(), f"missing keys: {KEYS - result.keys()}"
    assert result["count"] == 2
    assert result["layers"] == 1
    assert 100_000 < result["image_bytes"] < 30_000_000  # busybox: about 1 MB
    for mode in MODES:
        samples = result["samples_ms"][mode]
        assert len(samples) == 2 and all(s > 0 for s in samples)
        assert 0 < result[f"{mode}_p50_ms"] <= result[f"{mode}_p95_ms"] == max(samples)
    ratio = result["cached_p50_ms"] / result["raw_runc_p50_ms"]
    assert result["cached_over_raw"] == pytest.approx(ratio, rel=0.02)
    ratio = result["cold_p50_ms"] / result["cached_p50_ms"]
    assert result["cold_over_cached"] == pytest.approx(ratio, rel=0.02)
    assert result["cached_over_raw_target_met"] is (result["cached_over_raw"] <= 1.5)
    assert result["cold_target_applies"] is False  # under 30 MB: the cold target is moot
    assert result["cold_over_cached_target_met"] is None

    assert not list(tmp_path.glob("fvbench-*")), "the bench left its temp dir behind"
    assert not _mounts_below(tmp_path)
    assert not list(Path("/sys/fs/cgroup/memory").glob("fvbench-*"))
