"""RuncDriver against the real thing: runc, overlayfs, cgroup v1, netns + veth + bridge.

Each test gets its own agent id (so its own container ids, netns, links and cgroups),
state dir and /24. The `host` fixture removes everything with that prefix afterwards,
even when the test failed, and fails the test if it could not.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from runc_support import DirectoryRootfs, runc_missing

from fleetvisor.clock import RealClock
from fleetvisor.drivers.base import UnknownInstance
from fleetvisor.drivers.runc import RuncDriver
from fleetvisor.errors import DriverError, InvalidInput
from fleetvisor.model.resources import Resources
from fleetvisor.model.specs import InstanceSpec, ResourceVector

CGROUP_ROOT = Path("/sys/fs/cgroup")
MIB = 1024 * 1024
TICK = "trap 'exit 0' TERM; while true; do echo tick; sleep 0.2; done"


MISSING = runc_missing("the runc driver tests")
if MISSING:
    print(f"\nskipping runc driver tests: {MISSING}")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


@pytest.fixture(scope="module")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/busybox + one symlink per applet, /etc/passwd and /etc/group."""
    root = tmp_path_factory.mktemp("busybox-rootfs")
    busybox = shutil.which("busybox")
    assert busybox
    (root / "bin").mkdir()
    shutil.copy2(busybox, root / "bin" / "busybox")
    listed = subprocess.run(
        [busybox, "--list"], capture_output=True, text=True, check=True, timeout=10
    )
    for applet in listed.stdout.split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
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
    """One simulated agent's share of this machine, and how to find all it left behind."""

    state_dir: Path
    agent_id: str
    subnet: str
    rootfs: DirectoryRootfs

    @property
    def prefix(self) -> str:
        return f"fv{self.agent_id}"

    @property
    def cgroup_name(self) -> str:
        return f"fleetvisor-{self.agent_id}"

    @property
    def runc_root(self) -> Path:
        return self.state_dir / "runc-driver" / "runc"

    def driver(self, **options: Any) -> RuncDriver:
        options.setdefault("stop_grace_seconds", 1.5)
        return RuncDriver(
            clock=RealClock(),
            state_dir=self.state_dir,
            rootfs=self.rootfs,
            agent_id=self.agent_id,
            subnet=self.subnet,
            **options,
        )

    def mounts(self) -> list[str]:
        base = str(self.state_dir.resolve())
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        return [p for p in points if p == base or p.startswith(base + "/")]

    def netns(self) -> list[str]:
        names = [line.split()[0] for line in _sh("ip", "netns", "list").splitlines() if line]
        return [n for n in names if n.startswith(self.prefix)]

    def links(self) -> list[str]:
        names = [
            line.split(":")[1].strip().split("@")[0]
            for line in _sh("ip", "-o", "link").splitlines()
        ]
        return [n for n in names if n.startswith(self.prefix)]

    def cgroups(self) -> list[Path]:
        return sorted(CGROUP_ROOT.glob(f"*/{self.cgroup_name}"))

    def processes(self) -> list[int]:
        """Live (not zombie) processes in one of this agent's cgroups."""
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

    def leftovers(self) -> dict[str, list[Any]]:
        found = {
            "mounts": self.mounts(),
            "netns": self.netns(),
            "links": self.links(),
            "cgroups": self.cgroups(),
            "processes": self.processes(),
            "containers": self.containers(),
        }
        return {kind: items for kind, items in found.items() if items}

    def purge(self) -> None:
        """Remove everything this agent id may have created, whatever state it is in."""
        for container in self.containers():
            _sh("runc", "--root", str(self.runc_root), "delete", "--force", container)
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for point in sorted(self.mounts(), key=len, reverse=True):
            _sh("umount", "-l", point)
        for name in self.netns():
            _sh("ip", "netns", "del", name)
        for name in self.links():
            _sh("ip", "link", "del", name)
        deadline = time.monotonic() + 10
        while self.cgroups() and time.monotonic() < deadline:
            for top in self.cgroups():
                for directory in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if directory.is_dir():
                        _rmdir(directory)
                _rmdir(top)
            time.sleep(0.1)


def _rmdir(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


@pytest.fixture
def host(tmp_path: Path, busybox_rootfs: Path) -> Iterator[Host]:
    image_config = {"Env": ["PATH=/bin", "IMAGE_VAR=from-image"], "Cmd": ["sh"]}
    machine = Host(
        state_dir=tmp_path / "agent",
        agent_id=secrets.token_hex(3),
        subnet=_free_subnet(),
        rootfs=DirectoryRootfs(busybox_rootfs, image_config),
    )
    try:
        yield machine
    finally:
        machine.purge()
        remaining = machine.leftovers()
        assert not remaining, f"cleanup left {remaining}"


def spec(name: str, script: str, *, vcpus: int = 500, memory: int = 128) -> InstanceSpec:
    return InstanceSpec(
        id=uuid.uuid4().hex,
        name=name,
        image="busybox",
        command=["sh", "-c", script],
        env={"INSTANCE_VAR": "from-spec"},
        resources=ResourceVector(vcpus=vcpus, memory=memory, disk=1, net=100),
    )


async def eventually(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll `check` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(0.1)


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def cgroup_value(host: Host, controller: str, instance_id: str, name: str) -> str:
    path = CGROUP_ROOT / controller / host.cgroup_name / instance_id / name
    return path.read_text().strip()


async def test_lifecycle_logs_stats_and_live_resize(host: Host) -> None:
    driver = host.driver()
    fill_and_tick = (
        "head -c 40m /dev/zero > /dev/shm/hold; while true; do echo tick; sleep 0.2; done"
    )
    instance = spec("Ticker_1", fill_and_tick, vcpus=500, memory=128)

    created = await driver.create(instance)
    assert created.state == "created"
    assert (await driver.create(instance)).state == "created"  # idempotent
    assert host.processes() == []  # create runs nothing
    assert len(host.mounts()) == 1 and len(host.netns()) == 1

    assert (await driver.start(instance.id)).state == "running"
    pid = driver.layout.pid_file(instance.id).read_text()
    assert (await driver.start(instance.id)).state == "running"  # already running
    assert driver.layout.pid_file(instance.id).read_text() == pid

    log = driver.log_path(instance.id)
    await eventually("ticks in the log", lambda: read(log).count("tick") >= 3)
    stats = await eventually(
        "40 MiB held in /dev/shm",
        lambda: _when(driver.stats(instance.id), lambda s: s["memory_mib"] >= 40),
    )
    assert stats["cpu_usage_seconds"] > 0
    assert stats["pids"] >= 1
    assert stats["oom_kills"] == 0

    config = driver.layout.config(instance.id).read_text()
    assert '"hostname": "ticker-1"' in config
    assert "IMAGE_VAR=from-image" in config and "INSTANCE_VAR=from-spec" in config

    assert cgroup_value(host, "cpu", instance.id, "cpu.cfs_quota_us") == "50000"
    await driver.resize(instance.id, Resources(200, 128, 1, 100))
    assert cgroup_value(host, "cpu", instance.id, "cpu.cfs_quota_us") == "20000"
    await driver.resize(instance.id, Resources(1500, 256, 1, 100))
    assert cgroup_value(host, "cpu", instance.id, "cpu.cfs_quota_us") == "150000"
    assert cgroup_value(host, "cpu", instance.id, "cpu.shares") == "1536"
    limit = cgroup_value(host, "memory", instance.id, "memory.limit_in_bytes")
    assert int(limit) == 256 * MIB

    with pytest.raises(DriverError, match=r"uses \d+ MiB now") as refused:
        await driver.resize(instance.id, Resources(1500, 16, 1, 100))
    assert "at least" in str(refused.value)
    assert int(cgroup_value(host, "memory", instance.id, "memory.limit_in_bytes")) == 256 * MIB
    (report,) = await driver.list()
    assert report.resources.memory == 256 and report.resources.vcpus == 1500

    started = time.monotonic()
    stopped = await driver.stop(instance.id)
    assert stopped.state == "stopped"
    assert time.monotonic() - started >= 1.5  # PID 1 ignored SIGTERM: SIGKILL after the grace
    assert host.processes() == []
    assert (await driver.stats(instance.id))["cpu_usage_seconds"] == 0
    assert (await driver.stop(instance.id)).state == "stopped"  # idempotent
    assert (await driver.start(instance.id)).state == "running"
    # the resize survived the restart: the bundle was rewritten
    assert cgroup_value(host, "cpu", instance.id, "cpu.cfs_quota_us") == "150000"

    await driver.destroy(instance.id)
    await driver.destroy(instance.id)  # idempotent
    assert await driver.list() == []
    assert host.leftovers() == {}


async def _when(stats: Any, condition: Callable[[dict[str, float]], bool]) -> Any:
    value = await stats
    return value if condition(value) else None


async def test_cpu_quota_limits_a_busy_loop_live(host: Host) -> None:
    driver = host.driver()
    instance = spec("spinner", "trap 'exit 0' TERM; while true; do :; done", vcpus=200)
    await driver.create(instance)
    await driver.start(instance.id)

    async def window(seconds: float = 1.5) -> tuple[float, float]:
        """(CPU rate in millicores, throttled periods) over `seconds`."""
        first = await driver.stats(instance.id)
        await asyncio.sleep(seconds)
        last = await driver.stats(instance.id)
        return last["cpu_millicores"], last["throttled_periods"] - first["throttled_periods"]

    limited, throttled = await window()
    assert 50 < limited < 320 and throttled > 0, (limited, throttled)
    await driver.resize(instance.id, Resources(0, 128, 1, 100))  # 0 = no quota
    assert cgroup_value(host, "cpu", instance.id, "cpu.cfs_quota_us") == "-1"
    # A shared machine may lend the loop less than a CPU, but never throttles it now.
    freed = [await window(1.0) for _ in range(3)]
    assert all(periods == 0 for _, periods in freed), freed
    assert max(rate for rate, _ in freed) > limited * 1.3, (limited, freed)
    await driver.destroy(instance.id)
    assert host.leftovers() == {}


async def test_two_instances_reach_each_other_over_the_bridge(host: Host) -> None:
    driver = host.driver()
    target = spec("target", TICK)
    await driver.create(target)
    target_address = driver.address(target.id)
    pinger = spec(
        "pinger",
        "trap 'exit 0' TERM; while true; do "
        f"ping -c1 -W1 {target_address} && echo PING-OK; sleep 0.3; done",
    )
    await driver.create(pinger)
    assert driver.address(pinger.id) != target_address
    before = await driver.stats(target.id)
    await asyncio.gather(driver.start(target.id), driver.start(pinger.id))  # concurrently

    log = driver.log_path(pinger.id)
    await eventually("a ping answered over the bridge", lambda: "PING-OK" in read(log))
    assert "1 packets received" in read(log)
    after = await driver.stats(target.id)
    assert after["net_rx_bytes"] > before["net_rx_bytes"]
    assert after["net_tx_bytes"] > before["net_tx_bytes"]

    assert len(host.links()) == 3  # bridge + two host-side veths

    others = [spec(f"other-{i}", TICK) for i in range(3)]
    await asyncio.gather(*(driver.create(o) for o in others))  # concurrent IPAM + netns setup
    addresses = {driver.address(i.id) for i in [target, pinger, *others]}
    assert len(addresses) == 5
    everyone = [target, pinger, *others]
    await asyncio.gather(*(driver.destroy(i.id) for i in everyone))
    assert host.leftovers() == {}


async def test_stop_start_keeps_data_and_address_and_a_new_agent_sees_it(host: Host) -> None:
    driver = host.driver(stop_grace_seconds=5.0)
    script = "trap 'exit 0' TERM; echo boot >> /boots; while true; do echo tick; sleep 0.2; done"
    instance = spec("keeper", script)
    await driver.create(instance)
    await driver.start(instance.id)
    boots = driver.layout.upper(instance.id) / "boots"
    await eventually("the first boot recorded", lambda: read(boots) == "boot\n")
    address = driver.address(instance.id)

    started = time.monotonic()
    assert (await driver.stop(instance.id)).state == "stopped"
    assert time.monotonic() - started < 4.0  # it honoured SIGTERM: no wait for the grace period
    assert read(boots) == "boot\n" and len(host.netns()) == 1

    await driver.start(instance.id)
    await eventually("the second boot recorded", lambda: read(boots) == "boot\nboot\n")
    assert driver.address(instance.id) == address

    reborn = host.driver()  # the agent restarted: a new driver on the same state dir
    (report,) = await reborn.list()
    assert (report.id, report.name, report.state) == (instance.id, "keeper", "running")
    assert reborn.address(instance.id) == address
    assert (await reborn.stats(instance.id))["pids"] >= 1

    await reborn.destroy(instance.id)
    assert await reborn.list() == []
    assert host.leftovers() == {}


async def test_a_workload_over_its_memory_limit_is_oom_killed(host: Host) -> None:
    driver = host.driver()
    # tail keeps the "last line" of an endless zero stream in memory until it is killed;
    # the shell (the container's init) survives and keeps the instance running.
    script = "trap 'exit 0' TERM; tail /dev/zero; echo tail-ended; while true; do sleep 0.2; done"
    instance = spec("hog", script, memory=32)
    await driver.create(instance)
    await driver.start(instance.id)
    stats = await eventually(
        "an OOM kill",
        lambda: _when(driver.stats(instance.id), lambda s: s["oom_kills"] >= 1),
    )
    assert stats["memory_max_mib"] <= 32.5
    await eventually(
        "the shell carrying on", lambda: "tail-ended" in read(driver.log_path(instance.id))
    )
    (report,) = await driver.list()
    assert report.state == "running"
    await driver.destroy(instance.id)
    assert host.leftovers() == {}


async def test_start_failure_carries_runcs_message_and_destroy_cleans_up(host: Host) -> None:
    driver = host.driver()
    instance = InstanceSpec(
        id=uuid.uuid4().hex,
        name="broken",
        image="busybox",
        command=["/no/such/program"],
        resources=ResourceVector(vcpus=100, memory=64),
    )
    await driver.create(instance)
    with pytest.raises(DriverError, match="/no/such/program"):
        await driver.start(instance.id)
    (report,) = await driver.list()
    assert report.state == "created"
    await driver.destroy(instance.id)
    assert host.leftovers() == {}


async def test_unknown_and_invalid_ids(host: Host) -> None:
    driver = host.driver()
    missing = uuid.uuid4().hex
    for call in (driver.start, driver.stop, driver.stats):
        with pytest.raises(UnknownInstance):
            await call(missing)
    with pytest.raises(UnknownInstance):
        await driver.resize(missing, Resources(100, 64, 1, 1))
    with pytest.raises(UnknownInstance):
        driver.log_path(missing)
    await driver.destroy(missing)
    await driver.destroy("../../etc")
    bad = spec("bad", TICK).model_copy(update={"id": "../escape"})
    with pytest.raises(InvalidInput):
        await driver.create(bad)
    assert host.leftovers() == {}


def test_host_info_reports_this_machine(host: Host) -> None:
    driver = host.driver()
    info = driver.host_info()
    assert info.capacity.vcpus == len(os.sched_getaffinity(0)) * 1000
    assert info.capacity.memory > 0 and info.capacity.disk > 0
    assert info.cpu_model and info.driver == "runc"
    from fleetvisor.drivers.runc.driver import checkpoint_missing

    expected = {"oci_images", "resize_live"}
    if checkpoint_missing() is None:  # a working CRIU >= 4.1 (scripts/deps/criu.sh)
        expected.add("checkpoint")
    assert info.capabilities == sorted(expected)
