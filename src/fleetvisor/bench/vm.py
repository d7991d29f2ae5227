"""`fleetvisor bench vm`: the QEMU driver's boot, snapshot, restore and live migration
against raw QEMU started by hand with the same command line and driven by hand over QMP.

```
 temp dir fvq-bench-*: VM image built (kernel cache) -> local store
 driver  : QemuDriver x2 (two state dirs), network none       boot once, then per round:
 raw     : qemu-system-x86_64 <same argv> x2, QMP by hand      boot once, then per round:
   snapshot   driver.snapshot(keep_running)     | migrate exec:cat > F, poll, cont
   restore    stop + driver.restore(F)          | quit; qemu -incoming exec:cat F, poll, cont
   migrate    migrate_incoming + migrate_out    | qemu -incoming tcp + migrate tcp, poll
              (downtime as QEMU reports it, A -> B, then B -> A next round)
 medians; ratios fleetvisor / raw; state_preserved: the guest's counter carried on
 everything killed (by the pid we started) and removed, also after an error
```
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from fleetvisor.clock import RealClock
from fleetvisor.drivers.qemu import QemuDriver, process
from fleetvisor.drivers.qemu.command import MachineConfig, qemu_argv
from fleetvisor.drivers.qemu.driver import MIGRATION_BANDWIDTH, StoreImages
from fleetvisor.errors import FleetvisorError
from fleetvisor.images.archive import import_image
from fleetvisor.images.store import ImageStore
from fleetvisor.images.vm_image import READY_MARKER, build_vm_image, resolve_vm_image
from fleetvisor.model.specs import InstanceSpec, ResourceVector

TARGET_RATIO = 1.2
COUNTER = re.compile(rb"fv-counter (\d+)")


class BenchError(FleetvisorError):
    """The benchmark could not run here (no root, no QEMU, no kernel cache)."""


@dataclass(frozen=True)
class VmBenchConfig:
    rounds: int = 5
    memory_mib: int = 256
    accel: str = "auto"


class RawVm:
    """QEMU started by hand with the driver's command line; QMP by hand."""

    def __init__(self, directory: Path, config: MachineConfig, qemu: str) -> None:
        self.dir = directory
        self.config = config
        self.qemu = qemu

    @classmethod
    def prepare(cls, directory: Path, base: MachineConfig, disk_base: Path, qemu: str) -> RawVm:
        directory.mkdir(parents=True)
        disk = directory / "disk.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk_base), "-F", "qcow2",
             str(disk)],
            check=True,
        )  # fmt: skip
        config = MachineConfig(
            **{
                **base.__dict__,
                "disk": disk,
                "console": directory / "console.log",
                "qmp_socket": directory / "qmp.sock",
                "ctl_socket": directory / "ctl.sock",
                "pid_file": directory / "qemu.pid",
            }
        )
        return cls(directory, config, qemu)

    def launch(self, incoming: str | None = None) -> None:
        argv = qemu_argv(self.config, qemu=self.qemu) + (
            ["-incoming", incoming] if incoming else []
        )
        self.config.qmp_socket.unlink(missing_ok=True)
        subprocess.run(argv, check=True, capture_output=True, timeout=60)

    def pid(self) -> int | None:
        return process.running_pid(self.config.pid_file, self.config.qmp_socket)

    async def qmp(self) -> QMPClient:
        client = QMPClient("raw")
        for _ in range(500):
            try:
                await client.connect(str(self.config.qmp_socket))
                return client
            except Exception:  # not listening yet
                await asyncio.sleep(0.01)
        raise BenchError(f"no QMP socket at {self.config.qmp_socket}")

    async def wait_ready(self, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while READY_MARKER.encode() not in process.read_from(self.config.console, 0):
            if time.monotonic() > deadline or self.pid() is None:
                raise BenchError("raw QEMU did not boot to the ready marker")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        pid = self.pid()
        if pid is not None:
            process.kill(pid)


async def _wait_migration(client: QMPClient) -> dict[str, Any]:
    while True:
        info: dict[str, Any] = await client.execute("query-migrate")  # type: ignore[assignment]
        if info.get("status") == "completed":
            return info
        if info.get("status") in ("failed", "cancelled"):
            raise BenchError(f"raw migration failed: {info}")
        await asyncio.sleep(0.02)


async def _raw_snapshot(vm: RawVm, path: Path) -> float:
    started = time.monotonic()
    client = await vm.qmp()
    await client.execute("migrate-set-parameters", {"max-bandwidth": MIGRATION_BANDWIDTH})
    await client.execute("migrate", {"uri": f"exec:cat > {path}"})
    await _wait_migration(client)
    await client.execute("cont")
    seconds = time.monotonic() - started
    await client.disconnect()
    return seconds


async def _raw_quit(vm: RawVm) -> None:
    client = await vm.qmp()
    with contextlib.suppress(Exception):
        await client.execute("quit")
    with contextlib.suppress(Exception):
        await client.disconnect()
    while vm.pid() is not None:
        await asyncio.sleep(0.02)


async def _raw_restore(vm: RawVm, path: Path) -> float:
    await _raw_quit(vm)
    started = time.monotonic()
    await asyncio.to_thread(vm.launch, f"exec:cat {path}")
    client = await vm.qmp()
    await _wait_migration(client)
    await client.execute("cont")
    seconds = time.monotonic() - started
    await client.disconnect()
    return seconds


async def _raw_migrate(source: RawVm, target: RawVm, port: int) -> float:
    await asyncio.to_thread(target.launch, f"tcp:127.0.0.1:{port}")
    incoming = await target.qmp()
    for client in (incoming, await source.qmp()):
        await client.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "block", "state": True}]}
        )
        await client.execute(
            "migrate-set-parameters",
            {"max-bandwidth": MIGRATION_BANDWIDTH, "block-incremental": True},
        )
        if client is not incoming:
            outgoing = client
    await outgoing.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    info = await _wait_migration(outgoing)
    with contextlib.suppress(Exception):
        await outgoing.execute("quit")
    for client in (outgoing, incoming):
        with contextlib.suppress(Exception):
            await client.disconnect()
    while source.pid() is not None:
        await asyncio.sleep(0.02)
    return float(info.get("downtime", 0))


def _last_counter(console: Path) -> int:
    found = COUNTER.findall(process.read_from(console, 0))
    return int(found[-1]) if found else -1


async def _carried_on(console: Path, before: int, seconds: float = 20) -> bool:
    """The guest's counter went past `before` without starting again from 0."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _last_counter(console) > before + 1:
            return True
        await asyncio.sleep(0.1)
    return False


async def run_vm_bench(config: VmBenchConfig) -> dict[str, Any]:
    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
        raise BenchError("QEMU is missing: run scripts/deps/qemu.sh")
    work = Path(tempfile.mkdtemp(prefix="fvq-bench-"))
    drivers: list[QemuDriver] = []
    raws: list[RawVm] = []
    try:
        return await _bench(config, work, drivers, raws)
    finally:
        for driver in drivers:
            for report in await driver.list():
                with contextlib.suppress(Exception):
                    await driver.destroy(report.id)
        for raw in raws:
            raw.kill()
        shutil.rmtree(work, ignore_errors=True)


async def _bench(
    config: VmBenchConfig, work: Path, drivers: list[QemuDriver], raws: list[RawVm]
) -> dict[str, Any]:
    await asyncio.to_thread(build_vm_image, work / "layout")
    store = ImageStore(work / "store")
    await asyncio.to_thread(import_image, store, work / "layout", "bench-vm:latest")
    for name in ("fvqba", "fvqbb"):
        drivers.append(
            QemuDriver(
                clock=RealClock(),
                state_dir=work / name,
                images=StoreImages(store),
                agent_id=name,
                network="none",
                accel=config.accel,
                max_vcpus=1,
            )
        )
    a, b = drivers
    spec = InstanceSpec(
        id="bench",
        name="bench",
        image="bench-vm:latest",
        resources=ResourceVector(vcpus=1000, memory=config.memory_mib, disk=1, net=0),
    )
    started = time.monotonic()
    await a.create(spec)
    await a.start("bench")
    boot_ready_s = time.monotonic() - started

    described = a.describe("bench")
    image = resolve_vm_image(store, "bench-vm:latest")
    machine = MachineConfig(
        name="bench",
        kernel=image.kernel,
        initramfs=image.initramfs,
        disk=Path(),
        console=Path(),
        qmp_socket=Path(),
        ctl_socket=Path(),
        pid_file=Path(),
        memory_mib=described["memory_mib"],
        vcpus=1,
        max_vcpus=1,
        accel=a.accel,
        cpu_model=a.cpu_model,
    )
    base = a.layout.base_disk(image.disk_digest)
    raws += [RawVm.prepare(work / f"raw{i}", machine, base, a.qemu) for i in (0, 1)]
    raw_started = time.monotonic()
    await asyncio.to_thread(raws[0].launch)
    await raws[0].wait_ready()
    raw_boot_ready_s = time.monotonic() - raw_started

    snap, raw_snap = work / "snap.state", work / "raw.state"
    figures: dict[str, list[float]] = {k: [] for k in ("snap", "raw_snap", "rest", "raw_rest")}
    figures.update(mig=[], raw_mig=[])
    preserved = True
    source, target, raw_source, raw_target = a, b, raws[0], raws[1]
    port = 47500
    for round_number in range(config.rounds):
        # alternate which goes first, so neither always meets a colder cache
        if round_number % 2:
            figures["raw_snap"].append(await _raw_snapshot(raw_source, raw_snap))
        figures["snap"].append((await source.snapshot("bench", snap))["seconds"])
        if not round_number % 2:
            figures["raw_snap"].append(await _raw_snapshot(raw_source, raw_snap))
        # restore: the driver stops the VM, then restores (timed: restore only)
        await source.stop("bench")
        before = _last_counter(source.log_path("bench"))
        t = time.monotonic()
        await source.restore(spec, snap)
        figures["rest"].append(time.monotonic() - t)
        preserved &= await _carried_on(source.log_path("bench"), before)
        figures["raw_rest"].append(await _raw_restore(raw_source, raw_snap))
        # migration: downtime as QEMU measures it on both sides
        port += 1
        await target.migrate_incoming(spec, port, machine=source.describe("bench"))
        result = await source.migrate_out("bench", f"tcp:127.0.0.1:{port}")
        await target.wait_incoming("bench")
        figures["mig"].append(result["downtime_ms"])
        before = _last_counter(source.log_path("bench"))
        preserved &= await _carried_on(target.log_path("bench"), before)
        await source.destroy("bench")
        await source.create(spec)  # the next round migrates back here
        port += 1
        figures["raw_mig"].append(await _raw_migrate(raw_source, raw_target, port))
        source, target = target, source
        raw_source, raw_target = raw_target, raw_source

    med = {k: statistics.median(v) for k, v in figures.items()}

    def ratio(ours: float, raw: float) -> float | None:
        return round(ours / raw, 3) if raw > 0 else None

    ratios = {
        "snapshot": ratio(med["snap"], med["raw_snap"]),
        "restore": ratio(med["rest"], med["raw_rest"]),
        "migrate_downtime": ratio(med["mig"], med["raw_mig"]),
    }
    return {
        "accel": a.accel,
        "rounds": config.rounds,
        "memory_mib": config.memory_mib,
        "boot_ready_s": round(boot_ready_s, 3),
        "raw_boot_ready_s": round(raw_boot_ready_s, 3),
        "snapshot_s": round(med["snap"], 4),
        "raw_snapshot_s": round(med["raw_snap"], 4),
        "restore_s": round(med["rest"], 4),
        "raw_restore_s": round(med["raw_rest"], 4),
        "migrate_downtime_ms": med["mig"],
        "raw_migrate_downtime_ms": med["raw_mig"],
        "ratios": ratios,
        "target_ratio": TARGET_RATIO,
        "within_target": all(r is not None and r <= TARGET_RATIO for r in ratios.values()),
        "state_preserved": preserved,
        "samples": {k: [round(x, 4) for x in v] for k, v in figures.items()},
    }
