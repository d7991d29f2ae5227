"""`measure_boot_overhead()`: what the measured chain adds to an agent start, measured
against a plain start in the same run, plus how many attacks it caught.

    plain start     spawn the agent's Python process and import its runtime
                    (what starting the first coordinator costs without the chain)
    measured start  start the swtpm (a fresh power cycle) + phases 1-3 + the same spawn

Both are repeated `runs` times, interleaved (so machine noise hits both alike); the
medians are reported. `overhead_s` is the chain's own time inside each measured start
(swtpm start + phases 1-3, i.e. the measured start minus its own spawn), because on a
busy machine the spawn alone varies by more than the chain costs; `difference_s`
(measured minus plain medians) is reported too. Enrolment is a one-time operator
step and is not timed. The drivers measured are the real binaries installed here
(copied into a temp dir).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fleetvisor.trust.boot import BootResult, measured_boot
from fleetvisor.trust.errors import BootRefused
from fleetvisor.trust.lab import TrustLab, run_tamper_cases
from fleetvisor.trust.measure import digest_path

PLAIN_START = [sys.executable, "-c", "import fleetvisor.agent.runtime"]


def _plain_start() -> float:
    started = time.perf_counter()
    subprocess.run(PLAIN_START, check=True, timeout=120)
    return time.perf_counter() - started


def _measured_start(lab: TrustLab) -> tuple[float, dict[str, float]]:
    lab.power_off()
    started = time.perf_counter()
    swtpm_s = lab.power_on()
    bundle = lab.current_release
    result = measured_boot(lab.tpm, lab.loaded_config(), lambda _stage1: bundle)
    launch_s = _plain_start()
    total = time.perf_counter() - started
    if not isinstance(result, BootResult):  # pragma: no cover - measured_boot raises instead
        raise BootRefused("boot", expected="a result", measured="none", reason="bug", phase="?")
    return total, {"swtpm_start_s": swtpm_s, **result.timings, "launch_s": launch_s}


def measure_boot_overhead(runs: int = 5, work_dir: Path | None = None) -> dict[str, Any]:
    """Median plain vs measured agent start over `runs` interleaved runs, the breakdown
    of the measured one, and the tamper cases detected (all in a temp dir, swtpm
    stopped at the end). Raises ToolsMissing when swtpm or tpm2-tools are absent."""
    with (
        tempfile.TemporaryDirectory(prefix="fv-bench-boot-", dir=work_dir) as tmp,
        TrustLab(Path(tmp)) as lab,
    ):
        _plain_start()  # warm the page cache for both sides alike
        _measured_start(lab)
        plain: list[float] = []
        measured: list[float] = []
        chain: list[float] = []
        parts: list[dict[str, float]] = []
        for _ in range(runs):
            plain.append(_plain_start())
            total, breakdown = _measured_start(lab)
            measured.append(total)
            chain.append(total - breakdown["launch_s"])
            parts.append(breakdown)
        config = lab.loaded_config()
        measured_bytes = sum(
            path.stat().st_size if path.is_file() else _tree_size(path)
            for _, path in config.measured_paths()
        )
        outcomes = run_tamper_cases(lab)
        plain_s, measured_s = statistics.median(plain), statistics.median(measured)
        return {
            "plain_start_s": round(plain_s, 4),
            "measured_start_s": round(measured_s, 4),
            "overhead_s": round(statistics.median(chain), 4),
            "difference_s": round(measured_s - plain_s, 4),
            "ratio": round(measured_s / plain_s, 3),
            "runs": runs,
            "breakdown_median_s": {
                key: round(statistics.median(p[key] for p in parts), 4) for key in parts[0]
            },
            "measured_components": [name for name, _ in config.measured_paths()],
            "measured_bytes": measured_bytes,
            "agent_code_digest": digest_path(config.agent_code),
            "tamper_cases_detected": sum(o.detected for o in outcomes),
            "tamper_cases_total": len(outcomes),
            "tamper_cases": [o.to_dict() for o in outcomes],
        }


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
