"""The controller's services and operations against in-process sim agents on a virtual
clock: lifecycle, rollback, host liveness, reconciliation and crash recovery."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from fleetvisor.clock import VirtualClock
from fleetvisor.controller.instances import InstanceRequest
from fleetvisor.controller.settings import ControllerSettings
from fleetvisor.errors import AlreadyExists, Conflict, InsufficientCapacity, InvalidInput
from fleetvisor.fleet.inprocess import InProcessFleet
from fleetvisor.model.entities import PowerState
from fleetvisor.model.resources import Resources
from fleetvisor.model.specs import InstanceSpec, ResourceVector
from fleetvisor.store.tables import EventRow, OperationRow

SMALL = Resources(vcpus=500, memory=256, disk=1, net=10)
SETTINGS = ControllerSettings(heartbeat_interval=1.0, down_after_missed=3, operation_timeout=20.0)


@pytest.fixture
async def fleet(tmp_path: Path, database_url: str) -> InProcessFleet:
    fleet = InProcessFleet(tmp_path, db_url=database_url, settings=SETTINGS)
    for name in ("host-1", "host-2"):
        await fleet.add_host(name, capacity=Resources(2000, 2048, 100, 1000))
    return fleet


def request(name: str, **kw: object) -> InstanceRequest:
    return InstanceRequest(name=name, image="busybox", resources=SMALL, **kw)  # type: ignore[arg-type]


def events(fleet: InProcessFleet, kind: str) -> list[EventRow]:
    with fleet.controller.db.read() as session:
        return list(session.scalars(select(EventRow).where(EventRow.kind == kind)))


def op_state(fleet: InProcessFleet, op_id: str) -> str:
    return fleet.controller.operation(op_id).state


async def test_create_places_reserves_and_runs(fleet: InProcessFleet) -> None:
    instance, op = fleet.controller.instances.create(request("web-1"))
    await fleet.settle()
    assert op_state(fleet, op.id) == "succeeded"
    assert fleet.controller.instances.get("web-1").status == "running"
    assert fleet.controller.hosts.get("host-1").allocated == SMALL
    reports = await fleet.agents["host-1"].list()
    assert [(r.id, r.state) for r in reports] == [(instance.id, "running")]
    assert [e.kind for e in events(fleet, "instance.placed")] == ["instance.placed"]


async def test_first_fit_fills_then_spills(fleet: InProcessFleet) -> None:
    for i in range(6):
        fleet.controller.instances.create(request(f"i-{i}"))
    await fleet.settle()
    placed = {i.name: i.host_id for i in fleet.controller.instances.all()}
    host1 = fleet.controller.hosts.get("host-1").id
    assert sum(h == host1 for h in placed.values()) == 4  # 4 x 0.5 CPU fill 2 CPUs
    with pytest.raises(InsufficientCapacity, match="short by"):
        for i in range(6, 9):
            fleet.controller.instances.create(request(f"i-{i}"))


async def test_stop_start_delete_release_capacity(fleet: InProcessFleet) -> None:
    instance, _ = fleet.controller.instances.create(request("web-1"))
    await fleet.settle()
    stop = fleet.controller.instances.set_power("web-1", PowerState.STOPPED)
    with pytest.raises(Conflict, match="busy"):
        fleet.controller.instances.set_power("web-1", PowerState.RUNNING)
    await fleet.settle()
    assert op_state(fleet, stop.id) == "succeeded"
    assert fleet.controller.instances.get("web-1").status == "stopped"
    assert (await fleet.agents["host-1"].list())[0].state == "stopped"
    fleet.controller.instances.set_power("web-1", PowerState.RUNNING)
    await fleet.settle()
    assert fleet.controller.instances.get("web-1").status == "running"
    delete = fleet.controller.instances.delete("web-1")
    await fleet.settle()
    assert op_state(fleet, delete.id) == "succeeded"
    assert fleet.controller.instances.all() == []
    assert fleet.controller.hosts.get("host-1").allocated == Resources()
    assert await fleet.agents["host-1"].list() == []


async def test_bad_requests_are_refused_with_advice(fleet: InProcessFleet) -> None:
    fleet.controller.instances.create(request("web-1"))
    with pytest.raises(AlreadyExists, match="pick another name"):
        fleet.controller.instances.create(request("web-1"))
    with pytest.raises(InvalidInput, match="lowercase"):
        fleet.controller.instances.create(request("Web_1"))
    with pytest.raises(InvalidInput, match="cpu > 0"):
        fleet.controller.instances.create(
            InstanceRequest(name="z", image="busybox", resources=Resources(0, 256))
        )


async def test_driver_failure_rolls_create_back(fleet: InProcessFleet) -> None:
    _, op = fleet.controller.instances.create(
        request("bad", labels={"sim.fleetvisor.io/fail": "create"})
    )
    await fleet.settle()
    final = fleet.controller.operation(op.id)
    assert final.state == "rolled_back"
    assert "simulated create failure" in final.error
    assert fleet.controller.instances.all() == []
    assert fleet.controller.hosts.get("host-1").allocated == Resources()
    assert len(events(fleet, "instance.create_failed")) == 1


async def test_unreachable_agent_rolls_create_back_at_deadline(fleet: InProcessFleet) -> None:
    fleet.unreachable.add("host-1")
    _, op = fleet.controller.instances.create(request("web-1"))
    await fleet.settle()
    assert op_state(fleet, op.id) == "rolled_back"
    assert "unreachable" in fleet.controller.operation(op.id).error
    assert fleet.controller.hosts.get("host-1").allocated == Resources()


async def test_missed_heartbeats_mark_host_down_and_instances_unknown(
    fleet: InProcessFleet,
) -> None:
    fleet.controller.instances.create(request("web-1"))
    await fleet.settle()
    clock = fleet.clock
    assert isinstance(clock, VirtualClock)
    await clock.advance(2.5)
    await fleet.heartbeat("host-2")
    assert fleet.controller.hosts.mark_stale_hosts_down() == []
    await clock.advance(1.0)  # host-1 silent for 3.5s > 3 x 1s
    assert fleet.controller.hosts.mark_stale_hosts_down() == ["host-1"]
    assert fleet.controller.hosts.get("host-1").state == "down"
    assert fleet.controller.instances.get("web-1").status == "unknown"
    (down,) = events(fleet, "host.down")
    assert down.data["instances_affected"] == 1 and down.data["gap_seconds"] >= 3.0
    # The agent comes back with its instance: reconciled, not duplicated.
    assert await fleet.register("host-1") == []
    assert fleet.controller.hosts.get("host-1").state == "ready"
    assert fleet.controller.instances.get("web-1").status == "running"
    assert len(await fleet.agents["host-1"].list()) == 1


async def test_instance_lost_by_its_host_is_recreated_there(fleet: InProcessFleet) -> None:
    instance, _ = fleet.controller.instances.create(request("web-1"))
    await fleet.settle()
    await fleet.agents["host-1"].driver.destroy(instance.id)  # e.g. the machine rebooted
    await fleet.register("host-1")
    assert len(events(fleet, "instance.missing")) == 1
    await fleet.settle()
    reports = await fleet.agents["host-1"].list()
    assert [(r.id, r.state) for r in reports] == [(instance.id, "running")]
    assert fleet.controller.instances.get("web-1").status == "running"
    assert fleet.controller.hosts.get("host-1").allocated == SMALL  # not reserved twice


async def test_orphans_on_a_returning_host_are_removed(fleet: InProcessFleet) -> None:
    agent = fleet.agents["host-2"]
    await agent.create(
        InstanceSpec(
            id="f" * 32, name="ghost", image="x", resources=ResourceVector(vcpus=1, memory=1)
        )
    )
    removed = await fleet.heartbeat("host-2")
    assert removed == ["f" * 32]
    assert await agent.list() == []
    assert len(events(fleet, "instance.orphan")) == 1


async def test_delete_while_host_unreachable_cleans_up_when_it_returns(
    fleet: InProcessFleet,
) -> None:
    fleet.controller.instances.create(request("web-1"))
    await fleet.settle()
    fleet.unreachable.add("host-1")
    fleet.controller.hosts.mark_stale_hosts_down()
    await fleet.clock.advance(10)  # type: ignore[attr-defined]
    fleet.controller.hosts.mark_stale_hosts_down()
    op = fleet.controller.instances.delete("web-1")
    await fleet.settle()
    assert op_state(fleet, op.id) == "succeeded"
    assert "host unreachable" in fleet.controller.operation(op.id).error
    assert fleet.controller.hosts.get("host-1").allocated == Resources()
    fleet.unreachable.discard("host-1")
    assert len(await fleet.register("host-1")) == 1
    assert await fleet.agents["host-1"].list() == []


async def test_restarted_controller_resumes_an_interrupted_create(
    tmp_path: Path, database_url: str
) -> None:
    """A create left `running` by a dead controller completes once, after a restart."""
    first = InProcessFleet(tmp_path, db_url=database_url, settings=SETTINGS)
    await first.add_host("host-1")
    instance, op = first.controller.instances.create(request("web-1"))
    with first.controller.db.write() as session:  # what a crash mid-handler leaves behind
        row = session.get(OperationRow, op.id)
        assert row is not None
        row.state, row.step, row.attempts = "running", "create_on_host", 1
    agent = first.agents["host-1"]
    await agent.create(
        InstanceSpec(
            id=instance.id, name="web-1", image="busybox", resources=ResourceVector.of(SMALL)
        )
    )
    first.controller.db.dispose()

    second = InProcessFleet(tmp_path, db_url=database_url, settings=SETTINGS)
    second.agents["host-1"] = agent  # the agent kept running through the crash
    await second.settle()
    final = second.controller.operation(op.id)
    assert (final.state, final.attempts) == ("succeeded", 2)
    assert [(r.id, r.state) for r in await agent.list()] == [(instance.id, "running")]
    assert second.controller.hosts.get("host-1").allocated == SMALL


async def test_heartbeats_keep_a_sampled_utilization_history(fleet: InProcessFleet) -> None:
    """One sample per host per sample interval, instance usage with it; old ones pruned."""
    from fleetvisor.store.tables import HostSampleRow

    fleet.controller.instances.create(request("web-1"))
    await fleet.settle()
    clock = fleet.clock
    assert isinstance(clock, VirtualClock)
    for _ in range(30):  # 30 heartbeats, 5 s apart: a sample every 60 s
        await clock.advance(5.0)
        await fleet.heartbeat("host-1")
    with fleet.controller.db.read() as session:
        samples = list(session.scalars(select(HostSampleRow).order_by(HostSampleRow.at)))
    assert len(samples) == 3
    # Fractions of the host's capacity (the sim workload may idle to 0 in one sample).
    assert all(0.0 <= s.cpu <= 1.0 and 0.0 <= s.memory <= 1.0 for s in samples)
    assert any(s.cpu > 0.0 for s in samples) and any(s.memory > 0.0 for s in samples)
    assert fleet.controller.instances.get("web-1").usage["cpu_millicores"] > 0
    await clock.advance(SETTINGS.sample_retention - 50)  # cutoff between 2nd and 3rd
    assert fleet.controller.hosts.prune_samples() == 2


async def test_rebalance_consolidates_with_ordered_cold_moves(fleet: InProcessFleet) -> None:
    """Fragmented hosts are consolidated: the plan's moves run in order, each instance
    ends on exactly one host, allocations follow, and a dry run changes nothing."""
    from fleetvisor.controller.moves import plan_rebalance_moves

    for i in range(6):
        fleet.controller.instances.create(request(f"i-{i}"))
    await fleet.settle()
    for name in ("i-0", "i-1"):  # host-1 keeps 2 of 4, host-2 has 2: two half-empty hosts
        fleet.controller.instances.delete(name)
    await fleet.settle()
    service = fleet.controller.instances
    dry = plan_rebalance_moves(service, max_moves=4, dry_run=True)
    assert (dry["hosts_used_before"], dry["hosts_used_after"]) == (2, 1)
    assert dry["operations"] == [] and 0 < len(dry["moves"]) <= 4
    plan = plan_rebalance_moves(service, max_moves=4, dry_run=False)
    await fleet.settle()
    states = [fleet.controller.operation(op).state for op in plan["operations"]]
    assert states == ["succeeded"] * len(plan["operations"])
    placed = {i.name: i.host_id for i in service.all()}
    assert len(set(placed.values())) == 1 and len(placed) == 4
    (host_id,) = set(placed.values())
    for name in ("host-1", "host-2"):
        host = fleet.controller.hosts.get(name)
        reports = await fleet.agents[name].list()
        expected = SMALL * 4 if host.id == host_id else Resources()
        assert host.allocated == expected
        assert len(reports) == (4 if host.id == host_id else 0)
    assert len(events(fleet, "instance.moved")) == len(plan["moves"])
