"""LocalFleet: start, watch and stop a controller and N agents on this machine.

    start controller --> wait /healthz --> start agents --> wait until all hosts ready
    --> write fleet.json (pids and command lines) --> supervise --> stop all on signal

Children get PR_SET_PDEATHSIG, so even a `kill -9` of `fleetvisor up` takes them
down: a local fleet never leaves orphans.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fleetvisor.controller.serve import ENDPOINT_FILE
from fleetvisor.fleet.network import FleetNetwork, HostNet

FLEET_FILE = "fleet.json"
PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class FleetOptions:
    hosts: int = 3
    driver: str = "sim"
    state_dir: Path = Path.home() / ".fleetvisor"
    port: int = 8470
    db_url: str | None = None
    heartbeat_interval: float = 2.0
    down_after_missed: int = 3
    host_capacity: str = ""
    # Each host in its own network namespace with its own address (needs root);
    # None: on for real drivers, off for sim.
    host_netns: bool | None = None
    driver_options: list[str] = field(default_factory=list)
    extra_agent_args: list[str] = field(default_factory=list)


class FleetError(Exception):
    pass


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalFleet:
    def __init__(self, options: FleetOptions, say: Callable[[str], None] = print) -> None:
        self.options = options
        self.say = say
        self.state_dir = options.state_dir
        self.controller: Child | None = None
        self.agents: list[Child] = []
        self.url = ""
        self.network: FleetNetwork | None = None

    # -- start -----------------------------------------------------------------------------

    def start(self, progress: Callable[[str, int, int], None] | None = None) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._refuse_if_running()
        (self.state_dir / "logs").mkdir(exist_ok=True)
        (self.state_dir / ENDPOINT_FILE).unlink(missing_ok=True)
        base = [sys.executable, "-m", "fleetvisor"]
        argv = base + [
            "controller",
            "--state-dir",
            str(self.state_dir),
            "--port",
            str(self.options.port),
            "--heartbeat-interval",
            str(self.options.heartbeat_interval),
            "--down-after",
            str(self.options.down_after_missed),
        ]
        hostnets: list[HostNet] = []
        listen = "127.0.0.1"
        if self.options.host_netns or (
            self.options.host_netns is None and self.options.driver != "sim"
        ):
            if os.geteuid() != 0:
                raise FleetError(
                    "hosts in their own network namespaces need root; run as "
                    "root or pass --no-host-netns"
                )
            self.network = FleetNetwork(self.state_dir)
            hostnets = self.network.create(self.options.hosts)
            listen = self.network.gateway
        argv += ["--listen", listen]
        if self.options.db_url:
            argv += ["--db", self.options.db_url]
        self.controller = Child("controller", argv, self.state_dir / "logs" / "controller.log")
        self._spawn(self.controller)
        self.url = self._wait_controller()
        # fleet.json's argv must restart the controller where the agents look for it,
        # so record the port it bound (`--port 0` would pick a new one).
        argv[argv.index("--port") + 1] = str(httpx.URL(self.url).port)
        token_file = self.state_dir / "admin.token"
        for i in range(1, self.options.hosts + 1):
            name = f"host-{i}"
            net = hostnets[i - 1] if hostnets else None
            agent_argv = (
                (FleetNetwork.enter(net.netns) if net else [])
                + base
                + [
                    "agent",
                    "--controller",
                    self.url,
                    "--token-file",
                    str(token_file),
                    "--name",
                    name,
                    "--driver",
                    self.options.driver,
                    "--state-dir",
                    str(self.state_dir / "agents" / name),
                    "--cache-dir",  # one image cache for the machine, shared by its agents
                    str(self.state_dir / "cache"),
                ]
            )
            capacity = self.options.host_capacity
            if not capacity and self.options.driver != "sim":
                capacity = _machine_share(self.options.hosts)  # hosts share one machine
            if capacity:
                agent_argv += ["--capacity", capacity]
            if self.options.driver != "sim":
                # Real instances would outlive the fleet's network: take them down with it.
                agent_argv += ["--destroy-on-exit", "--driver-opt", "stop_grace=3"]
            if net:
                agent_argv += [
                    "--listen",
                    net.address,
                    "--driver-opt",
                    f"subnet={net.instance_subnet}",
                ]
            for option in self.options.driver_options:
                agent_argv += ["--driver-opt", option]
            agent_argv += self.options.extra_agent_args
            child = Child(name, agent_argv, self.state_dir / "logs" / f"{name}.log")
            self._spawn(child)
            self.agents.append(child)
        self._write_fleet_file()
        self._wait_hosts_ready(progress)

    def _refuse_if_running(self) -> None:
        path = self.state_dir / FLEET_FILE
        if not path.exists():
            return
        try:
            data = json.loads(path.read_text())
        except ValueError:
            return
        pid = data.get("supervisor_pid")
        if pid and _alive(pid):
            raise FleetError(
                f"a fleet is already running from {self.state_dir} (pid {pid}); "
                "stop it first or pass another --state-dir"
            )

    def _spawn(self, child: Child) -> None:
        log = child.log.open("ab")
        child.process = subprocess.Popen(
            child.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()

    def _wait_controller(self, timeout: float = 60.0) -> str:
        assert self.controller is not None
        endpoint = self.state_dir / ENDPOINT_FILE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.controller.alive():
                raise FleetError(
                    f"the controller exited at start; see {self.controller.log}:\n"
                    + _tail(self.controller.log)
                )
            if endpoint.exists():
                try:
                    url = json.loads(endpoint.read_text())["url"]
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        return str(url)
                except (ValueError, KeyError, httpx.HTTPError):
                    pass
            time.sleep(0.1)
        raise FleetError(
            f"the controller did not answer within {timeout:.0f}s; see {self.controller.log}"
        )

    def _wait_hosts_ready(
        self, progress: Callable[[str, int, int], None] | None, timeout: float = 60.0
    ) -> None:
        token = (self.state_dir / "admin.token").read_text().strip()
        want = {a.name for a in self.agents}
        deadline = time.monotonic() + timeout
        ready: set[str] = set()
        while time.monotonic() < deadline:
            for agent in self.agents:
                if not agent.alive():
                    raise FleetError(
                        f"agent {agent.name} exited at start; see {agent.log}:\n" + _tail(agent.log)
                    )
            try:
                hosts = httpx.get(
                    f"{self.url}/v1/hosts", timeout=5, headers={"Authorization": f"Bearer {token}"}
                ).json()
                ready = {h["name"] for h in hosts if h["state"] == "ready"} & want
            except (httpx.HTTPError, ValueError, TypeError):
                pass
            if progress:
                progress("hosts ready", len(ready), len(want))
            if ready == want:
                return
            time.sleep(0.1)
        raise FleetError(
            f"only {len(ready)}/{len(want)} hosts became ready in {timeout:.0f}s; "
            f"see the logs in {self.state_dir / 'logs'}"
        )

    def _write_fleet_file(self) -> None:
        assert self.controller is not None
        data = {
            "supervisor_pid": os.getpid(),
            "url": self.url,
            "controller": {"pid": self.controller.pid, "argv": self.controller.argv},
            "agents": [
                {"name": a.name, "pid": a.pid, "argv": a.argv, "log": str(a.log)}
                for a in self.agents
            ],
        }
        path = self.state_dir / FLEET_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)

    # -- run and stop ----------------------------------------------------------------------

    def supervise(self, stop_requested: Callable[[], bool]) -> None:
        """Watch the children until asked to stop; report any that die."""
        reported: set[str] = set()
        while not stop_requested():
            for child in [self.controller, *self.agents]:
                if child and not child.alive() and child.name not in reported:
                    reported.add(child.name)
                    code = child.process.returncode if child.process else None
                    self.say(f"{child.name} exited (code {code}); see {child.log}")
            time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> None:
        """Agents first (they stop heartbeating), then the controller; SIGKILL stragglers.
        A real-driver host whose agent died meanwhile has its instances removed by a
        one-shot cleanup run of that agent, so no container outlives the fleet."""
        dead = [a for a in self.agents if a.process is not None and not a.alive()]
        for group in (self.agents, [self.controller] if self.controller else []):
            for child in group:
                if child.alive() and child.process:
                    child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for child in group:
                if child.process is None:
                    continue
                try:
                    child.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
        if self.options.driver != "sim":
            for agent in dead:
                if not _runs_elsewhere(agent.argv):  # not restarted by hand meanwhile
                    self._remove_instances(agent)
        if self.network is not None:
            self.network.destroy()
        (self.state_dir / FLEET_FILE).unlink(missing_ok=True)

    def _remove_instances(self, agent: Child) -> None:
        self.say(f"{agent.name}'s agent had exited: removing its instances")
        with agent.log.open("ab") as log:
            try:
                subprocess.run(
                    [*agent.argv, "--remove-instances-and-exit"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    timeout=120,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                self.say(f"removing {agent.name}'s instances timed out; see {agent.log}")


def _runs_elsewhere(argv: list[str]) -> bool:
    """Whether a process with this agent's state dir runs (e.g. restarted by hand)."""
    state = argv[argv.index("--state-dir") + 1]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"agent" in args and state.encode() in args:
            return True
    return False


def _machine_share(hosts: int) -> str:
    """This machine's CPUs and memory split evenly among `hosts` real agents."""
    cpus = len(os.sched_getaffinity(0))
    meminfo = Path("/proc/meminfo").read_text().split()
    memory_mib = int(meminfo[meminfo.index("MemTotal:") + 1]) // 1024
    return f"cpu={cpus * 1000 // hosts}m,memory={memory_mib // hosts}M"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
