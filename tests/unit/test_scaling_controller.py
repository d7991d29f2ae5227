"""Local scaling as the controller sees it: siblings adopted and folded with exact
accounting, policies set and removed through the API, operations on a scaled group."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from fleetvisor.api.app import create_app
from fleetvisor.controller.instances import InstanceRequest
from fleetvisor.controller.settings import ControllerSettings
from fleetvisor.errors import Conflict
from fleetvisor.fleet.inprocess import InProcessFleet
from fleetvisor.model.resources import Resources
from fleetvisor.model.scaling import ScalingPolicy
from fleetvisor.store.tables import EventRow, InstanceRow

SIZE = Resources(vcpus=2000, memory=1024, disk=10, net=100)
SETTINGS = ControllerSettings(heartbeat_interval=1.0, down_after_missed=3, operation_timeout=20.0)
POLICY = ScalingPolicy.model_validate(
    {
        "triggers": [{"metric": "cpu", "above": 0.45, "below": 0.3}],
        "hold_s": 1.0,
        "fold_hold_s": 2.0,
        "cooldown_s": 1.0,
    }
)


@pytest.fixture
async def fleet(tmp_path: Path, database_url: str) -> InProcessFleet:
    fleet = InProcessFleet(tmp_path, db_url=database_url, settings=SETTINGS)
    await fleet.add_host("host-1", capacity=Resources(8000, 8192, 100, 1000))
    return fleet


def request(demand: str, policy: ScalingPolicy | None = POLICY) -> InstanceRequest:
    return InstanceRequest(
        name="web",
        image="busybox",
        resources=SIZE,
        labels={"sim.fleetvisor.io/demand": demand, "sim.fleetvisor.io/worker-millicores": "1000"},
        scaling=policy,
    )


async def run(fleet: InProcessFleet, seconds: float) -> None:
    """Let the host's managers run, heartbeating every second."""
    for _ in range(int(seconds * 4)):
        await fleet.clock.advance(0.25)  # type: ignore[attr-defined]
        if int(fleet.clock.monotonic() * 4) % 4 == 0:
            await fleet.heartbeat("host-1")


def rows(fleet: InProcessFleet) -> dict[str, InstanceRow]:
    with fleet.controller.db.read() as session:
        return {r.name: r for r in session.scalars(select(InstanceRow))}


def kinds(fleet: InProcessFleet) -> list[str]:
    with fleet.controller.db.read() as session:
        return [e.kind for e in session.scalars(select(EventRow).order_by(EventRow.id))]


async def test_carve_and_fold_keep_the_host_allocation_exact(fleet: InProcessFleet) -> None:
    fleet.controller.instances.create(request("500;1800@3;300@15"))
    await fleet.settle()
    assert fleet.controller.hosts.get("host-1").allocated == SIZE
    await run(fleet, 6)
    group = rows(fleet)
    assert set(group) == {"web", "web-s1"}
    sibling = group["web-s1"]
    assert sibling.parent_id == group["web"].id and sibling.status == "running"
    assert group["web"].resources + sibling.resources == SIZE
    assert fleet.controller.hosts.get("host-1").allocated == SIZE  # unchanged
    with fleet.controller.db.read() as session:
        carved = session.scalars(select(EventRow).where(EventRow.kind == "instance.carved")).one()
    # Learnt with the host's notice: why, and when the trigger fired.
    assert "cpu" in carved.message and carved.data["triggered_at"] is not None
    assert fleet.controller.instances.scaling("web")["siblings"][0]["name"] == "web-s1"

    await run(fleet, 14)  # demand falls at 15 s; folds 2 s later
    group = rows(fleet)
    assert set(group) == {"web"} and group["web"].resources == SIZE
    assert fleet.controller.hosts.get("host-1").allocated == SIZE
    assert "instance.folded" in kinds(fleet)


async def test_siblings_are_not_managed_directly_and_stop_folds(fleet: InProcessFleet) -> None:
    fleet.controller.instances.create(request("1800"))
    await fleet.settle()
    await run(fleet, 4)
    assert "web-s1" in rows(fleet)
    with pytest.raises(Conflict, match="sibling"):
        fleet.controller.instances.delete("web-s1")
    with pytest.raises(Conflict, match="sibling"):
        fleet.controller.instances.set_power("web-s1", "stopped")  # type: ignore[arg-type]
    fleet.controller.instances.set_power("web", "stopped")  # type: ignore[arg-type]
    assert set(rows(fleet)) == {"web"} and rows(fleet)["web"].resources == SIZE
    await fleet.settle()
    assert [r.name for r in await fleet.agents["host-1"].list()] == ["web"]
    await fleet.heartbeat("host-1")
    assert set(rows(fleet)) == {"web"}
    assert fleet.controller.hosts.get("host-1").allocated == SIZE
    fleet.controller.instances.delete("web")
    await fleet.settle()
    assert rows(fleet) == {} and fleet.controller.hosts.get("host-1").allocated == Resources()


async def test_an_unaccounted_sibling_is_removed(fleet: InProcessFleet) -> None:
    instance, _ = fleet.controller.instances.create(request("300"))
    await fleet.settle()
    agent = fleet.agents["host-1"]
    # A host that claims a sibling bigger than what its parent gave up.
    from fleetvisor.model.specs import InstanceSpec, ResourceVector

    rogue = InstanceSpec(
        id="f" * 32,
        name="web-s9",
        image="busybox",
        labels={"fleetvisor.io/parent": instance.id},
        resources=ResourceVector(vcpus=500, memory=128, disk=0, net=0),
    )
    await agent.driver.create(rogue)
    reports = await agent.list()
    for report in reports:
        if report.id == rogue.id:
            report.parent = instance.id
    host = fleet.controller.hosts.get("host-1")
    result = fleet.controller.hosts.heartbeat(host.id, metrics={}, instances=reports)
    assert result.destroy == [rogue.id]
    assert "instance.scaling_mismatch" in kinds(fleet)
    assert set(rows(fleet)) == {"web"}


async def test_policy_through_the_api(fleet: InProcessFleet) -> None:
    fleet.controller.instances.create(request("1800", policy=None))
    await fleet.settle()
    api = TestClient(create_app(fleet.controller, run_loops=False))
    # The test client runs the app in a loop of its own: the host takes the policy with
    # its next heartbeat here, as a host that was unreachable at the time would.
    fleet.unreachable.add("host-1")
    headers = {"Authorization": f"Bearer {fleet.controller.admin_token}"}
    bad = api.put(
        "/v1/instances/web/scaling-policy",
        json={"triggers": [{"metric": "cpu", "above": 0.3, "below": 0.5}]},
        headers=headers,
    )
    assert bad.status_code == 422 and "fold threshold" in bad.text
    answer = api.put("/v1/instances/web/scaling-policy", json=POLICY.model_dump(), headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["policy"]["hold_s"] == 1.0
    fleet.unreachable.clear()
    await run(fleet, 5)
    assert "web-s1" in rows(fleet)
    shown = api.get("/v1/instances/web-s1", headers=headers).json()
    assert shown["parent"] == "web"
    assert api.get("/v1/instances/web-s1/scaling-policy", headers=headers).json() == {
        "parent": "web"
    }
    assert api.delete("/v1/instances/web-s1", headers=headers).status_code == 409
    fleet.unreachable.add("host-1")
    removed = api.delete("/v1/instances/web/scaling-policy", headers=headers)
    assert removed.status_code == 200 and removed.json()["policy"] is None
    fleet.unreachable.clear()
    await run(fleet, 2)
    assert set(rows(fleet)) == {"web"} and rows(fleet)["web"].resources == SIZE


async def test_a_policy_set_while_the_host_was_away_arrives_with_a_heartbeat(
    fleet: InProcessFleet,
) -> None:
    fleet.controller.instances.create(request("1800", policy=None))
    await fleet.settle()
    fleet.controller.instances.set_scaling_policy("web", POLICY)  # the host is not told
    agent = fleet.agents["host-1"]
    assert agent.scaling.status((await agent.list())[0].id)["policy"] is None
    await fleet.heartbeat("host-1")
    assert agent.scaling.status((await agent.list())[0].id)["policy"] is not None
    await run(fleet, 4)
    assert "web-s1" in rows(fleet)
