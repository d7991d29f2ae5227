"""End to end: a local fleet survives an agent's `kill -9` and comes back whole."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import threading
import time

import pytest

from .conftest import DOWN_TIMEOUT, FLEETVISOR, SHUTDOWN_TIMEOUT, Fleet, assert_consistent, wait_for

COUNT = 20
RUN_ARGS = ["--image", "busybox", "--cpu", "0.5", "--memory", "256M", "--json"]


def create_instances(fleet: Fleet, count: int, batch: int = 4) -> None:
    """Run `fleetvisor run` for web-1..web-`count`, `batch` at a time (2 CPUs: no starving)."""
    for first in range(1, count + 1, batch):
        procs = [
            subprocess.Popen(
                [FLEETVISOR, "run", f"web-{n}", *RUN_ARGS],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=fleet.env,
            )
            for n in range(first, min(first + batch, count + 1))
        ]
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            result = json.loads(out)
            assert result["operation"]["state"] == "succeeded"
            assert result["instance"]["status"] == "running", result


def follow_events(fleet: Fleet, until: str, action) -> list[dict]:  # type: ignore[no-untyped-def]
    """Stream `events --follow --json`, do `action`, read lines until an `until` event shows."""
    proc = subprocess.Popen(
        [FLEETVISOR, "events", "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=fleet.env,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen: list[dict] = []
    try:
        seen.append(json.loads(lines.get(timeout=15)))  # streaming has begun
        action()
        deadline = time.monotonic() + 15
        while not any(e["kind"] == until for e in seen) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                seen.append(json.loads(lines.get(timeout=0.5)))
    finally:
        proc.terminate()
        proc.wait(10)
    return seen


@pytest.mark.e2e
def test_agent_kill_and_restart_keeps_instances(fleet: Fleet) -> None:
    """20 instances survive a kill -9 of their agent: down, unknown, then back with no dupes."""
    create_instances(fleet, COUNT)
    instances = fleet.instances()
    assert [i["status"] for i in instances] == ["running"] * COUNT
    assert_consistent(fleet, COUNT)

    per_host = {h: [i["name"] for i in instances if i["host"] == h] for h in fleet.hosts()}
    victim = max(per_host, key=lambda h: len(per_host[h]))
    assert per_host[victim], "no host got an instance"
    agent = fleet.agent(victim)
    marker = fleet.events()[-1]["id"]
    os.kill(agent["pid"], signal.SIGKILL)
    killed_at = time.monotonic()

    wait_for(f"{victim} down", lambda: fleet.hosts()[victim]["state"] == "down", DOWN_TIMEOUT)
    assert time.monotonic() - killed_at <= DOWN_TIMEOUT
    others = {n: h["state"] for n, h in fleet.hosts().items() if n != victim}
    assert set(others.values()) == {"ready"}, others
    downs = [e for e in fleet.events("--kind", "host.down") if e["id"] > marker]
    assert [e["subject"] for e in downs] == [f"host/{victim}"]
    assert downs[0]["data"]["instances_affected"] == len(per_host[victim])
    status = {i["name"]: i["status"] for i in fleet.instances()}
    assert {status[n] for n in per_host[victim]} == {"unknown"}
    assert {s for n, s in status.items() if n not in per_host[victim]} <= {"running"}

    fleet.spawn(agent["argv"], victim)
    wait_for(f"{victim} ready", lambda: fleet.hosts()[victim]["state"] == "ready")
    wait_for(
        "all instances running",
        lambda: [i["status"] for i in fleet.instances()] == ["running"] * COUNT,
    )
    after = assert_consistent(fleet, COUNT)
    assert {i["name"]: i["host"] for i in after} == {i["name"]: i["host"] for i in instances}
    assert fleet.events("--kind", "host.up")[-1]["subject"] == f"host/{victim}"
    wait_for(
        f"{victim} agent reports its instances running",
        lambda: fleet.hosts()[victim]["metrics"].get("instances_running") == len(per_host[victim]),
    )

    # Stop, start, show and remove one of the recovered instances.
    name = per_host[victim][0]
    assert fleet.json("stop", name)["state"] == "succeeded"
    assert fleet.json("show", name)["status"] == "stopped"
    assert fleet.json("start", name)["state"] == "succeeded"
    shown = fleet.json("show", name)
    assert (shown["status"], shown["host"]) == ("running", victim)
    assert [o["kind"] for o in shown["operations"]][:3] == ["start", "stop", "create"]
    assert {"instance.stopped", "instance.running"} <= {e["kind"] for e in shown["events"]}

    streamed = follow_events(fleet, "instance.deleted", lambda: fleet.cli("rm", name))
    assert [e["id"] for e in streamed] == sorted({e["id"] for e in streamed})
    deleted = [e for e in streamed if e["kind"] == "instance.deleted"]
    assert [e["subject"] for e in deleted] == [f"instance/{name}"]
    gone = fleet.cli("show", name, check=False)
    assert gone.returncode != 0 and "does not exist" in gone.stderr
    assert_consistent(fleet, COUNT - 1)

    code, seconds = fleet.shutdown()
    assert code == 0, fleet.up_log()
    assert seconds < SHUTDOWN_TIMEOUT
    restarted = fleet.owned[0][0]
    assert restarted.returncode is not None
    assert not (fleet.state_dir / "fleet.json").exists()
