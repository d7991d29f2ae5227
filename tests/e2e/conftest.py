"""A real local fleet for end-to-end tests: `fleetvisor up` as a subprocess, driven by the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

FLEETVISOR = str(Path(sys.executable).with_name("fleetvisor"))
HEARTBEAT = 0.3
MISSED = 3
HEALTH_CHECK = 0.5  # ControllerSettings.health_check_interval
DOWN_TIMEOUT = HEARTBEAT * MISSED + HEALTH_CHECK + 5.0  # configured gap + check tick + slack
SHUTDOWN_TIMEOUT = 15.0
TIMINGS = ["--heartbeat-interval", str(HEARTBEAT), "--down-after", str(MISSED)]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0, every: float = 0.2):
    """Call `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def running(pid: int, argv: list[str]) -> bool:
    """True if `pid` is a live (not zombie) process still running `argv` (guards PID reuse)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return raw.split(b"\0")[:-1] == [a.encode() for a in argv]


class Fleet:
    """One `fleetvisor up` and the processes a test started itself (owned, ended by PID)."""

    def __init__(self, state_dir: Path, hosts: int) -> None:
        self.state_dir = state_dir
        self.hosts_count = hosts
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETVISOR_")}
        self.env["FLEETVISOR_HOME"] = str(state_dir)
        self.up: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.owned: list[tuple[subprocess.Popen[bytes], list[str]]] = []
        self.up_exit: tuple[int | None, float] | None = None

    # -- processes ---------------------------------------------------------------------

    def start(self) -> None:
        log = (self.state_dir.parent / "up.log").open("wb")
        argv = [FLEETVISOR, "up", "--hosts", str(self.hosts_count), "--port", "0", *TIMINGS]
        self.up = subprocess.Popen(
            [*argv, "--state-dir", str(self.state_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        log.close()
        fleet_file = self.state_dir / "fleet.json"
        wait_for("fleet.json", lambda: fleet_file.exists() or self.up.poll() is not None, 60)
        assert self.up.poll() is None, f"fleetvisor up exited: {self.up_log()}"
        self.info = json.loads(fleet_file.read_text())
        assert self.info["supervisor_pid"] == self.up.pid
        wait_for(f"{self.hosts_count} ready hosts", lambda: self.ready_hosts() == self.hosts_count)

    def spawn(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        """Start a fleet process (e.g. a restarted agent) that this test owns and must end."""
        log = (self.state_dir.parent / f"{name}.{len(self.owned)}.log").open("wb")
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env
        )
        log.close()
        self.owned.append((proc, argv))
        return proc

    def agent(self, name: str) -> dict[str, Any]:
        return next(a for a in self.info["agents"] if a["name"] == name)

    def all_pids(self) -> list[tuple[int, list[str]]]:
        """Controller, agents (from fleet.json) and owned processes, with their argv."""
        recorded = [self.info["controller"], *self.info["agents"]] if self.info else []
        return [(p["pid"], p["argv"]) for p in recorded] + [(p.pid, a) for p, a in self.owned]

    def shutdown(self) -> tuple[int | None, float]:
        """SIGTERM `up` and wait; then end owned processes by PID. Returns (up's code, seconds)."""
        if self.up_exit is not None or self.up is None:
            return self.up_exit or (None, 0.0)
        began = time.monotonic()
        self.up.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.up.wait(SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
            self.up.kill()  # our own child; its children die with it (PDEATHSIG)
            self.up.wait()
        self.up_exit = (code, time.monotonic() - began)
        for proc, _argv in self.owned:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _argv in self.owned:
            try:
                proc.wait(SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return self.up_exit

    def up_log(self) -> str:
        return (self.state_dir.parent / "up.log").read_text(errors="replace")

    # -- CLI ---------------------------------------------------------------------------

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [FLEETVISOR, *args], capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if check:
            assert result.returncode == 0, f"fleetvisor {' '.join(args)}: {result.stderr}"
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def events(self, *args: str) -> list[dict[str, Any]]:
        """`events --json` prints one event per line."""
        out = self.cli("events", "--limit", "1000", *args, "--json").stdout
        return [json.loads(line) for line in out.splitlines()]

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {h["name"]: h for h in self.json("hosts")}

    def instances(self) -> list[dict[str, Any]]:
        return self.json("ls")

    def ready_hosts(self) -> int:
        result = self.cli("hosts", "--json", check=False)
        if result.returncode != 0:
            return 0
        return sum(h["state"] == "ready" for h in json.loads(result.stdout))

    def agent_copies(self) -> dict[str, dict[str, Any]]:
        """What each agent's sim driver holds (its on-disk record): host -> {instance id: rec}."""
        copies = {}
        for agent in self.info["agents"]:
            path = self.state_dir / "agents" / agent["name"] / "sim-instances.json"
            copies[agent["name"]] = json.loads(path.read_text()) if path.exists() else {}
        return copies


def assert_consistent(fleet: Fleet, expected: int) -> list[dict[str, Any]]:
    """`expected` instances, each on exactly one host (store and agents), allocations add up."""
    instances = fleet.instances()
    assert len(instances) == expected
    assert len({i["name"] for i in instances}) == expected
    copies = fleet.agent_copies()
    for instance in instances:
        holders = [host for host, held in copies.items() if instance["id"] in held]
        assert holders == [instance["host"]], f"{instance['name']} held by {holders}"
    assert sum(len(held) for held in copies.values()) == expected, copies
    for name, host in fleet.hosts().items():
        mine = [i for i in instances if i["host"] == name]
        assert host["instances"] == len(mine)
        for key in ("vcpus", "memory", "disk", "net"):
            assert host["allocated"][key] == sum(i["resources"][key] for i in mine), (name, key)
    return instances


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A 3-host fleet; teardown stops it and checks that none of its processes is left."""
    fleet = Fleet(tmp_path / "state", hosts=3)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.shutdown()
        for proc, _argv in fleet.owned:
            assert proc.returncode is not None
        left = [(pid, argv[3:5]) for pid, argv in fleet.all_pids() if running(pid, argv)]
        assert not left, f"processes left running: {left}"
