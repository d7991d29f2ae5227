"""End to end: a create survives a controller crash, and a failed create leaves nothing."""

from __future__ import annotations

import json
import os
import signal

import pytest

from .conftest import Fleet, assert_consistent, wait_for

SLOW = "sim.fleetvisor.io/create-seconds=3"
FAIL = "sim.fleetvisor.io/fail=create"


def operation(fleet: Fleet, op_id: str) -> dict | None:
    """`op show --json`, or None while the controller does not answer."""
    result = fleet.cli("op", "show", op_id, "--json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def settled(fleet: Fleet, expected: int) -> bool:
    """All hosts ready, agents hold `expected` copies and report their instances running."""
    hosts = fleet.hosts().values()
    held = sum(len(copies) for copies in fleet.agent_copies().values())
    return held == expected == sum(h["instances"] for h in hosts) and all(
        h["state"] == "ready" and h["metrics"].get("instances_running") == h["instances"]
        for h in hosts
    )


@pytest.mark.e2e
def test_create_in_flight_survives_controller_kill(fleet: Fleet) -> None:
    """kill -9 of the controller mid-create: the op ends succeeded or rolled back, never half."""
    accepted = fleet.json("run", "slow-1", "--image", "busybox", "--no-wait", "--label", SLOW)
    op_id = accepted["operation"]["id"]
    wait_for(
        "the create to reach the agent",
        lambda: (operation(fleet, op_id) or {}).get("step") == "create_on_host",
        timeout=10,
        every=0.05,
    )
    assert operation(fleet, op_id)["state"] == "running"

    controller = fleet.info["controller"]
    os.kill(controller["pid"], signal.SIGKILL)
    fleet.spawn(controller["argv"], "controller")

    final = wait_for(
        "the create operation to end",
        lambda: (
            (op := operation(fleet, op_id)) and op["state"] not in ("pending", "running") and op
        ),
        timeout=60,
    )
    assert final["state"] in ("succeeded", "rolled_back"), final
    wait_for(
        "hosts ready and agents in step with the store",
        lambda: settled(fleet, 1 if final["state"] == "succeeded" else 0),
    )
    if final["state"] == "succeeded":
        (instance,) = assert_consistent(fleet, 1)
        assert (instance["name"], instance["status"]) == ("slow-1", "running")
    else:
        assert assert_consistent(fleet, 0) == []
        assert fleet.cli("show", "slow-1", check=False).returncode != 0
    assert final["attempts"] >= 2  # the restarted controller ran it again


@pytest.mark.e2e
def test_failed_create_is_rolled_back(fleet: Fleet) -> None:
    """A create that fails on the host is rolled back: no instance, no allocation, clear error."""
    result = fleet.cli("run", "bad-1", "--image", "busybox", "--label", FAIL, check=False)
    assert result.returncode != 0
    assert "error: creating bad-1 rolled back: simulated create failure for bad-1" in " ".join(
        result.stderr.split()
    )
    (op,) = fleet.json("op", "ls", "--instance", "bad-1")
    assert (op["kind"], op["state"]) == ("create", "rolled_back")
    assert "simulated create failure" in op["error"]
    gone = fleet.cli("show", "bad-1", check=False)
    assert gone.returncode != 0 and "does not exist" in gone.stderr
    assert assert_consistent(fleet, 0) == []
    for host in fleet.hosts().values():
        assert host["allocated"] == {"vcpus": 0, "memory": 0, "disk": 0, "net": 0}
    assert [e["kind"] for e in fleet.events("--subject", "instance/bad-1")] == [
        "instance.placed",
        "instance.create_failed",
    ]
