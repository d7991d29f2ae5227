"""End to end: execution monitoring and migration on a real two-host runc fleet.

memcounter holds memory and counts in memory, printing `counter N` every tick, so the
logs tell a live migration (the count goes on) from a cold one (it starts at 1 again);
files under /data tell whether the writable layer travelled. Faults are real: a CPU
hog beside the instance, an allocation past the memory limit, a probe that starts
failing, and `kill -9` of an agent or of the controller in the middle of a migration.
"""

from __future__ import annotations

import json
import os
import re
import signal
from typing import Any

import pytest

from fleetvisor.client import FleetClient

from .conftest import (
    RUNC_DOWN_AFTER,
    RUNC_HEARTBEAT,
    RuncFleet,
    process_running,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

IMAGE = "memcounter:latest"
COUNTER = re.compile(r"^counter (\d+)$", re.M)
DOWN_WINDOW = RUNC_HEARTBEAT * RUNC_DOWN_AFTER + 10.0
# Room for a CPU hog beside its victim: each host offers 4 CPUs of the machine's 2,
# so they contend for real (the point of the noisy-neighbour case).
RUNC_EXTRA_UP_ARGS = ["--capacity", "cpu=4,memory=2048M,disk=20G,net=1000"]


def needs_criu() -> None:
    from fleetvisor.drivers.runc.driver import checkpoint_missing

    missing = checkpoint_missing()
    if missing:
        print(f"\nskipping live migration: {missing}")
        pytest.skip(missing)


def push_memcounter(fleet: RuncFleet) -> None:
    fleet.cli("image", "build", "memcounter", "--name", IMAGE)


def run(fleet: RuncFleet, name: str, script: str, *options: str, mem_mb: int = 16) -> str:
    """Run memcounter's image with `script`; returns the host it was placed on."""
    result = json.loads(
        fleet.cli(
            "run", name, "--image", IMAGE, "--cpu", "0.5", "--memory", "96M",
            "-e", f"MEM_MB={mem_mb}", "-e", "TICK_MS=100", *options, "--json",
            "--", "sh", "-c", script,
        ).stdout
    )  # fmt: skip
    assert result["operation"]["state"] == "succeeded", result
    return str(result["instance"]["host"])


def counts(fleet: RuncFleet, name: str) -> list[int]:
    return [int(n) for n in COUNTER.findall(fleet.cli("logs", name).stdout)]


def host_of(fleet: RuncFleet, name: str) -> str:
    instance = next(i for i in fleet.instances() if i["name"] == name)
    return str(instance["host"])


def copies(fleet: RuncFleet, name: str) -> dict[str, str]:
    """host -> runc status of every container of `name` on the machine."""
    instance = next(i for i in fleet.instances() if i["name"] == name)
    found = {}
    for host in fleet.agent_ids:
        container = fleet.containers(host).get(fleet.container_id(host, instance["id"]))
        if container is not None:
            found[host] = container["status"]
    return found


def wait_for_or_events(fleet: RuncFleet, what: str, check: Any, timeout: float) -> Any:
    """wait_for, and on a time-out the fleet's events say what happened instead."""
    try:
        return wait_for(what, check, timeout)
    except AssertionError:
        for event in fleet.events()[-25:]:
            print(event["kind"], event["message"])
        raise


def migrate(fleet: RuncFleet, name: str, *options: str) -> dict[str, Any]:
    op: dict[str, Any] = json.loads(fleet.cli("migrate", name, *options, "--json").stdout)
    assert op["state"] == "succeeded", op
    return op


# Every start appends to /data/starts and prints it: the file travels only with the
# writable layer. Then memcounter runs in the foreground.
STARTS = "echo start >> /data/starts; echo starts=$(wc -l < /data/starts); exec /bin/memcounter"


def test_live_then_cold_migration_keep_state(runc_fleet: RuncFleet) -> None:
    needs_criu()
    fleet = runc_fleet
    push_memcounter(fleet)
    run(fleet, "mc", STARTS)
    wait_for("the counter to run", lambda: len(counts(fleet, "mc")) >= 5)
    source = host_of(fleet, "mc")
    last = counts(fleet, "mc")[-1]

    op = migrate(fleet, "mc", "--live")
    assert op["result"]["mode"] == "live" and op["result"]["downtime_ms"] > 0
    print(f"\nlive migration: {op['result']}")
    target = host_of(fleet, "mc")
    assert target != source
    assert copies(fleet, "mc") == {target: "running"}
    wait_for("the count to go on", lambda: len(counts(fleet, "mc")) > 3)
    after = counts(fleet, "mc")  # the target's log: what the process printed there
    # One process all along: the count goes on from where it was, it never starts again.
    assert after[0] > last and after == list(range(after[0], after[-1] + 1)), (last, after)

    op = migrate(fleet, "mc", "--cold", "--to", source)
    assert op["result"]["mode"] == "cold" and host_of(fleet, "mc") == source
    logs = fleet.cli("logs", "mc").stdout
    assert "starts=2" in logs  # /data travelled: the new start found the first one
    wait_for("the cold start to count from 1", lambda: counts(fleet, "mc")[:1] == [1])
    assert copies(fleet, "mc") == {source: "running"}

    fleet.cli("rm", "mc")
    assert fleet.instances() == []
    assert all(fleet.containers(host) == {} for host in fleet.agent_ids)


def test_faults_are_detected_and_end_healthy_on_another_host(runc_fleet: RuncFleet) -> None:
    fleet = runc_fleet
    push_memcounter(fleet)
    quick = '{"detectors": {"hold_s": 2, "cpu_wait": 0.15}, "backoff_s": 600}'
    # Failing probe: healthy at first, then /tmp/healthy goes away; not on the 2nd host
    # (the marker in /data travels with a cold migration).
    flaky = (
        "touch /tmp/healthy; if [ ! -e /data/moved ]; then touch /data/moved; "
        "(sleep 3; rm /tmp/healthy) & fi; " + STARTS
    )
    first = run(
        fleet, "probed", flaky, "--probe", "exec:cat /tmp/healthy;every=0.5;fail=2",
        "--remedy", "probe_failed=migrate",
    )  # fmt: skip
    wait_for_or_events(
        fleet, "the failing probe to move it", lambda: host_of(fleet, "probed") != first, 40
    )
    wait_for(
        "it to run again", lambda: copies(fleet, "probed") == {host_of(fleet, "probed"): "running"}
    )
    assert "starts=2" in fleet.cli("logs", "probed").stdout  # data preserved (cold)
    issue = [e for e in fleet.events() if e["kind"] == "instance.issue"]
    assert any(e["data"]["issue"] == "probe_failed" for e in issue)

    # OOM: the first start allocates past its limit; a later one (marker in /data) fits.
    hungry = "if [ ! -e /data/oom ]; then touch /data/oom; export MEM_MB=200; fi; " + STARTS
    first = run(
        fleet, "hungry", hungry, "--remedy", "oom_killed=migrate", "--remedy", "exited=alert",
        "--health", quick,
    )  # fmt: skip
    wait_for_or_events(
        fleet, "the OOM kill to move it", lambda: host_of(fleet, "hungry") != first, 40
    )
    wait_for("it to count", lambda: "starts=2" in fleet.cli("logs", "hungry").stdout, 20)

    # Noisy neighbour: a CPU hog beside a busy instance on the same host.
    for name in ("probed", "hungry"):
        fleet.cli("rm", name)
    busy = "while :; do :; done"
    # Soft affinity puts the hog beside the victim and still lets the victim leave.
    fleet.cli("group", "create", "pair", "--policy", "affinity", "--strength", "soft")
    run(
        fleet, "victim", busy, "--group", "pair", "--remedy", "noisy_neighbour=migrate",
        "--health", quick,
    )  # fmt: skip
    victim_host = host_of(fleet, "victim")
    fleet.cli(
        "run", "hog", "--image", IMAGE, "--cpu", "2", "--memory", "32M", "--group", "pair",
        "--", "sh", "-c", f"{busy} & {busy} & {busy}",
    )  # fmt: skip
    assert host_of(fleet, "hog") == victim_host
    wait_for(
        "the noisy neighbour to move the victim",
        lambda: host_of(fleet, "victim") != victim_host,
        60,
    )
    noisy = [
        e for e in fleet.events()
        if e["kind"] == "instance.issue" and e["data"]["issue"] == "noisy_neighbour"
    ]  # fmt: skip
    assert noisy and noisy[0]["data"]["evidence"]["cpu_wait"] > 0.15
    for name in ("victim", "hog"):
        fleet.cli("rm", name, check=False)


def test_a_killed_agent_is_evacuated_and_its_copy_removed_when_it_returns(
    runc_fleet: RuncFleet,
) -> None:
    fleet = runc_fleet
    push_memcounter(fleet)
    run(fleet, "ha", STARTS, "--remedy", "host_down=migrate")
    source = host_of(fleet, "ha")
    agent = fleet.agent(source)
    os.kill(agent["pid"], signal.SIGKILL)
    wait_for("the evacuation", lambda: host_of(fleet, "ha") != source, DOWN_WINDOW + 30)
    target = host_of(fleet, "ha")
    wait_for("a copy on the target", lambda: copies(fleet, "ha").get(target) == "running", 30)
    fleet.spawn(agent["argv"], source)  # the host comes back: its stale copy goes
    wait_for("one copy", lambda: copies(fleet, "ha") == {target: "running"}, 60)
    fleet.cli("rm", "ha")


@pytest.mark.parametrize("victim", ["controller", "source", "target"])
def test_a_kill_mid_migration_ends_with_exactly_one_copy(
    runc_fleet: RuncFleet, victim: str
) -> None:
    needs_criu()
    fleet = runc_fleet
    push_memcounter(fleet)
    run(fleet, "mid", STARTS, mem_mb=64)
    wait_for("the counter to run", lambda: len(counts(fleet, "mid")) >= 3)
    source = host_of(fleet, "mid")
    target = next(h for h in fleet.agent_ids if h != source)
    op = json.loads(fleet.cli("migrate", "mid", "--live", "--no-wait", "--json").stdout)
    step = "pack" if victim == "source" else "run_on_target"
    token = (fleet.state_dir / "admin.token").read_text().strip()
    with FleetClient(fleet.info["url"], token) as client:  # polls in ms, not a CLI's 0.3 s
        wait_for(
            f"the migration to reach {step}",
            lambda: client.operation(op["id"])["step"] == step,
            30,
            every=0.005,
        )
    who = (
        fleet.info["controller"]
        if victim == "controller"
        else fleet.agent(source if victim == "source" else target)
    )
    os.kill(who["pid"], signal.SIGKILL)
    wait_for("it to die", lambda: not process_running(who["pid"], who["argv"]), 10)
    fleet.spawn(
        who["argv"],
        "controller" if victim == "controller" else (source if victim == "source" else target),
    )
    final = wait_for(
        "the migration to end",
        lambda: (
            (
                o := json.loads(
                    fleet.cli("op", "show", op["id"], "--json", check=False).stdout or "{}"
                )
            ).get("state")
            not in (None, "pending", "running")
            and o
        ),
        120,
    )
    wait_for(
        "exactly one running copy where the store says",
        lambda: copies(fleet, "mid") == {host_of(fleet, "mid"): "running"},
        60,
    )
    print(f"\n{victim} killed at {step}: migration {final['state']} ({final['error']})")
    fleet.cli("rm", "mid")
