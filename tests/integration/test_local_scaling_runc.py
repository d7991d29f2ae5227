"""Local scaling on real containers: `fleetvisor bench local-scaling` end to end with
short phases. A one-worker HTTP service (httpwork) in a runc container gets a sibling
when its CPU stays high and loses it when load falls; the controller records both,
no request fails, and the shares add up in the controller's rows and in the kernel's
cgroups. No timing thresholds here (those are the benchmark's). Needs root, runc,
busybox-static and gcc with a static libc.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetvisor.drivers.runc import PrerequisiteMissing, check_prerequisites

FLEETVISOR = str(Path(sys.executable).with_name("fleetvisor"))


def _missing_part() -> str | None:
    if os.geteuid() != 0:
        return "local scaling on runc needs root (runc, overlayfs, network namespaces)"
    try:
        check_prerequisites()
    except PrerequisiteMissing as exc:
        return str(exc)
    if not os.access("/bin/busybox", os.X_OK):
        return "the httpwork image needs Debian's busybox-static"
    if shutil.which("gcc") is None or not Path("/usr/include/stdio.h").exists():
        return "the httpwork image is compiled here: apt-get install gcc libc6-dev"
    return None


MISSING = _missing_part()
if MISSING:
    print(f"\nskipping the local scaling test on runc: {MISSING}")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as info:
        return [line.split()[4] for line in info if line.split()[4].startswith(prefix)]


def test_a_loaded_service_gets_a_sibling_and_folds_back(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETVISOR_")}
    env["TMPDIR"] = str(tmp_path)
    argv = [FLEETVISOR, "bench", "local-scaling", "--json"]
    argv += ["--low-s", "4", "--high-s", "8", "--cool-s", "12"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)

    for key in (
        "reaction_s",
        "static_p95_ms_high",
        "scaled_p95_ms_high",
        "request_errors",
        "host_allocation_conserved",
    ):
        assert key in result, key
    assert result["carves"] == 1 and result["folds"] == 1
    assert result["request_errors"] == 0
    assert result["host_allocation_conserved"] is True, result["allocation"]
    assert result["reaction_s"] is not None and result["reaction_s"] > 0
    scaled_high = result["per_phase"]["scaled"]["high"]["served_by"]
    assert set(scaled_high) == {"fvbench-scaled", "fvbench-scaled-s1"}
    assert set(result["per_phase"]["static"]["high"]["served_by"]) == {"fvbench-static"}
    stages = result["allocation"]
    assert stages["before"]["members"] == 1 and stages["with_sibling"]["members"] == 2
    assert stages["with_sibling"]["kernel"] == stages["before"]["kernel"]
    assert not _mounts_below(tmp_path)
    assert not list(tmp_path.glob("fvbench-scale-*"))
