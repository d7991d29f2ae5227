"""The runc driver's counters for execution monitoring, from cgroup v1 files and
/proc/<tid>/schedstat: CFS periods, the memory limit and working set, and the run-queue
wait of a cgroup's tasks as a counter that never goes back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleetvisor.drivers.runc.cgroups import Cgroup
from fleetvisor.drivers.runc.schedstat import WaitCounter, task_wait_ns, tasks_wait_ns
from fleetvisor.drivers.runc.usage import UsageSampler

MIB = 1024 * 1024


def test_wait_counter_keeps_what_ended_tasks_waited() -> None:
    counter = WaitCounter()
    assert counter.observe({1: 100, 2: 50}) == 150
    assert counter.observe({1: 120, 2: 80}) == 200
    assert counter.observe({1: 130}) == 210  # task 2 ended: its 80 stay
    assert counter.observe({1: 130, 2: 5}) == 215  # id 2 reused by a new task
    assert counter.observe({}) == 215


def test_schedstat_of_this_process() -> None:
    wait = task_wait_ns(os.getpid())
    assert wait is not None and wait >= 0
    assert task_wait_ns(2**22 + 12345) is None  # above pid_max: no such task


def fake_cgroup(root: Path, path: str, limit: int) -> None:
    files = {
        "cpu": {
            "cpu.stat": "nr_periods 40\nnr_throttled 12\nthrottled_time 900000000\n",
            "tasks": f"{os.getpid()}\n",
        },
        "cpuacct": {"cpuacct.usage": "2500000000\n"},
        "memory": {
            "memory.usage_in_bytes": f"{100 * MIB}\n",
            "memory.max_usage_in_bytes": f"{110 * MIB}\n",
            "memory.limit_in_bytes": f"{limit}\n",
            "memory.stat": f"cache 1\ntotal_inactive_file {30 * MIB}\n",
            "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        },
        "pids": {"pids.current": "3\n"},
    }
    for controller, entries in files.items():
        directory = root / controller / path
        directory.mkdir(parents=True)
        for name, text in entries.items():
            (directory / name).write_text(text)


def test_cgroup_stats_and_usage_keys(tmp_path: Path) -> None:
    fake_cgroup(tmp_path, "fleetvisor-t/abc", 128 * MIB)
    stats = Cgroup("fleetvisor-t/abc", root=tmp_path).stats()
    assert stats is not None
    assert (stats.cpu_periods, stats.throttled_periods) == (40, 12)
    assert stats.memory_limit_bytes == 128 * MIB
    assert stats.memory_inactive_file_bytes == 30 * MIB
    assert list(stats.task_waits_ns) == [os.getpid()]
    usage = UsageSampler().usage("abc", 10.0, stats, 0, 0, uptime=5.0)
    assert usage["cpu_periods"] == 40 and usage["throttled_periods"] == 12
    assert usage["memory_limit_mib"] == 128
    assert usage["memory_working_set_mib"] == 70 and usage["memory_mib"] == 100
    assert usage["oom_kills"] == 2 and usage["pids"] == 3
    assert usage["cpu_wait_seconds"] == pytest.approx(stats.task_waits_ns[os.getpid()] / 1e9)


def test_an_unlimited_memory_cgroup_reports_no_limit(tmp_path: Path) -> None:
    fake_cgroup(tmp_path, "fleetvisor-t/abc", 9223372036854771712)  # what v1 shows
    stats = Cgroup("fleetvisor-t/abc", root=tmp_path).stats()
    assert stats is not None and stats.memory_limit_bytes == 0
    assert UsageSampler().usage("abc", 1.0, stats, 0, 0, None)["memory_limit_mib"] == 0


def test_cpu_wait_survives_ended_tasks_and_restarts_with_the_instance(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    tasks.write_text(f"{os.getpid()}\n999999999\n")  # the second one does not exist
    assert list(tasks_wait_ns(tasks)) == [os.getpid()]
    fake_cgroup(tmp_path, "x", 64 * MIB)
    cgroup = Cgroup("x", root=tmp_path)
    sampler = UsageSampler()
    first = sampler.usage("x", 1.0, cgroup.stats(), 0, 0, None)["cpu_wait_seconds"]
    (tmp_path / "cpu" / "x" / "tasks").write_text("")  # every task ended
    assert sampler.usage("x", 2.0, cgroup.stats(), 0, 0, None)["cpu_wait_seconds"] >= first
    sampler.forget("x")  # a new container
    assert sampler.usage("x", 3.0, cgroup.stats(), 0, 0, None)["cpu_wait_seconds"] == 0
