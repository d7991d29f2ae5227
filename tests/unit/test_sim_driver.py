"""The sim driver: idempotent calls, instances that outlive the agent, a seeded workload."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fleetvisor.clock import VirtualClock
from fleetvisor.drivers.base import UnknownInstance
from fleetvisor.drivers.sim import SimDriver, WorkloadModel
from fleetvisor.drivers.sim.driver import parse_capacity
from fleetvisor.errors import DriverError, InvalidInput
from fleetvisor.model.resources import Resources
from fleetvisor.model.specs import InstanceSpec, ResourceVector


def spec(i: str = "a" * 32, **labels: str) -> InstanceSpec:
    return InstanceSpec(
        id=i,
        name="web-1",
        image="busybox",
        labels=labels,
        resources=ResourceVector(vcpus=1000, memory=512, disk=1, net=100),
    )


async def test_lifecycle_is_idempotent(tmp_path: Path) -> None:
    driver = SimDriver(clock=VirtualClock(), state_dir=tmp_path)
    first = await driver.create(spec())
    again = await driver.create(spec())
    assert first.state == again.state == "created"
    assert (await driver.start(first.id)).state == "running"
    assert (await driver.start(first.id)).state == "running"
    assert (await driver.stop(first.id)).state == "stopped"
    await driver.destroy(first.id)
    await driver.destroy(first.id)
    assert await driver.list() == []
    with pytest.raises(UnknownInstance):
        await driver.start(first.id)


async def test_instances_outlive_the_driver_process(tmp_path: Path) -> None:
    """A new driver on the same state dir (a restarted agent) sees the same instances."""
    clock = VirtualClock()
    driver = SimDriver(clock=clock, state_dir=tmp_path)
    await driver.start((await driver.create(spec())).id)
    await driver.resize("a" * 32, Resources(2000, 1024, 1, 100))
    reborn = SimDriver(clock=clock, state_dir=tmp_path)
    (report,) = await reborn.list()
    assert report.state == "running"
    assert report.resources.vcpus == 2000


async def test_usage_follows_the_seeded_model_within_allocation(tmp_path: Path) -> None:
    clock = VirtualClock()
    driver = SimDriver(clock=clock, state_dir=tmp_path, seed=7)
    instance = await driver.create(spec())
    assert (await driver.stats(instance.id))["cpu_millicores"] == 0.0  # not running
    await driver.start(instance.id)
    samples = []
    for _ in range(50):
        await clock.advance(600)
        samples.append(await driver.stats(instance.id))
    cpu = [s["cpu_millicores"] for s in samples]
    assert all(0.0 <= c <= 1000.0 for c in cpu)
    assert len(set(cpu)) > 40  # it varies
    twin = SimDriver(clock=clock, state_dir=tmp_path / "twin", seed=7, persist=False)
    twin._instances = driver._instances  # same instance and start time
    assert await twin.stats(instance.id) == await driver.stats(instance.id)


def test_workload_depends_on_seed() -> None:
    a, b = WorkloadModel(seed=1), WorkloadModel(seed=2)
    assert a.usage("x", 1000.0, 500.0) == WorkloadModel(seed=1).usage("x", 1000.0, 500.0)
    assert a.usage("x", 1000.0, 500.0) != b.usage("x", 1000.0, 500.0)


async def test_fault_injection_labels(tmp_path: Path) -> None:
    clock = VirtualClock()
    driver = SimDriver(clock=clock, state_dir=tmp_path)
    with pytest.raises(DriverError, match="simulated create failure"):
        await driver.create(spec(**{"sim.fleetvisor.io/fail": "create"}))
    slow = asyncio.create_task(driver.create(spec(**{"sim.fleetvisor.io/create-seconds": "5"})))
    await clock.advance(4)
    assert not slow.done()
    await clock.advance(2)
    assert (await slow).state == "created"


def test_capacity_option() -> None:
    assert parse_capacity("cpu=8,memory=32G,disk=1T,net=2500") == Resources(8000, 32768, 1024, 2500)
    with pytest.raises(InvalidInput, match="cpu, memory, disk or net"):
        parse_capacity("gpus=2")


async def test_agent_serves_logs_with_tail_and_follow(tmp_path: Path) -> None:
    """The agent returns an instance's output, its last lines, and follows new output."""
    from fleetvisor.agent.core import Agent
    from fleetvisor.errors import NotFound

    clock = VirtualClock()
    agent = Agent(SimDriver(clock=clock, state_dir=tmp_path), clock)
    instance = await agent.create(spec())
    await agent.start(instance.id)
    whole = b"".join([chunk async for chunk in agent.logs(instance.id)]).decode()
    assert "created from image busybox" in whole and "started" in whole
    last = b"".join([chunk async for chunk in agent.logs(instance.id, tail=1)]).decode()
    assert last.count("\n") == 1 and "started" in last
    follow = agent.logs(instance.id, follow=True, tail=0)
    reader = asyncio.create_task(anext(follow))
    await clock.advance(0.5)
    await agent.stop(instance.id)
    await clock.advance(0.5)
    assert b"stopped" in await reader
    await agent.destroy(instance.id)
    await clock.advance(0.5)
    assert [chunk async for chunk in follow] == []  # the stream ends with the instance
    with pytest.raises(NotFound):
        await anext(agent.logs("nope"))
