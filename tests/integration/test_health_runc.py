"""Execution monitoring against real containers: runc, cgroup v1 counters, schedstat.

- a CPU hog next to a busy victim (both pinned to CPU 0 through their cpuset cgroups)
  makes the victim wait on the run queue: noisy_neighbour fires, naming the hog;
- a container that allocates past its memory limit is OOM-killed: oom_killed fires and
  the instance is restarted in place;
- a service that stops answering fails its TCP and exec probes: probe_failed fires.

Each test has its own agent id (container ids, netns, links, cgroups), state dir and
/24; everything with that prefix is removed afterwards, even when the test failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from runc_support import DirectoryRootfs, runc_missing

from fleetvisor.agent.health import HealthSupervisor
from fleetvisor.clock import RealClock
from fleetvisor.drivers.runc import RuncDriver
from fleetvisor.model.health import Detection, Issue
from fleetvisor.model.specs import InstanceSpec, ResourceVector

CGROUP_ROOT = Path("/sys/fs/cgroup")
BUSY = "trap 'exit 0' TERM; while :; do :; done"


MISSING = runc_missing("execution monitoring on runc")
if MISSING:
    print(f"\nskipping execution monitoring tests on runc: {MISSING}")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


@pytest.fixture(scope="module")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("health-rootfs")
    busybox = shutil.which("busybox")
    assert busybox
    (root / "bin").mkdir()
    shutil.copy2(busybox, root / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    for directory in ("tmp", "root", "proc", "sys", "dev"):
        (root / directory).mkdir()
    return root


def _sh(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30).stdout


def _free_subnet() -> str:
    used = _sh("ip", "-o", "addr")
    for _ in range(100):
        third = secrets.randbelow(256)
        if f" 198.19.{third}." not in used:
            return f"198.19.{third}.0/24"
    raise AssertionError("no free 198.19.x.0/24 on this machine")


@dataclass
class Host:
    """One agent's driver and health supervisor; `purge` removes all its prefix names."""

    state_dir: Path
    agent_id: str
    subnet: str
    rootfs: DirectoryRootfs
    driver: RuncDriver = field(init=False)
    health: HealthSupervisor = field(init=False)
    seen: list[Detection] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.driver = RuncDriver(
            clock=RealClock(),
            state_dir=self.state_dir,
            rootfs=self.rootfs,
            agent_id=self.agent_id,
            subnet=self.subnet,
            stop_grace_seconds=1.0,
        )
        self.health = HealthSupervisor(
            self.driver, RealClock(), stop=self.stop, start=self.start, sample_interval=0.25
        )

    async def stop(self, instance_id: str) -> None:
        self.health.expect_stopped(instance_id)
        await self.driver.stop(instance_id)

    async def start(self, instance_id: str) -> None:
        await self.driver.start(instance_id)
        self.health.expect_running(instance_id)

    async def launch(self, instance: InstanceSpec) -> str:
        await self.driver.create(instance)
        self.health.watch(instance)
        await self.start(instance.id)
        return instance.id

    async def detection(self, instance_id: str, issue: Issue, timeout: float) -> Detection:
        deadline = time.monotonic() + timeout
        while True:
            self.seen += self.health.drain()
            for found in self.seen:
                if found.instance == instance_id and found.issue == issue:
                    return found
            if time.monotonic() > deadline:
                status = self.health.status(instance_id)
                raise AssertionError(
                    f"no {issue} for {instance_id} within {timeout:g} s; seen "
                    f"{[(d.issue, d.message) for d in self.seen]}; status {status}"
                )
            await asyncio.sleep(0.1)

    @property
    def cgroup_name(self) -> str:
        return f"fleetvisor-{self.agent_id}"

    @property
    def runc_root(self) -> Path:
        return self.state_dir / "runc-driver" / "runc"

    def pin(self, instance_id: str, cpus: str) -> bool:
        """Confine the instance to `cpus` through its cpuset cgroup (the driver has no
        cpuset option); False when this machine does not let us."""
        path = CGROUP_ROOT / "cpuset" / self.cgroup_name / instance_id / "cpuset.cpus"
        try:
            path.write_text(cpus)
        except OSError:
            return False
        return path.read_text().strip() == cpus

    def leftovers(self) -> dict[str, list[Any]]:
        prefix = f"fv{self.agent_id}"
        base = str(self.state_dir.resolve())
        with open("/proc/self/mountinfo") as info:
            mounts = [line.split()[4] for line in info]
        found = {
            "mounts": [m for m in mounts if m == base or m.startswith(base + "/")],
            "netns": [
                line.split()[0]
                for line in _sh("ip", "netns", "list").splitlines()
                if line.startswith(prefix)
            ],
            "links": [
                line.split(":")[1].strip().split("@")[0]
                for line in _sh("ip", "-o", "link").splitlines()
                if line.split(":")[1].strip().startswith(prefix)
            ],
            "cgroups": sorted(CGROUP_ROOT.glob(f"*/{self.cgroup_name}")),
            "processes": self.processes(),
            "containers": self.containers(),
        }
        return {kind: items for kind, items in found.items() if items}

    def processes(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cgroups = (entry / "cgroup").read_text()
                state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if f"/{self.cgroup_name}/" in cgroups and state not in ("Z", "X"):
                found.append(int(entry.name))
        return found

    def containers(self) -> list[str]:
        if not self.runc_root.exists():
            return []
        return _sh("runc", "--root", str(self.runc_root), "list", "-q").split()

    def purge(self) -> None:
        for container in self.containers():
            _sh("runc", "--root", str(self.runc_root), "delete", "--force", container)
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        leftovers = self.leftovers()
        for point in sorted(leftovers.get("mounts", []), key=len, reverse=True):
            _sh("umount", "-l", point)
        for name in leftovers.get("netns", []):
            _sh("ip", "netns", "del", name)
        for name in leftovers.get("links", []):
            _sh("ip", "link", "del", name)
        deadline = time.monotonic() + 10
        while (tops := sorted(CGROUP_ROOT.glob(f"*/{self.cgroup_name}"))) and (
            time.monotonic() < deadline
        ):
            for top in tops:
                for directory in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if directory.is_dir():
                        with contextlib.suppress(OSError):
                            directory.rmdir()
                with contextlib.suppress(OSError):
                    top.rmdir()
            time.sleep(0.1)


@pytest.fixture
async def host(tmp_path: Path, busybox_rootfs: Path) -> AsyncIterator[Host]:
    machine = Host(
        state_dir=tmp_path / "agent",
        agent_id=secrets.token_hex(3),
        subnet=_free_subnet(),
        rootfs=DirectoryRootfs(busybox_rootfs, {"Env": ["PATH=/bin"], "Cmd": ["sh"]}),
    )
    try:
        yield machine
    finally:
        await machine.health.close()
        with contextlib.suppress(Exception):
            for report in await machine.driver.list():
                await machine.driver.destroy(report.id)
        machine.purge()
        remaining = machine.leftovers()
        assert not remaining, f"cleanup left {remaining}"


def spec(
    name: str, script: str, *, vcpus: int = 1000, memory: int = 64, health: Any = None
) -> InstanceSpec:
    return InstanceSpec(
        id=uuid.uuid4().hex,
        name=name,
        image="busybox",
        command=["sh", "-c", script],
        resources=ResourceVector(vcpus=vcpus, memory=memory, disk=1, net=100),
        health=health,
    )


async def test_a_cpu_hog_next_door_is_a_noisy_neighbour(host: Host) -> None:
    # Both on CPU 0: the victim's one busy thread and the hog's three share one CPU, so
    # the victim is runnable but waits about half of every second (threshold 0.2).
    health = {"detectors": {"hold_s": 2, "cpu_wait": 0.2}}
    victim = await host.launch(spec("victim", BUSY, health=health))
    hog_script = (
        "trap 'kill 0; exit 0' TERM; for i in 1 2 3; do sh -c 'while :; do :; done' & done; wait"
    )
    hog = await host.launch(spec("hog", hog_script, vcpus=2000))
    pinned = host.pin(victim, "0") and host.pin(hog, "0")
    print(f"\nvictim and hog pinned to CPU 0: {pinned}")
    began = time.monotonic()
    found = await host.detection(victim, Issue.NOISY_NEIGHBOUR, timeout=15)
    print(f"noisy_neighbour after {time.monotonic() - began:.1f} s: {found.message}")
    assert found.evidence["neighbour"] == hog
    assert found.evidence["neighbour_name"] == "hog"
    assert found.evidence["cpu_wait"] >= 0.2
    # twice the victim's CPU shares (2000 m against 1000 m) and three busy threads
    assert found.evidence["neighbour_cpu_millicores"] > found.evidence["cpu_millicores"]
    assert found.evidence["host_cpu_millicores"] >= found.evidence["neighbour_cpu_millicores"]
    assert found.action == ""  # remedy: migrate, the controller's
    assert found.since is not None and found.at - found.since >= 2.0
    stats = await host.driver.stats(victim)
    assert stats["cpu_wait_seconds"] > 0.5


async def test_memory_beyond_the_limit_is_an_oom_kill_and_restarts(host: Host) -> None:
    # tail keeps the "last line" of an endless zero stream until the kernel kills it; the
    # shell (the container's init) carries on, so only the OOM counter tells.
    script = "trap 'exit 0' TERM; tail /dev/zero; while :; do sleep 0.2; done"
    health = {"max_restarts": 1, "restart_window_s": 60}
    victim = await host.launch(spec("hungry", script, memory=32, health=health))
    found = await host.detection(victim, Issue.OOM_KILLED, timeout=15)
    assert found.evidence["new_kills"] >= 1
    assert found.evidence["memory_limit_mib"] == 32
    assert found.action == "restart"
    # restarted, it eats again: one restart allowed, so the next one is a restart loop
    loop = await host.detection(victim, Issue.RESTART_LOOP, timeout=15)
    assert loop.evidence["restarts"] == 1 and loop.evidence["issue"] == "oom_killed"


async def test_a_service_that_stops_answering_fails_its_probes(host: Host) -> None:
    script = (
        "trap 'exit 0' TERM; touch /tmp/healthy; httpd -f -p 8080 -h /tmp & pid=$!; "
        "sleep 3; kill $pid; rm /tmp/healthy; while :; do sleep 0.2; done"
    )
    probes = [{"kind": "tcp", "port": 8080, "interval_s": 0.5, "failure_threshold": 3,
               "timeout_s": 0.5}]  # fmt: skip
    has_exec = hasattr(host.driver, "exec")
    if has_exec:
        probes.append({"kind": "exec", "command": ["cat", "/tmp/healthy"], "interval_s": 0.5,
                       "failure_threshold": 2, "timeout_s": 2})  # fmt: skip
    else:
        print("\nthe runc driver has no exec yet: only the TCP probe is checked")
    health = {"probes": probes, "remedies": {"probe_failed": "alert"}}
    victim = await host.launch(spec("service", script, health=health))
    await asyncio.sleep(1.5)
    status = host.health.status(victim)
    assert [p["status"] for p in status["probes"]] == ["ok"] * len(probes), status
    found = await host.detection(victim, Issue.PROBE_FAILED, timeout=12)
    await asyncio.sleep(1.5)
    host.seen += host.health.drain()
    failed = {d.evidence["probe"]: d for d in host.seen if d.issue == Issue.PROBE_FAILED}
    assert "tcp" in failed and "refused" in str(failed["tcp"].evidence["last_error"])
    assert str(failed["tcp"].evidence["target"]).endswith(":8080")
    if has_exec:
        assert "exec" in failed and "exit code 1" in str(failed["exec"].evidence["last_error"])
    assert found.action == ""
    (report,) = await host.driver.list()
    assert report.state == "running"  # alert only: left alone


async def test_a_quota_bound_loop_is_throttled_and_a_crash_is_restarted(host: Host) -> None:
    bound = await host.launch(
        spec("bound", BUSY, vcpus=200, health={"detectors": {"hold_s": 1, "throttled": 0.5}})
    )
    crashy = await host.launch(
        spec("crashy", "sleep 1; exit 3", health={"max_restarts": 1, "restart_window_s": 60})
    )
    throttled = await host.detection(bound, Issue.CPU_THROTTLED, timeout=10)
    assert throttled.evidence["throttled_share"] >= 0.5
    assert throttled.evidence["cpu_periods"] > 0 and throttled.action == ""
    exited = await host.detection(crashy, Issue.EXITED, timeout=10)
    assert exited.action == "restart" and exited.evidence["state"] == "stopped"
    loop = await host.detection(crashy, Issue.RESTART_LOOP, timeout=10)
    assert loop.evidence["issue"] == "exited"
    crashes = [d for d in host.seen if d.instance == crashy and d.issue == Issue.EXITED]
    assert [d.action for d in crashes] == ["restart", ""]
    reports = {r.id: r for r in await host.driver.list()}
    assert reports[crashy].state == "stopped" and reports[bound].state == "running"
