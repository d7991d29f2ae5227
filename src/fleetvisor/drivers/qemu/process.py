"""The QEMU process of an instance: launch (daemonized), find it again, wait for it.

QEMU daemonizes itself (`-daemonize -pidfile`): it is re-parented to init and outlives
the agent. A pid read back from the pid file counts only while /proc says it is a QEMU
whose command line names this instance's QMP socket (pids get reused).
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from fleetvisor.clock import Clock
from fleetvisor.drivers.runc import commands
from fleetvisor.errors import DriverError

POLL_SECONDS = 0.05
TAIL_BYTES = 3000


def running_pid(pid_file: Path, qmp_socket: Path) -> int | None:
    """The live QEMU of this instance, or None."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
        return None
    return pid if any(str(qmp_socket).encode() in arg for arg in argv) else None


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its vCPU threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def launch(argv: list[str], log: Path, timeout: float) -> None:
    """Run QEMU until it has daemonized; DriverError with QEMU's own words if it fails."""
    result = await commands.run(argv, timeout=timeout, check=False)
    output = (result.stderr + result.stdout).strip()
    if output:
        with log.open("a") as f:
            f.write(output + "\n")
    if result.returncode != 0:
        raise DriverError(
            f"QEMU failed to start (exit {result.returncode}): "
            f"{output[-TAIL_BYTES:] or '(no output)'}"
        )


async def wait_exit(pid_file: Path, qmp_socket: Path, clock: Clock, seconds: float) -> bool:
    """True once the instance's QEMU is gone, False if it still runs after `seconds`."""
    deadline = clock.monotonic() + seconds
    while running_pid(pid_file, qmp_socket) is not None:
        if clock.monotonic() >= deadline:
            return False
        await clock.sleep(POLL_SECONDS)
    return True


async def wait_marker(
    console: Path,
    offset: int,
    marker: str,
    clock: Clock,
    seconds: float,
    *,
    pid_file: Path,
    qmp_socket: Path,
) -> None:
    """Wait until `marker` appears in the console after `offset`; DriverError with the
    console's tail if QEMU exits first or the time runs out."""
    deadline = clock.monotonic() + seconds
    needle = marker.encode()
    while True:
        text = read_from(console, offset)
        if needle in text:
            return
        gone = running_pid(pid_file, qmp_socket) is None
        if gone or clock.monotonic() >= deadline:
            what = "QEMU exited" if gone else f"no {marker} within {seconds:g} s"
            tail = text[-TAIL_BYTES:].decode(errors="replace").strip()
            raise DriverError(f"the guest did not come up ({what}); console: {tail or '(empty)'}")
        await clock.sleep(POLL_SECONDS)


def read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return b""


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
