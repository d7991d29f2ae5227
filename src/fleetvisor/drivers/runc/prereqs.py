"""Start-up checks: is this machine able to run the runc driver at all?

Checked once when the driver is built, so an agent on an unsuitable machine fails at
start with one message that says what to install or change, instead of failing on the
first instance with a runc error.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fleetvisor.drivers.runc.commands import run_sync
from fleetvisor.errors import DriverError

CGROUP_ROOT = Path("/sys/fs/cgroup")
# controller -> a file every v1 hierarchy of that controller has at its root
CONTROLLERS = {
    "cpu": "cpu.cfs_quota_us",
    "cpuacct": "cpuacct.usage",
    "memory": "memory.limit_in_bytes",
    "pids": "cgroup.procs",
}


class PrerequisiteMissing(DriverError):
    """The machine lacks something the runc driver needs; the message says what."""


def check_prerequisites(runc: str = "runc", cgroup_root: Path = CGROUP_ROOT) -> str:
    """Check root, runc, iproute2, cgroup v1 controllers and overlayfs; return runc's version
    line. Raises PrerequisiteMissing naming every missing part and how to get it."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append(
            "the runc driver needs root (mounts, cgroups, network namespaces): run the agent "
            "as root, or use --driver sim on machines without root"
        )
    version = ""
    runc_path = shutil.which(runc)
    if runc_path is None:
        problems.append(f"{runc!r} is not on PATH: apt-get install runc")
    else:
        try:
            version = run_sync([runc_path, "--version"], timeout=10).stdout.splitlines()[0]
        except (DriverError, IndexError) as exc:
            problems.append(
                f"{runc_path} does not run ({exc}): reinstall it (apt-get install runc)"
            )
    if shutil.which("ip") is None:
        problems.append("'ip' is not on PATH: apt-get install iproute2")
    problems.extend(_cgroup_problems(cgroup_root))
    if not _has_filesystem("overlay"):
        problems.append("the kernel has no overlayfs: load it with `modprobe overlay`")
    if problems:
        raise PrerequisiteMissing("runc driver cannot run here: " + "; ".join(problems))
    return version


def _cgroup_problems(root: Path) -> list[str]:
    if (root / "cgroup.controllers").exists():
        return [
            f"{root} is a pure cgroup v2 mount; this driver reads cgroup v1 files: boot with "
            "systemd.unified_cgroup_hierarchy=0 (hybrid/legacy cgroups)"
        ]
    problems = []
    for controller, marker in CONTROLLERS.items():
        directory = root / controller
        if not (directory / marker).exists():
            problems.append(
                f"cgroup v1 controller {controller!r} is not mounted at {directory}: mount it "
                f"(mount -t cgroup -o {controller} cgroup {directory}) or enable it in the kernel"
            )
        elif not os.access(directory, os.W_OK):
            problems.append(f"{directory} is not writable: run as root with cgroups mounted rw")
    return problems


def _has_filesystem(name: str) -> bool:
    try:
        text = Path("/proc/filesystems").read_text()
    except OSError:
        return False
    return any(line.split()[-1] == name for line in text.splitlines() if line.split())
