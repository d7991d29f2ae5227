"""QemuDriver against real QEMU (TCG here): boot, balloon, vCPU hotplug, restart, stop,
snapshot + restore, live migration between two drivers, incremental disk diffs.

Each boot costs ~5 s under TCG, so each test boots once and checks several things on
that guest. Everything lives under a `fvq-test-` temp dir and `fvq…` agent ids; the
`fleet` fixture destroys every instance, kills any QEMU left (by the pid in its pid
file, checked against its command line) and removes taps, bridges and files, also when
the test failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from fleetvisor.clock import RealClock
from fleetvisor.drivers.base import UnknownInstance, load_driver
from fleetvisor.drivers.qemu import QemuDriver, process
from fleetvisor.drivers.qemu.driver import StoreImages
from fleetvisor.drivers.qemu.prereqs import qemu_missing
from fleetvisor.drivers.runc.network import link_exists
from fleetvisor.images.archive import import_image
from fleetvisor.images.store import ImageStore
from fleetvisor.images.vm_image import KERNEL_CACHE, build_vm_image
from fleetvisor.model.resources import Resources
from fleetvisor.model.specs import InstanceSpec, ResourceVector

COUNTER = re.compile(r"^fv-counter (\d+) cpus=(\d+)$", re.M)


MISSING = qemu_missing()
if MISSING:
    print(f"\nskipping QEMU driver tests: {MISSING}")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fvq-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def store(workdir: Path) -> ImageStore:
    """The VM image, built once for the module, in a store standing in for the host's."""
    build_vm_image(workdir / "layout", kernel_root=KERNEL_CACHE)
    image_store = ImageStore(workdir / "store")
    import_image(image_store, workdir / "layout", "fvq-vm:latest")
    return image_store


class Fleet:
    """Drivers made by a test, torn down together."""

    def __init__(self, workdir: Path, store: ImageStore) -> None:
        self.workdir = workdir
        self.store = store
        self.drivers: list[QemuDriver] = []

    def driver(self, *, network: str = "none", agent_id: str | None = None) -> QemuDriver:
        agent = agent_id or f"fvq{secrets.token_hex(1)}"
        driver = QemuDriver(
            clock=RealClock(),
            state_dir=self.workdir / f"state-{agent}",
            images=StoreImages(self.store),
            agent_id=agent,
            network=network,
            accel="tcg",
            max_vcpus=2,
            boot_timeout=90,
        )
        self.drivers.append(driver)
        return driver

    async def teardown(self) -> list[str]:
        problems = []
        for driver in self.drivers:
            if not driver.layout.instances_dir.exists():
                continue  # a second driver on the same state dir: done already
            for report in await driver.list():
                try:
                    await driver.destroy(report.id)
                except Exception as exc:  # keep cleaning; report at the end
                    problems.append(f"destroy {report.id}: {exc}")
            for pid_file in driver.layout.instances_dir.glob("*/qemu.pid"):
                pid = process.running_pid(pid_file, pid_file.with_name("qmp.sock"))
                if pid is not None:
                    process.kill(pid)
                    problems.append(f"QEMU {pid} survived destroy")
            for link in (driver.layout.bridge, *(driver.layout.tap(i) for i in range(2, 10))):
                if link_exists(link):
                    await asyncio.create_subprocess_exec("ip", "link", "del", link)
                    problems.append(f"link {link} survived destroy")
            shutil.rmtree(driver.layout.state_dir.parent, ignore_errors=True)
        return problems


@pytest.fixture
async def fleet(workdir: Path, store: ImageStore) -> AsyncIterator[Fleet]:
    made = Fleet(workdir, store)
    try:
        yield made
    finally:
        problems = await made.teardown()
    assert not problems, problems


def spec(instance_id: str, *, vcpus: int = 1000, memory: int = 256) -> InstanceSpec:
    return InstanceSpec(
        id=instance_id,
        name=instance_id,
        image="fvq-vm:latest",
        resources=ResourceVector(vcpus=vcpus, memory=memory, disk=1, net=100),
    )


def counters(driver: QemuDriver, instance_id: str) -> list[tuple[int, int]]:
    text = driver.log_path(instance_id).read_text(errors="replace")
    return [(int(n), int(c)) for n, c in COUNTER.findall(text)]


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], seconds: float = 30.0, what: str = "it"
) -> None:
    for _ in range(int(seconds / 0.1)):
        result = predicate()
        if await result if inspect.isawaitable(result) else result:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_boot_resize_restart_stop(fleet: Fleet) -> None:
    driver = fleet.driver(network="bridge")
    assert "accel:tcg" in driver.host_info().cpu_features
    created = await driver.create(spec("vm1", memory=384))
    assert created.state == "created" and created.address
    assert await driver.create(spec("vm1", memory=384)) == created  # idempotent

    report = await driver.start("vm1")
    assert report.state == "running"
    assert "FLEETVISOR-READY" in driver.log_path("vm1").read_text()
    tap = driver.layout.tap(int(created.address.rsplit(".", 1)[1]))
    assert link_exists(tap) and link_exists(driver.layout.bridge)
    address = await driver.guest_exec("vm1", "ip -o -4 addr show eth0")
    assert created.address in address
    await driver.start("vm1")  # running: nothing happens

    # balloon: down to 200 MiB, then back up to the boot size
    await driver.resize("vm1", Resources(vcpus=1000, memory=200, disk=1, net=100))

    async def memory_is(mib: float) -> bool:
        return abs((await driver.stats("vm1"))["memory_mib"] - mib) < 1

    await wait_for(lambda: memory_is(200), what="balloon at 200 MiB")
    await driver.resize("vm1", Resources(vcpus=1000, memory=384, disk=1, net=100))
    await wait_for(lambda: memory_is(384), what="balloon back at 384 MiB")

    # vCPU hotplug: QEMU has 2, and the guest brings the new one online
    await driver.resize("vm1", Resources(vcpus=2000, memory=384, disk=1, net=100))

    async def guest_sees_two() -> bool:
        return (await driver.guest_exec("vm1", "cat /sys/devices/system/cpu/online")) == "0-1"

    await wait_for(guest_sees_two, what="the hot-plugged vCPU online in the guest")
    stats = await driver.stats("vm1")
    assert stats["vcpus"] == 2 and stats["cpu_usage_seconds"] > 0
    assert stats["disk_read_bytes"] > 0  # the kernel probed its disk
    await wait_for(
        lambda: any(c == 2 for _, c in counters(driver, "vm1")),
        what="the counter line reporting 2 CPUs",
    )

    # an agent restart: a new driver on the same state dir finds the VM running
    again = fleet.driver(network="bridge", agent_id=driver.layout.agent_id)
    [found] = await again.list()
    assert found.id == "vm1" and found.state == "running"

    stopped = await again.stop("vm1")
    assert stopped.state == "stopped"
    assert driver.layout.disk("vm1").exists()  # the overlay survives a stop
    await again.destroy("vm1")
    await again.destroy("vm1")  # missing: fine
    assert not link_exists(tap) and not link_exists(driver.layout.bridge)
    assert not driver.layout.instance_dir("vm1").exists()
    with pytest.raises(UnknownInstance):
        await again.stats("vm1")


async def test_snapshot_restore_carries_on(fleet: Fleet, workdir: Path) -> None:
    driver = fleet.driver()
    await driver.create(spec("snap"))
    await driver.start("snap")
    await wait_for(lambda: len(counters(driver, "snap")) >= 3, what="3 counter lines")
    path = workdir / "snap.state"
    result = await driver.snapshot("snap", path, keep_running=False)
    assert result["bytes"] > 1 << 20 and result["downtime_ms"] >= 0
    assert (await driver.list())[0].state == "stopped"
    last = counters(driver, "snap")[-1][0]

    restored = await driver.restore(spec("snap"), path)
    assert restored.state == "running"
    await wait_for(
        lambda: counters(driver, "snap")[-1][0] >= last + 3,
        what="the counter carrying on after the restore",
    )
    numbers = [n for n, _ in counters(driver, "snap")]
    assert numbers == list(range(len(numbers))), "the guest restarted or skipped"
    assert driver.log_path("snap").read_text().count("FLEETVISOR-READY") == 1  # no reboot


async def test_live_migration_between_drivers(fleet: Fleet) -> None:
    source, target = fleet.driver(), fleet.driver()
    await source.create(spec("mig"))
    await source.start("mig")
    await source.guest_exec("mig", "echo on-disk | dd of=/dev/vda bs=512 seek=4096; sync")
    await wait_for(lambda: len(counters(source, "mig")) >= 2, what="counter")

    port = 47000 + secrets.randbelow(2000)
    incoming = await target.migrate_incoming(spec("mig"), port, machine=source.describe("mig"))
    assert incoming.state == "created"
    result = await source.migrate_out("mig", f"tcp:127.0.0.1:{port}")
    assert result["downtime_ms"] < result["total_ms"]
    running = await target.wait_incoming("mig")
    assert running.state == "running"
    assert (await source.list())[0].state == "stopped"
    last_on_source = counters(source, "mig")[-1][0]
    await wait_for(lambda: bool(counters(target, "mig")), what="the counter on the target")
    assert counters(target, "mig")[0][0] in (last_on_source, last_on_source + 1)
    data = await target.guest_exec(
        "mig", "dd if=/dev/vda bs=512 skip=4096 count=1 2>/dev/null | head -c 7"
    )
    assert data == "on-disk"  # the overlay travelled with the RAM


async def test_cold_migration_carries_the_disk(fleet: Fleet, workdir: Path) -> None:
    source, target = fleet.driver(), fleet.driver()
    await source.create(spec("cold"))
    await source.start("cold")
    await source.guest_exec("cold", "echo on-disk | dd of=/dev/vda bs=512 seek=4096; sync")
    await source.stop("cold")
    await source.export_state("cold", workdir / "cold.qcow2")
    await target.create(spec("cold"))
    await target.import_state("cold", workdir / "cold.qcow2")
    await target.start("cold")  # a fresh boot, on the disk the source wrote
    data = await target.guest_exec(
        "cold", "dd if=/dev/vda bs=512 skip=4096 count=1 2>/dev/null | head -c 7"
    )
    assert data == "on-disk"


async def test_disk_diff_holds_exactly_the_written_blocks(fleet: Fleet, workdir: Path) -> None:
    driver = fleet.driver()
    await driver.create(spec("diff"))
    await driver.start("diff")
    await driver.guest_exec("diff", "dd if=/dev/urandom of=/dev/vda bs=4096 count=4; sync")
    await driver.checkpoint_disk("diff")  # the write above is before the checkpoint
    offsets_mib = (1, 5, 9)
    for mib in offsets_mib:
        await driver.guest_exec(
            "diff", f"dd if=/dev/urandom of=/dev/vda bs=4096 count=1 seek={mib * 256}; sync"
        )
    first = await driver.disk_diff("diff", workdir / "diff1.qcow2")
    cluster = 64 << 10  # the bitmap's granularity: qcow2's cluster size
    assert first["extents"] == [(mib << 20, cluster) for mib in offsets_mib]
    # the diff holds the guest's bytes at those offsets
    guest = await driver.guest_exec(
        "diff", "dd if=/dev/vda bs=4096 count=1 skip=1280 2>/dev/null | md5sum"
    )
    raw = await asyncio.to_thread(_read_qcow2, workdir / "diff1.qcow2", 5 << 20, 4096)
    assert guest.split()[0] == hashlib.md5(raw).hexdigest()

    # the next diff starts from the previous one
    await driver.guest_exec(
        "diff", "dd if=/dev/urandom of=/dev/vda bs=4096 count=1 seek=3072; sync"
    )
    second = await driver.disk_diff("diff", workdir / "diff2.qcow2")
    assert second["extents"] == [(12 << 20, cluster)]


def _read_qcow2(path: Path, offset: int, length: int) -> bytes:
    raw = path.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)], check=True)
    with raw.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def test_load_driver_builds_the_qemu_driver(workdir: Path, store: ImageStore) -> None:
    driver = load_driver(
        "qemu",
        clock=RealClock(),
        state_dir=workdir / "state-load",
        options={"accel": "tcg", "agent_id": "fvqld", "network": "none"},
        rootfs=StoreImages(store),  # type: ignore[arg-type]
    )
    assert driver.kind == "qemu"
    assert {"checkpoint", "live_migrate", "disk_diff", "resize_live"} <= set(
        driver.host_info().capabilities
    )
