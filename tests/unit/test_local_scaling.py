"""Local scaling on a host: policy validation, carve arithmetic, decisions, and the
manager carving and folding siblings through the sim driver on a virtual clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import ValidationError

from fleetvisor.agent.core import Agent
from fleetvisor.agent.scaling.balancer import ServiceBalancer
from fleetvisor.agent.scaling.decide import TriggerState
from fleetvisor.agent.scaling.metrics import GroupSampler
from fleetvisor.clock import VirtualClock
from fleetvisor.drivers.sim import SimDriver
from fleetvisor.drivers.sim.driver import demand_at
from fleetvisor.errors import InvalidInput
from fleetvisor.model.resources import Resources
from fleetvisor.model.scaling import PARENT_LABEL, ScalingPolicy, carve
from fleetvisor.model.specs import InstanceSpec, ResourceVector

POLICY = {
    "triggers": [{"metric": "cpu", "above": 0.45, "below": 0.3}],
    "hold_s": 1.0,
    "fold_hold_s": 2.0,
    "cooldown_s": 1.0,
    "carve_fraction": 0.5,
}


def policy(**changes: object) -> ScalingPolicy:
    return ScalingPolicy.model_validate({**POLICY, **changes})


# -- policy and arithmetic ------------------------------------------------------------------


def test_policy_refuses_what_would_loop_or_cannot_work() -> None:
    with pytest.raises(ValidationError, match="must be below the carve threshold"):
        policy(triggers=[{"metric": "cpu", "above": 0.5, "below": 0.5}])
    with pytest.raises(ValidationError, match="set service_port"):
        policy(triggers=[{"metric": "latency", "above": 200, "below": 50}])
    with pytest.raises(ValidationError, match="fraction of the allocation"):
        policy(triggers=[{"metric": "cpu", "above": 80, "below": 30}])
    with pytest.raises(ValidationError, match="once"):
        policy(triggers=[POLICY["triggers"][0], POLICY["triggers"][0]])  # type: ignore[index]
    with pytest.raises(ValidationError):
        policy(carve_fraction=1.0)
    assert policy().digest() == policy().digest() != policy(max_siblings=2).digest()


def test_carve_is_exact_and_respects_the_minimum() -> None:
    current = Resources(vcpus=1999, memory=1023, disk=11, net=101)
    kept, carved = carve(current, 0.5, Resources(vcpus=100, memory=32))
    assert kept + carved == current
    assert carved == Resources(999, 511, 5, 50)
    with pytest.raises(InvalidInput, match="below its minimum in vcpus"):
        carve(Resources(vcpus=300, memory=1024), 0.8, Resources(vcpus=100, memory=32))
    with pytest.raises(InvalidInput, match="no CPU or memory"):
        carve(Resources(vcpus=1, memory=1024), 0.5, Resources())


def test_demand_schedule() -> None:
    assert demand_at("300;1600@10;300@40", 0) == 300
    assert demand_at("300;1600@10;300@40", 10) == 1600
    assert demand_at("300;1600@10;300@40", 45) == 300


# -- decisions ----------------------------------------------------------------------------


def test_trigger_must_hold_and_cooldown_spaces_actions() -> None:
    state = TriggerState(policy(cooldown_s=5.0))
    assert state.observe(0.0, {"cpu": 0.9}, 0).action is None
    assert state.observe(0.5, {"cpu": 0.2}, 0).action is None  # dipped: the hold restarts
    assert state.observe(1.0, {"cpu": 0.9}, 0).action is None
    decision = state.observe(2.0, {"cpu": 0.9}, 0)
    assert decision.action == "carve" and "cpu 0.90 ≥ 0.45 for 1.0s" in decision.reason
    state.acted(2.0)
    assert state.observe(3.5, {"cpu": 0.9}, 0).action is None  # cooling down
    assert state.observe(4.0, {"cpu": 0.1}, 1).action is None
    assert state.observe(6.9, {"cpu": 0.1}, 1).action is None  # cooldown still
    assert state.observe(7.1, {"cpu": 0.1}, 1).action == "fold"


def test_no_carve_beyond_max_siblings_and_missing_metrics_do_not_fold() -> None:
    state = TriggerState(policy())
    state.observe(0.0, {"cpu": 0.9}, 1)
    assert state.observe(5.0, {"cpu": 0.9}, 1).action is None  # max_siblings = 1
    state = TriggerState(policy())
    state.observe(0.0, {}, 1)
    assert state.observe(10.0, {}, 1).action is None


def test_group_sampler_rates_over_the_window() -> None:
    sampler = GroupSampler(window=1.0)
    alloc = {"p": Resources(vcpus=1000, memory=100), "c": Resources(vcpus=1000, memory=100)}
    assert "cpu" not in sampler.observe(0.0, {"p": {"cpu_usage_seconds": 0.0}}, alloc)
    values = sampler.observe(
        0.5, {"p": {"cpu_usage_seconds": 0.5, "throttled_seconds": 0.25, "memory_mib": 50}}, alloc
    )
    assert values["cpu"] == pytest.approx(1.0)
    assert values["throttled"] == pytest.approx(0.5)
    assert values["memory"] == pytest.approx(0.5)
    # A driver without counters: instantaneous millicores.
    values = GroupSampler().observe(0.0, {"p": {"cpu_millicores": 250}}, alloc)
    assert values["cpu"] == pytest.approx(0.25)


# -- the manager on the sim driver ----------------------------------------------------------


def parent_spec(demand: str, **policy_changes: object) -> InstanceSpec:
    return InstanceSpec(
        id="a" * 32,
        name="web",
        image="busybox",
        labels={"sim.fleetvisor.io/demand": demand, "sim.fleetvisor.io/worker-millicores": "1000"},
        resources=ResourceVector(vcpus=2000, memory=1024, disk=10, net=100),
        scaling=policy(**policy_changes).model_dump(),
    )


async def run_for(clock: VirtualClock, seconds: float) -> None:
    for _ in range(int(seconds / 0.25)):
        await clock.advance(0.25)
        await asyncio.sleep(0)


async def test_manager_carves_under_load_and_folds_when_it_falls(tmp_path: Path) -> None:
    clock = VirtualClock()
    driver = SimDriver(clock=clock, state_dir=tmp_path / "sim")
    agent = Agent(driver, clock, state_dir=tmp_path / "agent")
    spec = parent_spec("500;1800@5;300@20")
    await agent.create(spec, start=True)
    size = spec.resources.to_resources()

    await run_for(clock, 4)
    assert len(await agent.list()) == 1  # 500 of 2000: below the trigger

    await run_for(clock, 4)  # from t=5 one worker is saturated: 1000/2000 = 0.5 >= 0.45
    reports = {r.id: r for r in await agent.list()}
    assert len(reports) == 2
    child = next(r for r in reports.values() if r.id != spec.id)
    assert child.parent == spec.id and child.name == "web-s1" and child.state == "running"
    parent = reports[spec.id]
    assert parent.scaling_digest == policy().digest()
    assert parent.resources.to_resources() + child.resources.to_resources() == size
    assert child.resources.vcpus == 1000 and child.resources.memory == 512
    notices = agent.scaling.take_notices()
    assert [n.kind for n in notices] == ["carved"]
    assert notices[0].child == child.id and "cpu" in notices[0].reason

    await run_for(clock, 15)  # demand falls at t=20; fold after 2 s below 0.3
    reports = {r.id: r for r in await agent.list()}
    assert list(reports) == [spec.id]
    assert reports[spec.id].resources.to_resources() == size
    assert [n.kind for n in agent.scaling.take_notices()] == ["folded"]
    await agent.scaling.close()


async def test_a_restarted_agent_settles_and_resumes(tmp_path: Path) -> None:
    clock = VirtualClock()
    driver = SimDriver(clock=clock, state_dir=tmp_path / "sim")
    agent = Agent(driver, clock, state_dir=tmp_path / "agent")
    spec = parent_spec("1800")
    await agent.create(spec, start=True)
    await run_for(clock, 3)
    assert len(await agent.list()) == 2
    await agent.scaling.close()

    # A crash between "sibling destroyed" and "parent resized": the parent is still small.
    child = next(r for r in await driver.list() if r.id != spec.id)
    await driver.destroy(child.id)
    again = Agent(
        SimDriver(clock=clock, state_dir=tmp_path / "sim"), clock, state_dir=tmp_path / "agent"
    )
    await again.scaling.restore()
    reports = await again.list()
    assert [r.id for r in reports] == [spec.id]
    assert reports[0].resources.to_resources() == spec.resources.to_resources()
    await run_for(clock, 3)  # the manager runs again and carves again
    assert len(await again.list()) == 2
    await again.scaling.close()


async def test_stop_and_destroy_fold_siblings_first(tmp_path: Path) -> None:
    clock = VirtualClock()
    driver = SimDriver(clock=clock, state_dir=tmp_path / "sim")
    agent = Agent(driver, clock, state_dir=tmp_path / "agent")
    spec = parent_spec("1800")
    await agent.create(spec, start=True)
    await run_for(clock, 3)
    assert len(await agent.list()) == 2
    stopped = await agent.stop(spec.id)
    assert stopped.resources.to_resources() == spec.resources.to_resources()
    assert [r.id for r in await agent.list()] == [spec.id]
    await agent.start(spec.id)
    await run_for(clock, 3)
    children = [r for r in await agent.list() if r.parent == spec.id]
    assert len(children) == 1
    assert (await driver.list())[0].id in (spec.id, children[0].id)
    # The controller removing a sibling folds it back into the parent.
    await agent.destroy(children[0].id)
    reports = await agent.list()
    assert [r.id for r in reports] == [spec.id]
    assert reports[0].resources.to_resources() == spec.resources.to_resources()
    await agent.destroy(spec.id)
    assert await agent.list() == []
    assert not list((tmp_path / "agent" / "scaling").glob("*.json"))


async def test_removing_the_policy_folds_and_stops_the_manager(tmp_path: Path) -> None:
    clock = VirtualClock()
    agent = Agent(SimDriver(clock=clock, state_dir=tmp_path / "sim"), clock)
    spec = parent_spec("1800")
    await agent.create(spec, start=True)
    await run_for(clock, 3)
    assert len(await agent.list()) == 2
    status = await agent.set_scaling(spec.model_copy(update={"scaling": None}))
    assert status == {"policy": None}
    await run_for(clock, 3)
    assert [r.id for r in await agent.list()] == [spec.id]
    # And setting it again on a running instance starts a manager.
    await agent.set_scaling(spec)
    await run_for(clock, 3)
    assert len(await agent.list()) == 2
    sibling = next(r for r in await agent.list() if r.id != spec.id)
    assert agent.driver._instances[sibling.id]["spec"]["labels"][PARENT_LABEL] == spec.id  # type: ignore[attr-defined]
    await agent.scaling.close()


# -- the service endpoint -----------------------------------------------------------------


async def test_balancer_spreads_drains_and_skips_a_dead_member() -> None:
    served: dict[str, int] = {"a": 0, "b": 0}

    def server(name: str):  # type: ignore[no-untyped-def]
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            served[name] += 1
            await asyncio.sleep(0.01)
            writer.write(f"HTTP/1.0 200 OK\r\nX-Served-By: {name}\r\n\r\n{name}".encode())
            await writer.drain()
            writer.close()

        return handle

    a = await asyncio.start_server(server("a"), "127.0.0.1", 0)
    b = await asyncio.start_server(server("b"), "127.0.0.1", 0)
    balancer = ServiceBalancer("127.0.0.1", 0)
    await balancer.start()
    balancer.add("a", "127.0.0.1", a.sockets[0].getsockname()[1])
    balancer.add("dead", "127.0.0.1", 1)  # refuses: skipped, never an error to the client
    balancer.add("b", "127.0.0.1", b.sockets[0].getsockname()[1])

    async def request() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        await writer.drain()
        data = await reader.read()
        writer.close()
        return data

    answers = await asyncio.gather(*(request() for _ in range(20)))
    assert all(answer.startswith(b"HTTP/1.0 200") for answer in answers)
    assert served["a"] > 0 and served["b"] > 0 and served["a"] + served["b"] == 20

    pending = asyncio.gather(*(request() for _ in range(10)))
    await asyncio.sleep(0)
    assert await balancer.drain("b", timeout=5.0)
    before = served["b"]
    answers = await pending
    answers += await asyncio.gather(*(request() for _ in range(5)))
    assert all(answer.startswith(b"HTTP/1.0 200") for answer in answers)
    assert served["b"] == before  # nothing new after the drain
    await balancer.close()
    a.close()
    b.close()


async def test_a_sibling_being_carved_is_not_reported_yet(tmp_path: Path) -> None:
    clock = VirtualClock()
    agent = Agent(SimDriver(clock=clock, state_dir=tmp_path / "sim"), clock)
    spec = parent_spec("1800")
    await agent.create(spec, start=True)
    await run_for(clock, 3)
    group = agent.scaling.groups[spec.id]
    (child_id,) = group.children
    group.children[child_id]["state"] = "carving"  # as between its start and its notice
    reports = await agent.list()
    assert [r.id for r in reports] == [spec.id]
    assert reports[0].resources == spec.resources  # its share still shown with the parent
    await agent.scaling.close()
