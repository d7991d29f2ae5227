"""Run-queue wait of a container: how long its tasks were runnable but not running.

`/proc/<tid>/schedstat` holds three numbers per task (thread): nanoseconds on a CPU,
nanoseconds waiting on a run queue, and time slices run. Summed over the tasks of an
instance's cgroup, the wait is the evidence of a noisy neighbour: the instance wanted a
CPU while others held it. The kernel keeps the figures when schedstats are off
(CONFIG_SCHED_INFO), so no sysctl is needed.

A sum over the tasks that exist now shrinks when a task ends, so `WaitCounter` turns the
per-task figures into a counter that only grows: a task that is gone keeps the wait it
had at its last reading. (Wait a task accrued between its last reading and its end is
not seen; with readings every fraction of a second that is small.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")


def task_ids(tasks_file: Path) -> list[int]:
    """Thread ids listed in a cgroup v1 `tasks` file; [] when it cannot be read."""
    try:
        text = tasks_file.read_text()
    except OSError:
        return []
    return [int(line) for line in text.split() if line.isdigit()]


def task_wait_ns(tid: int, proc: Path = PROC) -> int | None:
    """Run-queue wait of one task in ns (schedstat field 2); None when the task is gone."""
    try:
        fields = (proc / str(tid) / "schedstat").read_text().split()
        return int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def tasks_wait_ns(tasks_file: Path, proc: Path = PROC) -> dict[int, int]:
    """tid -> run-queue wait (ns) for every task of the cgroup whose `tasks` file this is."""
    waits = {}
    for tid in task_ids(tasks_file):
        wait = task_wait_ns(tid, proc)
        if wait is not None:
            waits[tid] = wait
    return waits


@dataclass
class WaitCounter:
    """Per-task waits -> one cumulative figure that never goes back."""

    departed_ns: int = 0  # what tasks that ended had waited, at their last reading
    last: dict[int, int] = field(default_factory=dict)

    def observe(self, waits: dict[int, int]) -> int:
        for tid, previous in self.last.items():
            now = waits.get(tid)
            if now is None or now < previous:  # gone, or the id was reused by a new task
                self.departed_ns += previous
        self.last = dict(waits)
        return self.departed_ns + sum(waits.values())
