"""HealthSupervisor on the sim driver and a virtual clock: faults injected through the
`sim.fleetvisor.io/faults` label drive every detector; restarts in place go through
agent-like stop/start callables, up to the policy's limit, then a restart loop."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from fleetvisor.agent.health import HealthSupervisor
from fleetvisor.clock import VirtualClock
from fleetvisor.drivers.sim import SimDriver
from fleetvisor.model.health import Detection, Issue
from fleetvisor.model.scaling import PARENT_LABEL
from fleetvisor.model.specs import InstanceSpec, ResourceVector

FAULTS = "sim.fleetvisor.io/faults"


def spec(
    name: str,
    faults: str = "",
    health: dict[str, Any] | None = None,
    vcpus: int = 1000,
    memory: int = 512,
    **labels: str,
) -> InstanceSpec:
    if faults:
        labels[FAULTS] = faults
    return InstanceSpec(
        id=uuid.uuid4().hex,
        name=name,
        image="busybox",
        labels=labels,
        resources=ResourceVector(vcpus=vcpus, memory=memory, disk=1, net=100),
        health=health,
    )


class Host:
    """A sim driver, the supervisor, and stop/start wired the way the agent wires them."""

    def __init__(self, tmp_path: Path, stop_seconds: float = 0.0) -> None:
        self.clock = VirtualClock()
        self.driver = SimDriver(clock=self.clock, state_dir=tmp_path, persist=False)
        self.stop_seconds = stop_seconds
        self.calls: list[tuple[str, str, float]] = []
        self.heartbeats = 0
        self.health = HealthSupervisor(
            self.driver, self.clock, stop=self.stop, start=self.start, on_detection=self.beat
        )
        self.seen: list[Detection] = []

    def beat(self) -> None:
        self.heartbeats += 1

    async def stop(self, instance_id: str) -> None:
        self.calls.append(("stop", instance_id, self.clock.monotonic()))
        self.health.expect_stopped(instance_id)
        if self.stop_seconds:
            await self.clock.sleep(self.stop_seconds)  # a grace period
        await self.driver.stop(instance_id)

    async def start(self, instance_id: str) -> None:
        self.calls.append(("start", instance_id, self.clock.monotonic()))
        await self.driver.start(instance_id)
        self.health.expect_running(instance_id)

    async def launch(self, instance: InstanceSpec) -> str:
        await self.driver.create(instance)
        self.health.watch(instance)
        await self.start(instance.id)
        return instance.id

    async def run(self, seconds: float, step: float = 0.1) -> list[Detection]:
        for _ in range(round(seconds / step)):
            await self.clock.advance(step)
        self.seen += self.health.drain()
        return self.seen

    def restarts(self, instance_id: str) -> int:
        return sum(1 for call, i, _ in self.calls if call == "stop" and i == instance_id)


@pytest.fixture
async def host(tmp_path: Path) -> Any:
    machine = Host(tmp_path)
    yield machine
    await machine.health.close()


def issues(detections: list[Detection]) -> list[tuple[str, str]]:
    return [(str(d.issue), d.action) for d in detections]


async def test_exits_restart_in_place_then_a_restart_loop_is_declared(host: Host) -> None:
    policy = {"max_restarts": 2, "restart_window_s": 60}
    victim = await host.launch(spec("crashy", "exit@4", health=policy))
    found = await host.run(30)
    assert issues(found) == [
        ("exited", "restart"),
        ("exited", "restart"),
        ("exited", ""),
        ("restart_loop", ""),
    ]
    assert [round(d.at - host.clock.now() + 30, 1) for d in found[:3]] == [4.0, 8.0, 12.0]
    assert host.restarts(victim) == 2  # and none after the loop was declared
    loop = found[3]
    assert loop.evidence["restarts"] == 2 and loop.evidence["max_restarts"] == 2
    assert loop.evidence["issue"] == "exited" and "no more restarts" in loop.message
    (report,) = await host.driver.list()
    assert report.state == "stopped"  # left for the controller (remedy: migrate)
    assert host.heartbeats >= 3
    # the agent starting it again does not wipe the count: still a loop within the window
    await host.start(victim)
    found = await host.run(4.5)
    assert issues(found[4:]) == [("exited", ""), ("restart_loop", "")]
    assert host.restarts(victim) == 2


async def test_restarts_older_than_the_window_do_not_count(host: Host) -> None:
    policy = {"max_restarts": 1, "restart_window_s": 5}
    victim = await host.launch(spec("crashy", "exit@6", health=policy))
    found = await host.run(20)
    assert issues(found) == [("exited", "restart")] * 3
    assert host.restarts(victim) == 3


async def test_an_oom_kill_is_detected_and_restarts_by_default(host: Host) -> None:
    victim = await host.launch(spec("hungry", "oom@3"))
    found = await host.run(4)
    assert issues(found) == [("oom_killed", "restart")]
    assert found[0].instance == victim and found[0].evidence["new_kills"] == 1
    assert found[0].evidence["memory_limit_mib"] == 512


async def test_remedy_overrides_leave_the_instance_alone(host: Host) -> None:
    health = {"remedies": {"oom_killed": "alert"}}
    victim = await host.launch(spec("hungry", "oom@1;oom=2@3", health=health))
    found = await host.run(5)
    assert issues(found) == [("oom_killed", ""), ("oom_killed", "")]
    assert found[1].evidence["new_kills"] == 2
    assert host.restarts(victim) == 0


async def test_noisy_neighbour_evidence_names_the_hog(host: Host) -> None:
    health = {"detectors": {"hold_s": 2, "cpu_wait": 0.5}}
    victim = await host.launch(spec("victim", "cpu_wait=0.9@3", health=health))
    hog = await host.launch(
        spec("hog", vcpus=2000, **{"sim.fleetvisor.io/demand": "1900"})  # type: ignore[arg-type]
    )
    await host.launch(spec("quiet", vcpus=100))
    found = await host.run(8)
    (detection,) = [d for d in found if d.instance == victim]
    assert (detection.issue, detection.action) == (Issue.NOISY_NEIGHBOUR, "")  # migrate: fleet's
    assert detection.evidence["cpu_wait"] == pytest.approx(0.9)
    assert detection.evidence["neighbour"] == hog
    assert detection.evidence["neighbour_name"] == "hog"
    assert detection.evidence["neighbour_cpu_millicores"] == pytest.approx(1900)
    assert detection.evidence["host_cpu_millicores"] >= 1900
    assert detection.evidence["host_capacity_millicores"] == 16_000
    start = host.clock.now() - 8
    assert detection.since == pytest.approx(start + 4.0)  # first full window of waiting
    assert detection.at == pytest.approx(start + 6.0)  # held 2 s
    assert not [d for d in found if d.instance != victim]
    assert host.restarts(victim) == 0


async def test_throttling_and_memory_pressure_alert_once(host: Host) -> None:
    health = {"detectors": {"hold_s": 1, "throttled": 0.5, "memory": 0.9}}
    victim = await host.launch(spec("tight", "throttled=0.8@1;memory=0.95@2", health=health))
    found = await host.run(30)
    assert sorted(issues(found)) == [("cpu_throttled", ""), ("memory_pressure", "")]
    throttled = next(d for d in found if d.issue == Issue.CPU_THROTTLED)
    assert throttled.evidence["throttled_share"] == pytest.approx(0.8)
    memory = next(d for d in found if d.issue == Issue.MEMORY_PRESSURE)
    assert memory.evidence["ratio"] == pytest.approx(0.95)
    assert host.restarts(victim) == 0
    status = host.health.status(victim)
    assert status["measured"]["cpu_throttled"] == pytest.approx(0.8)


async def test_a_failing_exec_probe_restarts_the_instance(host: Host) -> None:
    health = {
        "probes": [{"kind": "exec", "command": ["cat", "/tmp/healthy"], "interval_s": 1,
                    "failure_threshold": 3, "initial_delay_s": 0.5}],
        "max_restarts": 5,
    }  # fmt: skip
    victim = await host.launch(spec("probed", "probe=fail@2;probe=ok@30", health=health))
    found = await host.run(5.2)
    assert issues(found) == [("probe_failed", "restart")]
    detection = found[0]
    assert detection.evidence["failures"] == 3 and detection.evidence["probe"] == "exec"
    assert detection.evidence["target"] == "exec cat /tmp/healthy"
    assert "simulated failure" in detection.message
    assert detection.at == pytest.approx(host.clock.now() - 5.2 + 4.5)  # fails at 2.5, 3.5, 4.5
    assert host.restarts(victim) == 1
    assert host.health.status(victim)["probes"][0]["status"] == "unknown"  # restarted


async def test_a_stop_the_agent_asked_for_is_not_an_exit(host: Host) -> None:
    victim = await host.launch(spec("calm"))
    await host.run(2)
    await host.stop(victim)
    assert await host.run(5) == []
    await host.start(victim)
    assert await host.run(3) == []
    assert host.health.status(victim)["state"] == "running"


async def test_an_instance_never_started_is_not_an_exit(host: Host) -> None:
    instance = spec("idle")
    await host.driver.create(instance)
    host.health.watch(instance)
    assert await host.run(3) == []


async def test_scaling_siblings_are_not_watched(host: Host) -> None:
    sibling = spec("web-s1", "exit@1", **{PARENT_LABEL: "parent-id"})  # type: ignore[arg-type]
    await host.driver.create(sibling)
    host.health.watch(sibling)
    await host.start(sibling.id)
    assert host.health.monitors == {}
    assert await host.run(3) == []
    assert host.health.status(sibling.id) == {"watched": False}


async def test_drain_and_requeue(host: Host) -> None:
    await host.launch(spec("a", "oom@1", health={"remedies": {"oom_killed": "alert"}}))
    await host.launch(spec("b", "oom@2", health={"remedies": {"oom_killed": "alert"}}))
    for _ in range(25):
        await host.clock.advance(0.1)
    first = host.health.drain()
    assert [d.issue for d in first] == [Issue.OOM_KILLED, Issue.OOM_KILLED]
    assert host.health.drain() == []
    host.health.requeue(first[:1])  # the heartbeat failed
    assert host.health.drain() == first[:1]


async def test_an_operators_stop_during_a_restart_wins(tmp_path: Path) -> None:
    host = Host(tmp_path, stop_seconds=1.0)
    try:
        victim = await host.launch(spec("crashy", "exit@2"))
        await host.run(2.2)  # exited at 2.0; the restart's stop is in its grace period
        assert host.calls[-1][0] == "stop"
        operator = asyncio.create_task(host.stop(victim))
        found = await host.run(3)
        await operator
        assert issues(found) == [("exited", "")]
        assert "not restarted: the agent stopped or started it" in found[0].message
        assert [call for call, _, _ in host.calls] == ["start", "stop", "stop"]
        (report,) = await host.driver.list()
        assert report.state == "stopped"
        assert await host.run(5) == found  # stopped on request: nothing more
    finally:
        await host.health.close()


async def test_a_new_policy_keeps_what_the_agent_expects(host: Host) -> None:
    instance = spec("probed", "probe=fail@1")
    victim = await host.launch(instance)
    await host.run(2)
    assert host.health.status(victim)["probes"] == []
    changed = instance.model_copy(
        update={
            "health": {
                "probes": [
                    {"kind": "exec", "command": ["true"], "interval_s": 1, "failure_threshold": 2}
                ]
            }
        }  # fmt: skip
    )
    host.health.watch(changed)
    found = await host.run(3)
    assert issues(found) == [("probe_failed", "restart")]


async def test_unwatch_and_close_stop_the_loops(host: Host) -> None:
    victim = await host.launch(spec("crashy", "exit@2"))
    await host.run(1)
    await host.health.unwatch(victim)
    assert await host.run(5) == []
    assert host.restarts(victim) == 0
    other = await host.launch(spec("crashy-2", "exit@2"))
    await host.health.close()
    assert await host.run(5) == []
    assert host.restarts(other) == 0
    host.health.watch(spec("late"))  # after close: ignored
    assert host.health.monitors == {}


async def test_counters_of_a_fresh_start_count_from_zero_but_a_resumed_watch_does_not(
    host: Host,
) -> None:
    # killed before the first sample after its start: still detected (counters start at 0)
    early = spec("early", "oom@0", health={"remedies": {"oom_killed": "alert"}})
    await host.driver.create(early)
    host.health.watch(early)
    await host.driver.start(early.id)
    host.health.expect_running(early.id)
    assert issues(await host.run(1)) == [("oom_killed", "")]
    # an agent restarted next to a running instance: what happened before is the baseline
    resumed = spec("resumed", "oom@0;exit@3", health={"remedies": {"oom_killed": "alert"}})
    await host.driver.create(resumed)
    await host.driver.start(resumed.id)
    host.health.watch(resumed, running=True)
    found = [d for d in await host.run(4) if d.instance == resumed.id]
    # expected to run: the exit counts; the kill of before does not, the restarted
    # instance's own does
    assert issues(found) == [("exited", "restart"), ("oom_killed", "")]
