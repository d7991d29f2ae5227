"""A container's cgroup v1 directories: read usage, change limits live, remove them.

runc creates the cgroups (from the bundle's cgroupsPath) when a container starts; this
module only reads and adjusts them, and removes what runc leaves behind. All calls are
blocking file I/O on cgroupfs; the driver runs them in a thread.

Writes use unbuffered os.write: a buffered write can lose the kernel's error (e.g.
EBUSY for a memory limit below current usage) when the file is closed.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from fleetvisor.drivers.runc.schedstat import tasks_wait_ns
from fleetvisor.errors import DriverError

CGROUP_ROOT = Path("/sys/fs/cgroup")
MIB = 1024 * 1024
UNLIMITED = -1
NO_LIMIT_FROM = 1 << 62  # memory.limit_in_bytes reads as ~2^63 (page aligned) when unlimited


@dataclass(frozen=True)
class CgroupStats:
    """One reading of a container's cgroup counters (cumulative since the container started)."""

    cpu_usage_ns: int
    throttled_periods: int
    throttled_ns: int
    memory_bytes: int
    memory_max_bytes: int
    oom_kills: int
    pids: int
    cpu_periods: int = 0  # CFS periods that elapsed with the quota in force (nr_periods)
    memory_limit_bytes: int = 0  # memory.limit_in_bytes; 0 when not limited
    memory_inactive_file_bytes: int = 0  # page cache the kernel reclaims first
    task_waits_ns: dict[int, int] = field(default_factory=dict)  # tid -> run-queue wait


class MemoryBelowUsage(DriverError):
    """A memory limit below what the instance uses now: the kernel refuses it (EBUSY)."""


class Cgroup:
    """The cgroup `path` (e.g. /fleetvisor-ab12cd/<instance>) in every v1 hierarchy."""

    def __init__(self, path: str, root: Path = CGROUP_ROOT) -> None:
        self.path = path.strip("/")
        self.root = root

    def dir(self, controller: str) -> Path:
        return self.root / controller / self.path

    def exists(self) -> bool:
        return self.dir("memory").is_dir() or self.dir("cpu").is_dir()

    def _read(self, controller: str, name: str) -> str:
        return (self.dir(controller) / name).read_text()

    def _read_int(self, controller: str, name: str) -> int:
        try:
            return int(self._read(controller, name).strip())
        except (OSError, ValueError):
            return 0

    def _read_keyed(self, controller: str, name: str) -> dict[str, int]:
        """Files of `key value` lines (cpu.stat, memory.oom_control)."""
        try:
            text = self._read(controller, name)
        except OSError:
            return {}
        values = {}
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                values[key] = int(value)
        return values

    def stats(self) -> CgroupStats | None:
        """Current counters, or None when the cgroup does not exist (container not running)."""
        if not self.exists():
            return None
        cpu_stat = self._read_keyed("cpu", "cpu.stat")
        limit = self._read_int("memory", "memory.limit_in_bytes")
        tasks = self.dir("cpu") / "tasks"
        if not tasks.exists():
            tasks = self.dir("cpuacct") / "tasks"
        return CgroupStats(
            cpu_usage_ns=self._read_int("cpuacct", "cpuacct.usage"),
            throttled_periods=cpu_stat.get("nr_throttled", 0),
            throttled_ns=cpu_stat.get("throttled_time", 0),
            memory_bytes=self._read_int("memory", "memory.usage_in_bytes"),
            memory_max_bytes=self._read_int("memory", "memory.max_usage_in_bytes"),
            oom_kills=self._read_keyed("memory", "memory.oom_control").get("oom_kill", 0),
            pids=self._read_int("pids", "pids.current"),
            cpu_periods=cpu_stat.get("nr_periods", 0),
            memory_limit_bytes=limit if 0 < limit < NO_LIMIT_FROM else 0,
            memory_inactive_file_bytes=self._read_keyed("memory", "memory.stat").get(
                "total_inactive_file", 0
            ),
            task_waits_ns=tasks_wait_ns(tasks),
        )

    def write(self, controller: str, name: str, value: int | str) -> None:
        """Write one value with a single unbuffered write, so the kernel's error is seen."""
        path = self.dir(controller) / name
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)

    def set_cpu(self, quota_us: int | None, period_us: int, shares: int) -> None:
        """Change CPU limits live: quota None = unlimited."""
        try:
            self.write("cpu", "cpu.cfs_period_us", period_us)
            self.write("cpu", "cpu.cfs_quota_us", UNLIMITED if quota_us is None else quota_us)
            self.write("cpu", "cpu.shares", shares)
        except OSError as exc:
            raise DriverError(f"setting cpu limits of cgroup {self.path} failed: {exc}") from exc

    def set_memory(self, limit_bytes: int | None) -> None:
        """Change the memory limit live (None = unlimited).

        The kernel first reclaims what it can (page cache); a limit still below usage then
        fails with EBUSY, which becomes MemoryBelowUsage naming the usage. The
        memory+swap limit (runc leaves it unlimited) is raised first if it would end up
        below the new memory limit, which the kernel forbids.
        """
        value = UNLIMITED if limit_bytes is None else limit_bytes
        memsw = "memory.memsw.limit_in_bytes"
        try:
            if (self.dir("memory") / memsw).exists():
                current_memsw = self._read_int("memory", memsw)
                if limit_bytes is None or current_memsw < limit_bytes:
                    self.write("memory", memsw, value)
            self.write("memory", "memory.limit_in_bytes", value)
        except OSError as exc:
            if exc.errno == errno.EBUSY and limit_bytes is not None:
                usage = self._read_int("memory", "memory.usage_in_bytes")
                raise _below_usage(self.path, limit_bytes, usage) from exc
            raise DriverError(f"setting memory limit of cgroup {self.path} failed: {exc}") from exc

    def remove(self) -> None:
        """rmdir this cgroup in every hierarchy under the root (children first). Idempotent.

        A cgroup that still holds processes stays (EBUSY): the caller kills them first.
        """
        for hierarchy in _hierarchies(self.root):
            directory = hierarchy / self.path
            if not directory.is_dir():
                continue
            for sub in sorted((p for p in directory.rglob("*") if p.is_dir()), reverse=True):
                with contextlib.suppress(FileNotFoundError):
                    sub.rmdir()
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise DriverError(
                    f"cannot remove cgroup {directory}: {exc} (processes still in it?)"
                ) from exc

    def remove_if_empty(self) -> None:
        """rmdir this cgroup wherever it has no child cgroups left (for per-agent parents)."""
        for hierarchy in _hierarchies(self.root):
            with contextlib.suppress(OSError):
                (hierarchy / self.path).rmdir()


def _hierarchies(root: Path) -> list[Path]:
    try:
        return [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []


def _below_usage(path: str, limit: int, usage: int) -> MemoryBelowUsage:
    return MemoryBelowUsage(
        f"cannot set the memory limit of {path} to {limit // MIB} MiB: the instance uses "
        f"{usage / MIB:.0f} MiB now and the kernel refuses a limit below current usage "
        f"(no swap to push it to). Ask for at least {-(-usage // MIB)} MiB, or make the "
        "workload release memory (or stop the instance, resize, start) and try again"
    )
