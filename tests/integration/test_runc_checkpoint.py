"""RuncDriver checkpoint / restore / exec against real runc and CRIU >= 4.1.

The workload is memcounter (images/workloads/memcounter.c): it holds MEM_MB of random
data and counts in memory, so a live restore continues the count and keeps the memory
checksum, while a cold restart would begin at 1 with another checksum.

Each simulated agent gets its own agent id, state dir and /24; the `hosts` fixture
removes everything with those prefixes afterwards, even when a test failed, and fails
the test if it could not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
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
from fleetvisor.drivers.base import Capability
from fleetvisor.drivers.runc import RuncDriver
from fleetvisor.drivers.runc.criu import find_criu
from fleetvisor.drivers.runc.criu_floor import raw_criu_roundtrip
from fleetvisor.drivers.runc.driver import checkpoint_missing
from fleetvisor.errors import DriverError
from fleetvisor.images.build import WorkloadBuildError, compile_memcounter
from fleetvisor.model.specs import InstanceSpec, ResourceVector

CGROUP_ROOT = Path("/sys/fs/cgroup")
MEM_MB = 100
MEMCOUNTER_CONFIG = {"Env": ["PATH=/bin"], "Entrypoint": ["/bin/memcounter"]}
TICK_MS = 50


def _missing_part() -> str | None:
    return runc_missing("the checkpoint tests") or checkpoint_missing()


MISSING = _missing_part()
if MISSING:
    print(f"\nskipping runc checkpoint tests: {MISSING}")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


@pytest.fixture(scope="module")
def memcounter() -> Path:
    try:
        return compile_memcounter()
    except WorkloadBuildError as exc:
        if exc.missing_packages:  # only a missing tool skips; a compile error fails
            pytest.skip(str(exc))
        raise


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory, memcounter: Path) -> Path:
    """busybox + applet links + /bin/memcounter + /etc/passwd, /etc/group, /data."""
    root = tmp_path_factory.mktemp("memcounter-rootfs")
    busybox = shutil.which("busybox")
    assert busybox
    (root / "bin").mkdir()
    shutil.copy2(busybox, root / "bin" / "busybox")
    shutil.copy2(memcounter, root / "bin" / "memcounter")
    listed = subprocess.run([busybox, "--list"], capture_output=True, text=True, timeout=10)
    for applet in listed.stdout.split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "motd").write_text("from the image\n")
    for directory in ("tmp", "root", "proc", "sys", "dev", "data"):
        (root / directory).mkdir()
    return root


def _sh(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30).stdout


def _used_subnets() -> str:
    return _sh("ip", "-o", "addr")


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

    def driver(self) -> RuncDriver:
        return RuncDriver(
            clock=RealClock(),
            state_dir=self.state_dir,
            rootfs=self.rootfs,
            agent_id=self.agent_id,
            subnet=self.subnet,
            stop_grace_seconds=1.5,
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
        found: dict[str, list[Any]] = {
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
                        with contextlib.suppress(OSError):
                            directory.rmdir()
                with contextlib.suppress(OSError):
                    top.rmdir()
            time.sleep(0.1)


@pytest.fixture
def hosts(tmp_path: Path, rootfs: Path) -> Iterator[Callable[[], Host]]:
    """Makes simulated agents (own agent id, state dir, /24); purges them all afterwards."""
    made: list[Host] = []
    taken: set[str] = set()

    def make() -> Host:
        used = _used_subnets()
        for _ in range(100):
            subnet = f"198.19.{secrets.randbelow(256)}.0/24"
            if f" {subnet.rsplit('.', 1)[0]}." not in used and subnet not in taken:
                break
        else:
            raise AssertionError("no free 198.19.x.0/24 on this machine")
        taken.add(subnet)
        agent_id = secrets.token_hex(3)
        host = Host(
            tmp_path / f"agent-{agent_id}",
            agent_id,
            subnet,
            DirectoryRootfs(rootfs, MEMCOUNTER_CONFIG),
        )
        made.append(host)
        return host

    try:
        yield make
    finally:
        remaining = {}
        for host in made:
            host.purge()
            if left := host.leftovers():
                remaining[host.agent_id] = left
        assert not remaining, f"cleanup left {remaining}"


def memcounter_spec(name: str = "counter") -> InstanceSpec:
    return InstanceSpec(
        id=uuid.uuid4().hex[:12],
        name=name,
        image="memcounter",
        env={"MEM_MB": str(MEM_MB), "TICK_MS": str(TICK_MS)},
        resources=ResourceVector(vcpus=1000, memory=MEM_MB + 128, disk=1, net=100),
    )


async def eventually(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(0.05)


def counters(driver: RuncDriver, instance_id: str) -> list[int]:
    text = driver.log_path(instance_id).read_text(errors="replace")
    return [int(n) for n in re.findall(r"^counter (\d+)$", text, re.MULTILINE)]


def checksums(driver: RuncDriver, instance_id: str) -> list[str]:
    text = driver.log_path(instance_id).read_text(errors="replace")
    return re.findall(r"^checksum (0x[0-9a-f]{16})$", text, re.MULTILINE)


async def checksum_now(driver: RuncDriver, instance_id: str) -> str:
    """Ask memcounter (PID 1 in its container) for its memory checksum."""
    before = len(checksums(driver, instance_id))
    code, output = await driver.exec(instance_id, ["kill", "-USR1", "1"], timeout=10)
    assert code == 0, output
    await eventually("a checksum line", lambda: len(checksums(driver, instance_id)) > before)
    return checksums(driver, instance_id)[-1]


async def running_counter(driver: RuncDriver, instance_id: str, at_least: int = 5) -> None:
    await eventually(
        f"memcounter to count to {at_least}",
        lambda: (c := counters(driver, instance_id)) and c[-1] >= at_least,
    )


def counter_file(driver: RuncDriver, instance_id: str) -> int:
    return int((driver.layout.upper(instance_id) / "data" / "counter").read_text())


@pytest.mark.parametrize("flow", ["restore_unpacks", "create_import_restore"])
async def test_migrate_to_another_driver(
    hosts: Callable[[], Host], tmp_path: Path, flow: str
) -> None:
    """restore_unpacks: `restore(spec, images, upper_tar)` makes the instance;
    create_import_restore: `create`, `import_state`, `restore(spec, images, None)` (the
    agent's migration flow)."""
    source_host, target_host = hosts(), hosts()
    source, target = source_host.driver(), target_host.driver()
    assert Capability.CHECKPOINT in source.capabilities()
    spec = memcounter_spec()
    await source.create(spec)
    await source.start(spec.id)
    await running_counter(source, spec.id)
    code, output = await source.exec(
        spec.id, ["sh", "-c", "echo kept > /data/note && rm /etc/motd"], timeout=10
    )
    assert (code, output) == (0, "")
    checksum = await checksum_now(source, spec.id)

    images = tmp_path / "images"
    dumped = await source.checkpoint(spec.id, images)
    assert dumped["dump_s"] > 0 and dumped["image_bytes"] > MEM_MB * 1024 * 1024
    at_dump = counters(source, spec.id)[-1]
    assert source_host.processes() == [] and source_host.containers() == []
    assert [r.state for r in await source.list()] == ["stopped"]
    await asyncio.sleep(3 * TICK_MS / 1000)
    assert counters(source, spec.id)[-1] == at_dump  # nothing runs on the source

    upper_tar = tmp_path / "upper.tar"
    await source.export_state(spec.id, upper_tar)
    began = time.monotonic()
    if flow == "restore_unpacks":
        report = await target.restore(spec, images, upper_tar)
    else:
        await target.create(spec)
        await target.import_state(spec.id, upper_tar)
        assert await target.spec_of(spec.id) == spec
        report = await target.restore(spec, images, None)
    restore_s = time.monotonic() - began
    assert report.state == "running"
    assert report.address and report.address.startswith(target_host.subnet.rsplit(".", 1)[0])
    await eventually(
        "the counter to continue on the target",
        lambda: (c := counters(target, spec.id)) and c[-1] > at_dump + 2,
    )
    resumed = counters(target, spec.id)
    assert resumed[0] == at_dump + 1, f"dumped at {at_dump}, target printed {resumed[:5]}"
    assert counter_file(target, spec.id) > at_dump
    assert await checksum_now(target, spec.id) == checksum
    code, output = await target.exec(spec.id, ["cat", "/data/note"], timeout=10)
    assert (code, output) == (0, "kept\n")
    code, _ = await target.exec(spec.id, ["test", "-e", "/etc/motd"], timeout=10)
    assert code == 1  # the whiteout travelled with the upper dir
    print(
        f"\nmigrate ({flow}) {MEM_MB} MiB memcounter: dump {dumped['dump_s']:.3f} s, "
        f"restore {restore_s:.3f} s, images {dumped['image_bytes'] / 2**20:.1f} MiB"
    )

    await source.destroy(spec.id)
    assert source_host.leftovers() == {}
    await target.destroy(spec.id)
    assert target_host.leftovers() == {}


async def test_rollback_restores_on_the_same_driver(
    hosts: Callable[[], Host], tmp_path: Path
) -> None:
    host = hosts()
    driver = host.driver()
    spec = memcounter_spec("rollback")
    await driver.create(spec)
    address = (await driver.start(spec.id)).address
    await running_counter(driver, spec.id)
    checksum = await checksum_now(driver, spec.id)

    dumped = await driver.checkpoint(spec.id, tmp_path / "images")
    at_dump = counters(driver, spec.id)[-1]
    assert host.processes() == [] and dumped["image_bytes"] > 0
    with pytest.raises(DriverError, match="not running"):
        await driver.exec(spec.id, ["true"], timeout=5)

    report = await driver.restore(spec, tmp_path / "images", None)
    assert report.state == "running" and report.address == address
    await eventually("the counter to continue", lambda: counters(driver, spec.id)[-1] > at_dump + 2)
    assert counters(driver, spec.id)[counters(driver, spec.id).index(at_dump) + 1] == at_dump + 1
    assert await checksum_now(driver, spec.id) == checksum
    with pytest.raises(DriverError, match="is running"):
        await driver.restore(spec, tmp_path / "images", None)

    # a checkpoint that leaves it running, then a normal stop and destroy
    kept = await driver.checkpoint(spec.id, tmp_path / "copy", leave_running=True)
    assert kept["image_bytes"] > 0
    assert (await driver.stats(spec.id))["pids"] >= 1
    before = counters(driver, spec.id)[-1]
    await eventually("it to keep counting", lambda: counters(driver, spec.id)[-1] > before)
    await driver.stop(spec.id)
    await driver.destroy(spec.id)
    assert host.leftovers() == {}


async def test_exec_output_and_exit_code(hosts: Callable[[], Host]) -> None:
    host = hosts()
    driver = host.driver()
    spec = memcounter_spec("exec")
    spec = spec.model_copy(update={"env": {"MEM_MB": "1", "TICK_MS": "200"}})
    await driver.create(spec)
    await driver.start(spec.id)
    code, output = await driver.exec(
        spec.id, ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10
    )
    assert code == 3 and sorted(output.split()) == ["err", "out"]
    code, output = await driver.exec(spec.id, ["sh", "-c", "echo $MEM_MB; hostname"], timeout=10)
    assert (code, output) == (0, "1\nexec\n")
    code, output = await driver.exec(spec.id, ["head", "-c", "200000", "/dev/zero"], timeout=10)
    assert code == 0 and len(output) == 64 * 1024
    began = time.monotonic()
    code, output = await driver.exec(spec.id, ["sleep", "30"], timeout=0.5)
    assert code == 124 and "timed out" in output and time.monotonic() - began < 5
    code, output = await driver.exec(spec.id, ["no-such-command"], timeout=10)
    assert code != 0 and "no-such-command" in output
    await driver.destroy(spec.id)
    assert host.leftovers() == {}


async def test_failed_restore_removes_what_it_made(
    hosts: Callable[[], Host], tmp_path: Path
) -> None:
    host = hosts()
    driver = host.driver()
    spec = memcounter_spec("broken")
    images = tmp_path / "images"
    images.mkdir()
    (images / "inventory.img").write_bytes(b"not a CRIU image")
    with pytest.raises(DriverError, match="could not restore"):
        await driver.restore(spec, images, None)
    assert await driver.list() == []
    assert host.leftovers() == {}


async def test_raw_criu_floor(tmp_path: Path, memcounter: Path) -> None:
    criu = find_criu()
    assert criu is not None
    result = await raw_criu_roundtrip(criu, MEM_MB, tmp_path, binary=memcounter)
    assert 0 < result["dump_s"] < 30 and 0 < result["restore_s"] < 30
    assert result["total_ms"] == pytest.approx((result["dump_s"] + result["restore_s"]) * 1000)
    assert result["image_bytes"] > MEM_MB * 1024 * 1024
    assert result["counter_after_restore"] > result["counter_at_dump"]
    assert list(tmp_path.iterdir()) == []
    print(
        f"\nraw criu {MEM_MB} MiB: dump {result['dump_s']:.3f} s, "
        f"restore {result['restore_s']:.3f} s"
    )
