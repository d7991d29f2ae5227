"""A real local fleet for end-to-end tests: `fleetvisor up` as a subprocess, driven by the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
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

    def __init__(
        self,
        state_dir: Path,
        hosts: int,
        up_args: list[str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.state_dir = state_dir
        self.hosts_count = hosts
        self.up_args = TIMINGS if up_args is None else up_args
        self.start_timeout = start_timeout
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETVISOR_")}
        self.env["FLEETVISOR_HOME"] = str(state_dir)
        self.up: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.owned: list[tuple[subprocess.Popen[bytes], list[str]]] = []
        self.up_exit: tuple[int | None, float] | None = None

    # -- processes ---------------------------------------------------------------------

    def start(self) -> None:
        log = (self.state_dir.parent / "up.log").open("wb")
        argv = [FLEETVISOR, "up", "--hosts", str(self.hosts_count), "--port", "0", *self.up_args]
        self.up = subprocess.Popen(
            [*argv, "--state-dir", str(self.state_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        log.close()
        fleet_file = self.state_dir / "fleet.json"
        wait_for(
            "fleet.json",
            lambda: fleet_file.exists() or self.up.poll() is not None,
            self.start_timeout,
        )
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


# -- real container fleets (`up --driver runc`) --------------------------------------------


def _is_static(binary: Path) -> bool:
    """True when the 64-bit ELF file has no PT_INTERP: it runs inside any rootfs."""
    try:
        head = binary.read_bytes()[:8192]
    except OSError:
        return False
    if head[:4] != b"\x7fELF" or head[4] != 2:
        return False
    phoff = int.from_bytes(head[0x20:0x28], "little")
    phentsize = int.from_bytes(head[0x36:0x38], "little")
    phnum = int.from_bytes(head[0x38:0x3A], "little")
    return all(
        int.from_bytes(head[phoff + i * phentsize : phoff + i * phentsize + 4], "little") != 3
        for i in range(phnum)
    )


def runc_fleet_missing() -> str | None:
    """Why a runc fleet cannot run on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "a runc fleet needs root (mounts, cgroups, network namespaces)"
    from fleetvisor.drivers.runc import PrerequisiteMissing, check_prerequisites

    try:
        check_prerequisites()
    except PrerequisiteMissing as exc:
        return str(exc)
    if shutil.which("nsenter") is None:
        return "nsenter is missing (apt-get install util-linux)"
    if not _is_static(Path("/bin/busybox")):
        return "the test image needs a static /bin/busybox: apt-get install busybox-static"
    return None


def process_running(pid: int, argv: list[str]) -> bool:
    """`running`, also for a fleet.json command line that starts with `nsenter ... --`:
    nsenter execs the program, so the PID then runs the part after `--`."""
    if running(pid, argv):
        return True
    if argv and Path(argv[0]).name == "nsenter" and "--" in argv:
        return running(pid, argv[argv.index("--") + 1 :])
    return False


def _lines(*argv: str) -> list[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    return done.stdout.splitlines()


def _unescape_mount(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


class RuncFleet(Fleet):
    """A `fleetvisor up --driver runc` fleet and every name it may leave on the machine.

    Its prefixes: `fv<fleet id>` (host netns, veths, fleet bridge) and `fv<agent id>`
    per agent (containers, instance netns, links; cgroups `/fleetvisor-<agent id>`).
    """

    def __init__(self, state_dir: Path, hosts: int, up_args: list[str]) -> None:
        super().__init__(state_dir, hosts, up_args, start_timeout=90.0)
        from fleetvisor.drivers.runc.layout import default_agent_id
        from fleetvisor.fleet.network import fleet_id

        self.fleet_prefix = f"fv{fleet_id(state_dir)}"
        self.agent_ids = {
            f"host-{i}": default_agent_id(self.driver_dir(f"host-{i}")) for i in range(1, hosts + 1)
        }

    # -- where an agent keeps its containers ---------------------------------------------

    def driver_dir(self, host: str) -> Path:
        return self.state_dir / "agents" / host / "runc-driver"

    def prefixes(self) -> list[str]:
        return [self.fleet_prefix, *(f"fv{a}" for a in self.agent_ids.values())]

    def container_id(self, host: str, instance_id: str) -> str:
        return f"fv{self.agent_ids[host]}-{instance_id}"

    def runc(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        root = self.driver_dir(host) / "runc"
        done = subprocess.run(
            ["runc", "--root", str(root), *args], capture_output=True, text=True, timeout=30
        )
        if check:
            assert done.returncode == 0, f"runc {' '.join(args)}: {done.stderr}"
        return done

    def containers(self, host: str) -> dict[str, dict[str, Any]]:
        """runc's containers of `host`'s agent: container id -> `runc list` entry."""
        if not (self.driver_dir(host) / "runc").is_dir():
            return {}
        listed = json.loads(self.runc(host, "list", "--format", "json").stdout or "null") or []
        return {entry["id"]: entry for entry in listed}

    def host_netns(self, host: str) -> str:
        """The network namespace `up` put `host` in (from its fleet.json command line)."""
        argv = self.agent(host)["argv"]
        return next(a.split("=", 1)[1] for a in argv if a.startswith("--net="))

    # -- what is left on the machine ------------------------------------------------------

    def traces(self) -> dict[str, list[str]]:
        """Everything of this fleet still on the machine (empty lists left out)."""
        prefixes = self.prefixes()
        cgroup_names = [f"fleetvisor-{a}" for a in self.agent_ids.values()]
        found: dict[str, list[str]] = {
            "processes": [
                f"{pid} {' '.join(argv[-12:])}"
                for pid, argv in self.all_pids()
                if process_running(pid, argv)
            ],
            "container processes": [
                f"{pid} {why}" for pid, why in self._cgroup_processes(cgroup_names)
            ],
            "containers": [c for host in self.agent_ids for c in self.containers(host)],
            "netns": [
                line.split()[0]
                for line in _lines("ip", "netns", "list")
                if line.strip() and any(p in line.split()[0] for p in prefixes)
            ],
            "links": [name for name in self._links() if any(name.startswith(p) for p in prefixes)],
            "mounts": [
                f"{point} ({kind})"
                for point, kind in self._mounts()
                if point == str(self.state_dir) or point.startswith(f"{self.state_dir}/")
            ],
            "cgroups": [
                str(d) for name in cgroup_names for d in Path("/sys/fs/cgroup").glob(f"*/{name}")
            ],
        }
        return {what: items for what, items in found.items() if items}

    @staticmethod
    def _links() -> list[str]:
        names = []
        for line in _lines("ip", "-o", "link", "show"):
            parts = line.split(":")
            if len(parts) > 1:
                names.append(parts[1].strip().split("@")[0])
        return names

    @staticmethod
    def _mounts() -> list[tuple[str, str]]:
        with open("/proc/mounts") as mounts:
            return [
                (_unescape_mount(f[1]), f[2])
                for f in (line.split() for line in mounts)
                if len(f) > 2
            ]

    @staticmethod
    def _cgroup_processes(cgroup_names: list[str]) -> list[tuple[int, str]]:
        """Processes in one of these agents' cgroups (their containers' processes)."""
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                text = (proc / "cgroup").read_text()
                state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if state in ("Z", "X"):  # exited, waiting for its reaper: not running
                continue
            for name in cgroup_names:
                if f":/{name}/" in text or text.rstrip().endswith(f":/{name}"):
                    found.append((int(proc.name), name))
                    break
        return found

    def settled_traces(self, timeout: float = 5.0) -> dict[str, list[str]]:
        """`traces`, once processes killed a moment ago had `timeout` seconds to go."""
        deadline = time.monotonic() + timeout
        while (found := self.traces()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return found

    def remove_traces(self) -> None:
        """Remove what `traces` finds, by this fleet's PIDs and prefixes only."""
        for pid, argv in self.all_pids():
            if process_running(pid, argv):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for host in self.agent_ids:
            for container in self.containers(host):
                self.runc(host, "delete", "--force", container, check=False)
        cgroup_names = [f"fleetvisor-{a}" for a in self.agent_ids.values()]
        for pid, _name in self._cgroup_processes(cgroup_names):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        state = str(self.state_dir)
        for point, _kind in sorted(self._mounts(), key=lambda m: len(m[0]), reverse=True):
            if point == state or point.startswith(f"{state}/"):
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        prefixes = self.prefixes()
        for line in _lines("ip", "netns", "list"):
            name = line.split()[0] if line.strip() else ""
            if name and any(p in name for p in prefixes):
                subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
        for name in self._links():
            if any(name.startswith(p) for p in prefixes):
                subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)
        deadline = time.monotonic() + 5
        for name in cgroup_names:
            for top in Path("/sys/fs/cgroup").glob(f"*/{name}"):
                for directory in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if directory.is_dir():
                        with contextlib.suppress(OSError):
                            directory.rmdir()
                while top.exists() and time.monotonic() < deadline:  # killed tasks leave late
                    with contextlib.suppress(OSError):
                        top.rmdir()
                    time.sleep(0.05)


RUNC_HEARTBEAT = 0.3
RUNC_DOWN_AFTER = 5
RUNC_UP_ARGS = [
    "--driver",
    "runc",
    "--heartbeat-interval",
    str(RUNC_HEARTBEAT),
    "--down-after",
    str(RUNC_DOWN_AFTER),
]


@pytest.fixture
def runc_fleet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RuncFleet]:
    """A 2-host runc fleet (skips, saying why, where runc cannot run). Teardown stops it,
    then removes anything of it left on the machine (after a failure, say an agent killed
    and never restarted), by this fleet's PIDs and name prefixes only; it fails only if
    something cannot be removed. The test body asserts that nothing was left.
    A test module may set `RUNC_EXTRA_UP_ARGS` (e.g. a host capacity)."""
    missing = runc_fleet_missing()
    if missing:
        print(f"\nskipping the runc fleet test: {missing}")
        pytest.skip(missing)
    extra = list(getattr(request.module, "RUNC_EXTRA_UP_ARGS", []))
    fleet = RuncFleet(tmp_path / "state", hosts=2, up_args=[*RUNC_UP_ARGS, *extra])
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.shutdown()
        left = fleet.settled_traces()
        if left:  # the test body asserts there are none; here: clean up after a failure
            print(f"\nremoving what the fleet left on the machine: {left}")
            fleet.remove_traces()
            still = fleet.settled_traces(10)
            assert not still, f"could not remove what the fleet left on the machine: {still}"
