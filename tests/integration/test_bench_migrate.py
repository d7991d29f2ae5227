"""`fleetvisor bench migrate` end to end: a throwaway 2-host runc fleet, memcounter holding
16 MiB, one round of live migration, cold migration and bare CRIU.

Checks the JSON document's keys, that the state went along (the count carried on after
the live migration; /data travelled and the count began again after the cold one) and
that the figures are positive; no timing thresholds (those depend on the machine).
Needs root, runc, a working CRIU >= 4.1 (scripts/deps/criu.sh), busybox-static, nsenter
and gcc with a static libc.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetvisor.drivers.runc import PrerequisiteMissing, check_prerequisites

KEYS = {
    "live_downtime_ms",
    "cold_downtime_ms",
    "raw_criu_ms",
    "live_over_raw",
    "state_preserved",
    "memory_mib",
    "rounds",
    "samples",
    "package_bytes",
    "live_total_s",
    "cold_total_s",
    "target_ratio",
    "meets_target",
    "live_observed_gap_ms",
    "cold_observed_gap_ms",
}


def _missing_part() -> str | None:
    if os.geteuid() != 0:
        return "the migrate benchmark needs root (runc, CRIU, overlayfs, network namespaces)"
    try:
        check_prerequisites()
    except PrerequisiteMissing as exc:
        return str(exc)
    from fleetvisor.drivers.runc.driver import checkpoint_missing

    missing = checkpoint_missing()
    if missing:
        return missing
    if shutil.which("nsenter") is None:
        return "nsenter is missing (apt-get install util-linux)"
    if not os.access("/bin/busybox", os.X_OK):
        return "the memcounter image needs Debian's busybox-static"
    if shutil.which("gcc") is None or not Path("/usr/include/stdio.h").exists():
        return "memcounter is compiled here: apt-get install gcc libc6-dev"
    return None


MISSING = _missing_part()
if MISSING:
    print(f"\nskipping the migrate benchmark test: {MISSING}")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


@pytest.fixture
def temp_here(tmp_path: Path) -> Iterator[Path]:
    """The bench's temp dir lands in tmp_path, so anything it leaves shows."""
    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp_path)
    try:
        yield tmp_path
    finally:
        tempfile.tempdir = previous


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as info:
        return [line.split()[4] for line in info if line.split()[4].startswith(prefix)]


def test_migrate_bench_keeps_state_and_cleans_up(temp_here: Path) -> None:
    from fleetvisor.bench.migrate import MigrateBenchConfig, run_migrate_bench, summary_lines

    seen: list[str] = []
    result: dict[str, Any] = run_migrate_bench(
        MigrateBenchConfig(memory_mib=16, rounds=1), lambda what, _d, _t: seen.append(what)
    )
    print("\n" + "\n".join(summary_lines(result)))

    assert not KEYS - result.keys(), f"missing keys: {KEYS - result.keys()}"
    assert result["memory_mib"] == 16 and result["rounds"] == 1
    assert result["state_preserved"] is True, result["samples"]
    for key in ("live_downtime_ms", "cold_downtime_ms", "raw_criu_ms", "live_over_raw"):
        assert result[key] > 0, key
    assert result["live_total_s"] > 0 and result["cold_total_s"] > 0
    assert result["target_ratio"] == 1.5
    assert result["meets_target"] is (result["live_over_raw"] <= 1.5)
    # bare CRIU's images hold memcounter's 16 MiB; the product's package does not: the
    # pages went straight to the target's page server during the dump
    assert result["raw_image_bytes"] > 16 * 2**20
    assert 0 < result["package_bytes"] < 16 * 2**20

    (sample,) = result["samples"]
    live, cold, raw = sample["live"], sample["cold"], sample["raw"]
    assert live["source"] != live["target"] and cold["source"] == live["target"]
    assert cold["target"] == live["source"]  # every migration goes to the other host
    assert live["first_count_on_target"] > live["last_count_on_source"] > 1
    assert live["starts"] == []  # one process all along: no new start line
    assert cold["first_count_on_target"] == 1 and cold["starts"] == [2]  # /data travelled
    assert raw["counter_after_restore"] > raw["counter_at_dump"]
    assert raw["total_ms"] == pytest.approx(raw["dump_ms"] + raw["restore_ms"], abs=0.2)
    assert any("live migration" in what for what in seen)

    assert not list(temp_here.glob("fvbench-*")), "the bench left its temp dir behind"
    assert not _mounts_below(temp_here)
