"""The sim driver's fault injection for execution monitoring: the label's syntax, the
counters it drives (same keys as the runc driver), exits, and exec answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fleetvisor.clock import VirtualClock
from fleetvisor.drivers.sim import SimDriver
from fleetvisor.drivers.sim.workload import FaultSchedule
from fleetvisor.errors import DriverError
from fleetvisor.model.specs import InstanceSpec, ResourceVector

KEYS = {
    *("cpu_periods", "throttled_periods", "throttled_seconds", "cpu_wait_seconds"),
    *("oom_kills", "pids", "memory_limit_mib", "cpu_millicores", "memory_mib", "net_mbps"),
}


def spec(faults: str, i: str = "f" * 32) -> InstanceSpec:
    return InstanceSpec(
        id=i,
        name="faulty",
        image="busybox",
        labels={"sim.fleetvisor.io/faults": faults},
        resources=ResourceVector(vcpus=1000, memory=256, disk=1, net=100),
    )


def test_schedule_levels_integrals_and_events() -> None:
    faults = FaultSchedule("throttled=0.8@5; throttled=0.2@10;oom@8;oom=2@9;exit@12;probe=fail")
    assert faults.level("throttled", 4.9, 0.0) == 0.0
    assert faults.level("throttled", 5.0, 0.0) == 0.8
    assert faults.level("throttled", 11.0, 0.0) == 0.2
    assert faults.integral("throttled", 5.0) == 0.0
    assert faults.integral("throttled", 10.0) == pytest.approx(4.0)
    assert faults.integral("throttled", 12.0) == pytest.approx(4.4)
    assert (faults.count("oom", 7.9), faults.count("oom", 8), faults.count("oom", 9)) == (0, 1, 3)
    assert faults.first("exit") == 12.0 and faults.first("oom") == 8.0
    assert faults.level("probe", 0.0, "ok") == "fail"  # no @: from the start
    assert FaultSchedule("").levels == {} and FaultSchedule(" ; ").events == {}


@pytest.mark.parametrize(
    "text",
    ["throttled@5", "throttled=x@5", "cpu_wait=-1", "oom=0@1", "exit=3@1", "probe=maybe",
     "reboot@3", "oom@-1", "oom@soon", "memory=nan"],
)  # fmt: skip
def test_unreadable_faults_name_the_syntax(text: str) -> None:
    with pytest.raises(ValueError, match="name\\[=value\\]\\[@seconds\\]"):
        FaultSchedule(text)


async def test_a_bad_label_fails_create_with_the_syntax(tmp_path: Path) -> None:
    driver = SimDriver(clock=VirtualClock(), state_dir=tmp_path, persist=False)
    with pytest.raises(DriverError, match="cannot read 'reboot@3'"):
        await driver.create(spec("reboot@3"))


async def test_counters_follow_the_schedule(tmp_path: Path) -> None:
    clock = VirtualClock()
    driver = SimDriver(clock=clock, state_dir=tmp_path, persist=False)
    instance = await driver.create(spec("throttled=0.5@2;cpu_wait=0.9@3;oom@4;memory=0.95@1"))
    stopped = await driver.stats(instance.id)
    assert set(stopped) == KEYS and all(v == 0 for v in stopped.values())
    await driver.start(instance.id)
    await clock.advance(6)
    stats = await driver.stats(instance.id)
    assert set(stats) == KEYS
    assert stats["cpu_periods"] == pytest.approx(60)  # 100 ms periods
    assert stats["throttled_periods"] == pytest.approx(20)  # half of the 40 since t=2
    assert stats["throttled_seconds"] == pytest.approx(2.0)
    assert stats["cpu_wait_seconds"] == pytest.approx(2.7)
    assert stats["oom_kills"] == 1 and stats["pids"] == 1
    assert stats["memory_mib"] == pytest.approx(0.95 * 256)
    assert stats["memory_limit_mib"] == 256
    await driver.stop(instance.id)
    await driver.start(instance.id)  # counters restart with the instance
    await clock.advance(1)
    assert (await driver.stats(instance.id))["cpu_wait_seconds"] == 0


async def test_exit_stops_the_instance_and_a_start_runs_it_again(tmp_path: Path) -> None:
    clock = VirtualClock()
    driver = SimDriver(clock=clock, state_dir=tmp_path)
    instance = await driver.create(spec("exit@3"))
    await driver.start(instance.id)
    await clock.advance(2.9)
    assert (await driver.list())[0].state == "running"
    await clock.advance(0.1)
    (report,) = await driver.list()
    assert report.state == "stopped" and report.started_at is None
    assert "exited 3 s after its start" in driver.log_path(instance.id).read_text()  # type: ignore[union-attr]
    assert (await driver.start(instance.id)).state == "running"
    await clock.advance(3)
    assert (await driver.stats(instance.id))["pids"] == 0  # exited again


async def test_exec_answers_from_the_probe_fault(tmp_path: Path) -> None:
    clock = VirtualClock()
    driver = SimDriver(clock=clock, state_dir=tmp_path, persist=False)
    instance = await driver.create(spec("probe=fail@2;probe=timeout@4;probe=ok@6"))
    with pytest.raises(DriverError, match="not running"):
        await driver.exec(instance.id, ["true"], 1.0)
    await driver.start(instance.id)
    assert await driver.exec(instance.id, ["cat", "/tmp/healthy"], 1.0) == (0, "")
    await clock.advance(2)
    code, output = await driver.exec(instance.id, ["cat", "/tmp/healthy"], 1.0)
    assert code == 1 and "simulated failure" in output
    await clock.advance(2)
    began = clock.monotonic()
    with pytest.raises(DriverError, match="did not finish within 1 s"):
        await _exec_while_advancing(driver, clock, instance.id)
    assert clock.monotonic() - began >= 1.0
    await clock.advance(2)
    assert await driver.exec(instance.id, ["true"], 1.0) == (0, "")


async def _exec_while_advancing(driver: SimDriver, clock: VirtualClock, instance_id: str) -> None:
    task = asyncio.create_task(driver.exec(instance_id, ["true"], 1.0))
    while not task.done():
        await clock.advance(0.25)
    await task
