"""Migration as the controller drives it, on simulated hosts: placement of the target,
exact accounting, refusals that say what to change, rollback when the target fails,
resuming after a controller crash, drains, and remedies for detected issues."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import select

from fleetvisor.controller.instances import InstanceRequest
from fleetvisor.controller.settings import ControllerSettings
from fleetvisor.errors import Conflict, NotFound
from fleetvisor.fleet.inprocess import InProcessFleet
from fleetvisor.model.entities import HostState
from fleetvisor.model.health import Detection, HealthPolicy, Issue
from fleetvisor.model.resources import Resources
from fleetvisor.store.tables import EventRow, InstanceRow, OperationRow

SIZE = Resources(vcpus=1000, memory=512, disk=1, net=10)
CAPACITY = Resources(8000, 8192, 100, 1000)
SETTINGS = ControllerSettings(heartbeat_interval=1.0, down_after_missed=3, operation_timeout=20.0)
POLICY = HealthPolicy(backoff_s=60.0, max_migrations=2)


@pytest.fixture
async def fleet(tmp_path: Path, database_url: str) -> InProcessFleet:
    fleet = InProcessFleet(tmp_path, db_url=database_url, settings=SETTINGS)
    for name in ("host-1", "host-2", "host-3"):
        await fleet.add_host(name, capacity=CAPACITY)
    return fleet


def create(fleet: InProcessFleet, name: str = "web", host: str = "host-1", **kw: object) -> None:
    """Create `name` on `host` (the others drained meanwhile, so the engine picks it)."""
    others = [h for h in ("host-1", "host-2", "host-3") if h != host]
    for other in others:
        fleet.controller.hosts.set_state(other, HostState.DRAINING)
    fleet.controller.instances.create(
        InstanceRequest(name=name, image="busybox", resources=SIZE, **kw)  # type: ignore[arg-type]
    )
    for other in others:
        fleet.controller.hosts.set_state(other, HostState.READY)


def row(fleet: InProcessFleet, name: str = "web") -> InstanceRow:
    with fleet.controller.db.read() as session:
        found = session.scalars(select(InstanceRow).where(InstanceRow.name == name)).one()
        return found


def host_of(fleet: InProcessFleet, name: str = "web") -> str:
    current = row(fleet, name)
    return next(h.name for h in fleet.controller.hosts.all() if h.id == current.host_id)


def events(fleet: InProcessFleet, kind: str) -> list[EventRow]:
    with fleet.controller.db.read() as session:
        return list(session.scalars(select(EventRow).where(EventRow.kind == kind)))


async def on_host(fleet: InProcessFleet, host: str) -> dict[str, str]:
    return {r.name: r.state for r in await fleet.agents[host].list()}


async def test_cold_migration_moves_the_instance_and_its_allocation(fleet: InProcessFleet) -> None:
    create(fleet)
    await fleet.settle()
    op = fleet.controller.instances.migrate("web", to="host-2")
    await fleet.settle()
    done = fleet.controller.operation(op.id)
    assert done.state == "succeeded", done.error
    assert done.params["result"]["mode"] == "cold"
    assert host_of(fleet) == "host-2" and row(fleet).status == "running"
    assert await on_host(fleet, "host-1") == {}
    assert await on_host(fleet, "host-2") == {"web": "running"}
    hosts = {h.name: h.allocated for h in fleet.controller.hosts.all()}
    assert hosts == {"host-1": Resources(), "host-2": SIZE, "host-3": Resources()}
    (event,) = events(fleet, "instance.migrated")
    assert "host-1 -> host-2" in event.message


async def test_the_engine_picks_a_target_other_than_the_source(fleet: InProcessFleet) -> None:
    create(fleet)
    await fleet.settle()
    fleet.controller.instances.migrate("web")
    await fleet.settle()
    assert host_of(fleet) in {"host-2", "host-3"}


async def test_refusals_say_what_to_change(fleet: InProcessFleet) -> None:
    create(fleet)
    await fleet.settle()
    with pytest.raises(Conflict, match="already runs on host-1"):
        fleet.controller.instances.migrate("web", to="host-1")
    with pytest.raises(NotFound, match="fleetvisor hosts"):
        fleet.controller.instances.migrate("web", to="nowhere")
    with pytest.raises(Conflict, match="use --cold"):
        fleet.controller.instances.migrate("web", mode="live")
    with pytest.raises(NotFound):
        fleet.controller.instances.migrate("nobody")
    fleet.controller.instances.migrate("web", to="host-2")
    with pytest.raises(Conflict, match="in flight"):
        fleet.controller.instances.migrate("web", to="host-3")


async def test_a_target_that_fails_leaves_the_instance_running_on_the_source(
    fleet: InProcessFleet,
) -> None:
    create(fleet)
    await fleet.settle()
    fleet.unreachable.add("host-2")
    op = fleet.controller.instances.migrate("web", to="host-2")
    await fleet.settle()
    done = fleet.controller.operation(op.id)
    assert done.state == "failed" and "host-2" in done.error
    assert host_of(fleet) == "host-1"
    assert await on_host(fleet, "host-1") == {"web": "running"}
    hosts = {h.name: h.allocated for h in fleet.controller.hosts.all()}
    assert hosts == {"host-1": SIZE, "host-2": Resources(), "host-3": Resources()}
    assert events(fleet, "instance.migration_failed")


async def test_a_migration_never_breaks_a_placement_constraint(fleet: InProcessFleet) -> None:
    fleet.controller.inventory.create_group("spread", "anti-affinity", "hard", "host", None)
    create(fleet, "a", placement_group="spread")
    create(fleet, "b", host="host-2", placement_group="spread")
    await fleet.settle()
    op = fleet.controller.instances.migrate("a", to="host-2")  # b is there
    await fleet.settle()
    done = fleet.controller.operation(op.id)
    assert done.state == "failed" and "no host can take a" in done.error
    assert host_of(fleet, "a") == "host-1"
    assert await on_host(fleet, "host-1") == {"a": "running"}  # never stopped
    fleet.controller.instances.migrate("a")  # the engine finds the one host that keeps it
    await fleet.settle()
    assert host_of(fleet, "a") == "host-3"


async def test_a_controller_crash_mid_migration_resumes_to_one_running_copy(
    fleet: InProcessFleet,
) -> None:
    create(fleet)
    await fleet.settle()
    target = fleet.agents["host-2"]
    real = target.migrate_in
    entered = asyncio.Event()

    async def hang(*args: object, **kwargs: object) -> object:
        entered.set()
        await asyncio.Event().wait()  # the controller dies while the target works
        raise AssertionError("unreachable")

    target.migrate_in = hang  # type: ignore[method-assign]
    op = fleet.controller.instances.migrate("web", to="host-2")
    runner = fleet.controller.runner
    runner.dispatch()
    await asyncio.wait_for(entered.wait(), 5)
    await runner.stop()  # the crash: the operation row stays `running`, packed
    assert fleet.controller.operation(op.id).params.get("packed")
    assert await on_host(fleet, "host-1") == {"web": "stopped"}
    target.migrate_in = real  # type: ignore[method-assign]
    await fleet.settle()  # the next controller start resumes it
    assert fleet.controller.operation(op.id).state == "succeeded"
    assert await on_host(fleet, "host-1") == {}
    assert await on_host(fleet, "host-2") == {"web": "running"}


async def test_drain_migrates_every_instance_one_after_the_other(fleet: InProcessFleet) -> None:
    create(fleet, "a")
    create(fleet, "b")
    await fleet.settle()
    host, ops = fleet.controller.hosts.drain("host-1")
    assert host.state == "draining" and len(ops) == 2
    with fleet.controller.db.read() as session:
        second = session.get(OperationRow, ops[1])
        assert second is not None and second.params["after"] == ops[0]
    await fleet.settle()
    assert await on_host(fleet, "host-1") == {}
    assert {host_of(fleet, "a"), host_of(fleet, "b")} <= {"host-2", "host-3"}


async def test_a_detection_migrates_by_policy_then_backs_off(fleet: InProcessFleet) -> None:
    create(fleet, health=POLICY)
    await fleet.settle()
    web = row(fleet)
    first = Detection(
        issue=Issue.NOISY_NEIGHBOUR, instance=web.id, at=1.0, evidence={"cpu_wait": 0.9}
    )
    host = fleet.controller.hosts.get("host-1")
    result = fleet.controller.hosts.heartbeat(
        host.id, metrics={}, instances=await fleet.agents["host-1"].list(), detections=[first]
    )
    assert len(result.recover) == 1
    await fleet.settle()
    moved_to = host_of(fleet)
    assert moved_to != "host-1"
    (issue,) = events(fleet, "instance.issue")
    assert issue.data["evidence"] == {"cpu_wait": 0.9}
    # Again at once on the new host: inside the back-off, so no second move.
    host = fleet.controller.hosts.get(moved_to)
    again = first.model_copy(update={"at": 2.0})
    result = fleet.controller.hosts.heartbeat(
        host.id, metrics={}, instances=await fleet.agents[moved_to].list(), detections=[again]
    )
    assert result.recover == []
    (skipped,) = events(fleet, "instance.remedy_skipped")
    assert "backing off" in skipped.message


async def test_an_alert_remedy_only_records_the_issue(fleet: InProcessFleet) -> None:
    create(fleet, health=POLICY)
    await fleet.settle()
    detection = Detection(issue=Issue.CPU_THROTTLED, instance=row(fleet).id, at=1.0)
    host = fleet.controller.hosts.get("host-1")
    result = fleet.controller.hosts.heartbeat(
        host.id, metrics={}, instances=await fleet.agents["host-1"].list(), detections=[detection]
    )
    assert result.recover == [] and events(fleet, "instance.issue")
    assert host_of(fleet) == "host-1"


async def test_a_down_host_is_evacuated_for_instances_with_a_policy(fleet: InProcessFleet) -> None:
    create(fleet, "kept", health=POLICY)
    create(fleet, "plain")
    await fleet.settle()
    fleet.unreachable.add("host-1")
    await fleet.clock.advance(5.0)  # type: ignore[attr-defined]
    for name in ("host-2", "host-3"):
        await fleet.heartbeat(name)
    assert fleet.controller.hosts.mark_stale_hosts_down() == ["host-1"]
    await fleet.settle()
    assert host_of(fleet, "kept") != "host-1" and row(fleet, "kept").status == "running"
    assert host_of(fleet, "plain") == "host-1"  # no policy: it waits for its host
    (event,) = events(fleet, "instance.migrated")
    assert "data lost" in event.message


async def run(fleet: InProcessFleet, seconds: float, host: str = "host-1") -> None:
    """Let the hosts' monitors run on the virtual clock, heartbeating every second."""
    for _ in range(int(seconds * 4)):
        await fleet.clock.advance(0.25)  # type: ignore[attr-defined]
        if int(fleet.clock.monotonic() * 4) % 4 == 0:
            for name in fleet.agents:
                await fleet.heartbeat(name)
        await fleet.settle()


async def test_a_noisy_neighbour_seen_by_the_host_moves_the_instance(
    fleet: InProcessFleet,
) -> None:
    policy = HealthPolicy.model_validate({"detectors": {"hold_s": 1.0, "cpu_wait": 0.5}})
    faults = {"sim.fleetvisor.io/faults": "cpu_wait=0.9@1"}
    create(fleet, health=policy, labels=faults)
    await fleet.settle()
    await run(fleet, 6)
    (issue,) = [e for e in events(fleet, "instance.issue") if e.data["host"] == "host-1"]
    assert issue.data["issue"] == "noisy_neighbour" and issue.data["evidence"]
    assert host_of(fleet) != "host-1"
    assert row(fleet).status == "running"


async def test_restarts_in_place_escalate_to_a_migration(fleet: InProcessFleet) -> None:
    policy = HealthPolicy.model_validate({"max_restarts": 2, "restart_window_s": 60})
    create(fleet, health=policy, labels={"sim.fleetvisor.io/faults": "exit@1"})
    await fleet.settle()
    await run(fleet, 12)
    issues = [e.data for e in events(fleet, "instance.issue") if e.data["host"] == "host-1"]
    assert [i["action"] for i in issues if i["issue"] == "exited"][:2] == ["restart", "restart"]
    assert "restart_loop" in [i["issue"] for i in issues]
    assert events(fleet, "instance.migrated") and host_of(fleet) != "host-1"
