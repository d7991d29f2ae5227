"""QemuDriver: an instance is a QEMU process (q35) booting a VM image from the host's
image store, driven over QMP; see README.md for the flow and the on-disk layout.

Lifecycle (each call idempotent):
  create   resolve the VM image, link its disk as the host's shared base, qcow2 overlay,
           address. Runs nothing.
  start    tap on the bridge, `qemu-system-x86_64 ... -daemonize`, ready = the marker on
           the serial console.
  stop     guest power-off (control channel + ACPI), `quit` after the grace period.
  destroy  quit, tap, address, files.
Beyond the protocol: snapshot/restore (migration to/from a file), live migration over
TCP (RAM + incremental block migration of the overlay), and incremental disk diffs
from a dirty bitmap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from fleetvisor.clock import Clock
from fleetvisor.drivers.base import Capability, UnknownInstance
from fleetvisor.drivers.qemu import accel as accel_probe
from fleetvisor.drivers.qemu import disks, process, qmp
from fleetvisor.drivers.qemu.command import MachineConfig, mac_for, qemu_argv, vcpus_of
from fleetvisor.drivers.qemu.guest import guest_exec, guest_send
from fleetvisor.drivers.qemu.layout import Layout
from fleetvisor.drivers.qemu.network import attach_tap, detach_tap
from fleetvisor.drivers.runc.layout import (
    INSTANCE_ID,
    check_agent_id,
    check_instance_id,
    default_agent_id,
)
from fleetvisor.drivers.runc.network import (
    AddressPool,
    BridgeNetwork,
    counters,
    default_subnet,
    parse_subnet,
)
from fleetvisor.errors import DriverError, InvalidInput
from fleetvisor.images.store import ImageStore
from fleetvisor.images.vm_image import READY_MARKER, VmImage, resolve_vm_image
from fleetvisor.model.resources import Resources, parse_capacity, parse_size_mib
from fleetvisor.model.specs import HostInfo, InstanceReport, InstanceSpec, ResourceVector

STATE_SUBDIR = "qemu-driver"
MIB = 1 << 20
BITMAP = "fv-diff"
MIGRATION_BANDWIDTH = 10 << 30  # bytes/s: QEMU's default (32 MiB/s) would dominate
OPTIONS = {
    "agent_id": "1-6 lowercase letters/digits in every name this agent creates",
    "subnet": "the instances' /24 inside 198.18.0.0/15",
    "network": "bridge (a tap per VM on the agent's bridge) or none",
    "accel": "auto (boot test, cached), kvm or tcg",
    "cpu_model": "QEMU -cpu model (default max)",
    "max_vcpus": "vCPUs a VM can grow to by hotplug (default: the host's CPUs)",
    "boot_timeout": "seconds a guest may take to print the ready marker",
    "stop_grace": "seconds between the power-off request and `quit`",
    "base_dir": "where shared base disks live (default: next to the host image store)",
    "migration_address": "address incoming migrations listen on (default 127.0.0.1)",
    "memory_reserve": "memory kept for the host, e.g. 1G",
    "net_mbps": "network capacity to report, Mbit/s",
    "capacity": "report less than the machine, e.g. cpu=2,memory=4G",
    "qemu": "the qemu-system-x86_64 binary",
}


class VmImages(Protocol):
    """Where the driver finds VM images: the files of an artifact in a local store."""

    async def vm_image(self, ref: str) -> VmImage: ...


class StoreImages:
    """VM images from an ImageStore already holding them (tests, single machines)."""

    def __init__(self, store: ImageStore) -> None:
        self.store = store

    async def vm_image(self, ref: str) -> VmImage:
        return await asyncio.to_thread(resolve_vm_image, self.store, ref)


class HostCacheImages:
    """VM images through the agent's HostImageCache: pulled from the fleet's registry into
    the host store on first use (the agent's prepare() usually did it already)."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.store: ImageStore = cache.store

    async def vm_image(self, ref: str) -> VmImage:
        await self.cache.ensure_image(ref)
        return await asyncio.to_thread(resolve_vm_image, self.store, ref)


class QemuDriver:
    kind = "qemu"

    def __init__(
        self,
        *,
        clock: Clock,
        state_dir: Path,
        images: VmImages,
        agent_id: str | None = None,
        subnet: str | None = None,
        network: str = "bridge",
        accel: str = "auto",
        cpu_model: str = "max",
        max_vcpus: int | None = None,
        boot_timeout: float = 60.0,
        stop_grace: float = 5.0,
        base_dir: Path | None = None,
        migration_address: str = "127.0.0.1",
        memory_reserve_mib: int = 1024,
        net_mbps: int = 10_000,
        capacity_limit: dict[str, int] | None = None,
        qemu: str = "qemu-system-x86_64",
    ) -> None:
        self.qemu = shutil.which(qemu) or qemu
        if not os.access(self.qemu, os.X_OK) or shutil.which("qemu-img") is None:
            raise DriverError(
                f"{qemu} or qemu-img is missing: run scripts/deps/qemu.sh "
                "(apt-get install qemu-system-x86 qemu-utils)"
            )
        if network not in ("bridge", "none"):
            raise InvalidInput(f"qemu driver option network={network!r}: use bridge or none")
        if accel not in ("auto", *accel_probe.ACCELS):
            raise InvalidInput(f"qemu driver option accel={accel!r}: use auto, kvm or tcg")
        driver_dir = state_dir / STATE_SUBDIR
        agent = check_agent_id(agent_id or default_agent_id(driver_dir))
        store_root = getattr(getattr(images, "store", None), "root", None)
        default_bases = Path(store_root).parent / "vm-bases" if store_root else driver_dir / "bases"
        self.clock = clock
        self.images = images
        self.layout = Layout(driver_dir, agent, Path(base_dir or default_bases))
        self.subnet = parse_subnet(subnet) if subnet else default_subnet(agent)
        self.network_mode = network
        self.cpu_model = cpu_model
        self.max_vcpus = max_vcpus or len(os.sched_getaffinity(0))
        self.boot_timeout = boot_timeout
        self.stop_grace = stop_grace
        self.migration_address = migration_address
        self.memory_reserve_mib = memory_reserve_mib
        self.net_mbps = net_mbps
        self.capacity_limit = dict(capacity_limit or {})
        self.addresses = AddressPool(self.layout.network_state, self.subnet)
        self.network = BridgeNetwork(self.layout.bridge, self.subnet)
        self._network_lock = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = {}
        self._cpu_baseline: dict[str, tuple[float, float]] = {}
        self.layout.instances_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.accel = (
            accel if accel != "auto" else accel_probe.detect(self.layout.accel_cache, self.qemu)
        )

    @classmethod
    def from_options(
        cls, *, clock: Clock, state_dir: Path, options: dict[str, str], images: Any
    ) -> QemuDriver:
        """Build from the agent's `--driver-option key=value` pairs (see OPTIONS); `images`
        is the agent's HostImageCache (or anything with `vm_image(ref)`)."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidInput(
                f"unknown qemu driver option(s) {unknown}; known: "
                + ", ".join(f"{k} ({v})" for k, v in OPTIONS.items())
            )
        if images is None:
            raise InvalidInput("the qemu driver needs the host's image cache")
        source = images if hasattr(images, "vm_image") else HostCacheImages(images)
        max_vcpus = options.get("max_vcpus")
        return cls(
            clock=clock,
            state_dir=state_dir,
            images=source,
            agent_id=options.get("agent_id") or None,
            subnet=options.get("subnet") or None,
            network=options.get("network", "bridge"),
            accel=options.get("accel", "auto"),
            cpu_model=options.get("cpu_model", "max"),
            max_vcpus=_number(options, "max_vcpus", max_vcpus or "0", int) or None,
            boot_timeout=_number(options, "boot_timeout", "60", float),
            stop_grace=_number(options, "stop_grace", "5", float),
            base_dir=Path(options["base_dir"]) if options.get("base_dir") else None,
            migration_address=options.get("migration_address", "127.0.0.1"),
            memory_reserve_mib=parse_size_mib(
                options.get("memory_reserve", "1G"), what="memory_reserve"
            ),
            net_mbps=_number(options, "net_mbps", "10000", int),
            capacity_limit=parse_capacity(options.get("capacity", "")),
            qemu=options.get("qemu", "qemu-system-x86_64"),
        )

    # -- host ----------------------------------------------------------------------------

    def host_info(self) -> HostInfo:
        """Capacity of the machine; the accelerator is reported as the CPU feature
        `accel:kvm` or `accel:tcg`, so placement can ask for it like any CPU flag."""
        disk = os.statvfs(self.layout.state_dir)
        model, flags = _cpuinfo()
        measured = {
            "vcpus": len(os.sched_getaffinity(0)) * 1000,
            "memory": max(0, _mem_total_mib() - self.memory_reserve_mib),
            "disk": disk.f_blocks * disk.f_frsize // 1024**3,
            "net": self.net_mbps,
        }
        capacity = Resources(**{**measured, **self.capacity_limit})
        return HostInfo(
            capacity=ResourceVector.of(capacity),
            cpu_model=f"{model} (qemu {self.accel})"[:255],
            cpu_features=[*flags[:1000], f"accel:{self.accel}"],
            driver=self.kind,
            capabilities=sorted(self.capabilities()),
        )

    def capabilities(self) -> set[Capability]:
        return {
            Capability.RESIZE_LIVE,
            Capability.CHECKPOINT,
            Capability.LIVE_MIGRATE,
            Capability.DISK_DIFF,
            Capability.OCI_IMAGES,
        }

    def log_path(self, instance_id: str) -> Path:
        """The guest's serial console (appended across boots, restores and migrations)."""
        self._require(instance_id)
        return self.layout.console(instance_id)

    # -- lifecycle -----------------------------------------------------------------------

    async def create(self, spec: InstanceSpec) -> InstanceReport:
        check_instance_id(spec.id)
        record = await self._load(spec.id)
        if record is not None and record.get("ready"):
            return await self._report(spec.id, record)
        try:
            image = await self.images.vm_image(spec.image)
            base = await asyncio.to_thread(
                disks.ensure_base, image.disk, self.layout.base_disk(image.disk_digest)
            )
            directory = self.layout.instance_dir(spec.id)
            await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True, mode=0o700)
            await disks.create_overlay(base, self.layout.disk(spec.id))
            record = {
                "spec": spec.model_dump(),
                "image": {
                    "ref": image.ref,
                    "digest": image.digest,
                    "kernel": str(image.kernel),
                    "initramfs": str(image.initramfs),
                    "cmdline": str(image.config.get("cmdline", "")),
                },
                "base": str(base),
                "phase": "created",
                "machine": None,
            }
            if self.network_mode == "bridge":
                async with self._network_lock:
                    lease = self.addresses.allocate(spec.id)
                record["address"] = str(lease.address)
                record["lease_index"] = lease.index
            record["ready"] = True
            await self._save(spec.id, record)
        except Exception:
            with contextlib.suppress(Exception):
                await self.destroy(spec.id)
            raise
        return await self._report(spec.id, record)

    async def export_state(self, instance_id: str, dest: Path) -> None:
        """The VM's writable disk (its qcow2 overlay) as a file, for a cold migration.
        Take it while the VM is stopped."""
        await self._require_async(instance_id)
        if self._pid(instance_id) is not None:
            raise DriverError(f"instance {instance_id} is running: stop it before export")
        await asyncio.to_thread(shutil.copyfile, self.layout.disk(instance_id), dest)

    async def import_state(self, instance_id: str, overlay: Path) -> None:
        """Replace the (stopped) VM's overlay with one `export_state` wrote on another
        host, rebased on this host's copy of the same base."""
        async with self._lock(instance_id):
            record = await self._require_async(instance_id)
            if self._pid(instance_id) is not None:
                raise DriverError(f"instance {instance_id} is running: its disk stays")
            await disks.adopt_overlay(
                Path(overlay), Path(record["base"]), self.layout.disk(instance_id)
            )

    async def start(self, instance_id: str) -> InstanceReport:
        async with self._lock(instance_id):
            record = await self._require_async(instance_id)
            if self._pid(instance_id) is not None:
                return await self._report(instance_id, record)
            machine = self._boot_machine(record)
            offset = await self._launch(instance_id, record, machine)
            await process.wait_marker(
                self.layout.console(instance_id),
                offset,
                READY_MARKER,
                self.clock,
                self.boot_timeout,
                pid_file=self.layout.pid_file(instance_id),
                qmp_socket=self.layout.qmp_socket(instance_id),
            )
            await self._running(instance_id, record, machine)
        return await self._report(instance_id, record)

    async def stop(self, instance_id: str) -> InstanceReport:
        async with self._lock(instance_id):
            record = await self._require_async(instance_id)
            await self._shutdown(instance_id, self.stop_grace)
            if record["phase"] in ("running", "incoming"):
                record.update(phase="stopped", started_at=None)
                await self._save(instance_id, record)
        return await self._report(instance_id, record)

    async def destroy(self, instance_id: str) -> None:
        """Remove every trace of the instance; a missing instance is not an error."""
        if not INSTANCE_ID.match(instance_id):
            return
        async with self._lock(instance_id):
            await self._shutdown(instance_id, 0.0)
            record = await self._load(instance_id) or {}
            if "lease_index" in record or self.addresses.get(instance_id):
                async with self._network_lock:
                    lease = self.addresses.get(instance_id)
                    if lease is not None:
                        await detach_tap(self.layout.tap(lease.index))
                    self.addresses.release(instance_id)
                    if self.addresses.count() == 0:
                        await self.network.remove_bridge()
            directory = self.layout.instance_dir(instance_id)
            await asyncio.to_thread(shutil.rmtree, directory, True)
            await asyncio.to_thread(_remove_sockets, self.layout, instance_id)
        self._cpu_baseline.pop(instance_id, None)
        self._locks.pop(instance_id, None)

    async def resize(self, instance_id: str, resources: Resources) -> InstanceReport:
        """Memory through the balloon (up to the boot size), vCPUs by hotplug (up to
        max_vcpus). Stopped instances take the new size at their next start."""
        vector = ResourceVector.of(resources)
        async with self._lock(instance_id):
            record = await self._require_async(instance_id)
            machine = record.get("machine")
            if self._pid(instance_id) is not None and machine:
                wanted_mib = vector.memory or machine["memory_mib"]
                if wanted_mib > machine["memory_mib"]:
                    raise InvalidInput(
                        f"instance {instance_id} booted with {machine['memory_mib']} MiB; the "
                        f"balloon cannot give it {wanted_mib} MiB: stop and start it to grow"
                    )
                wanted_vcpus = vcpus_of(vector.vcpus)
                if wanted_vcpus > machine["max_vcpus"]:
                    raise InvalidInput(
                        f"instance {instance_id} can hotplug up to {machine['max_vcpus']} vCPUs, "
                        f"not {wanted_vcpus}: stop and start it (or raise max_vcpus)"
                    )
                async with self._qmp(instance_id) as q:
                    await q.run("balloon", {"value": wanted_mib * MIB})
                    machine["hotplugged"] = await _set_vcpus(q, machine, wanted_vcpus)
            record["spec"]["resources"] = vector.model_dump()
            await self._save(instance_id, record)
        return await self._report(instance_id, record)

    async def stats(self, instance_id: str) -> dict[str, float]:
        record = await self._require_async(instance_id)
        return await self._usage(instance_id, record)

    async def list(self) -> list[InstanceReport]:
        records = await asyncio.to_thread(self._load_all)
        return [await self._report(i, r) for i, r in sorted(records.items())]

    async def close(self) -> None:
        """Nothing to release: VMs outlive the agent on purpose."""

    # -- beyond the protocol: guest, snapshots, migration, disk diffs --------------------

    async def guest_exec(self, instance_id: str, command: str, timeout: float = 30.0) -> str:
        """Run one line of shell in the guest over its control channel; its output.
        DriverError if it exits non-zero (or the guest has no control channel)."""
        self._require(instance_id)
        code, output = await guest_exec(
            self.layout.ctl_socket(instance_id), command, timeout=timeout
        )
        if code != 0:
            raise DriverError(f"`{command}` in {instance_id} exited {code}: {output[-2000:]}")
        return output

    def describe(self, instance_id: str) -> dict[str, Any]:
        """The running machine (memory, vCPUs, hot-plugged CPUs, CPU model, guest address):
        what a restore or migration target must be started with."""
        record = self._require(instance_id)
        if not record.get("machine"):
            raise DriverError(f"instance {instance_id} has not run yet: nothing to describe")
        return dict(record["machine"])

    async def snapshot(self, instance_id: str, path: Path, *, keep_running: bool = True) -> dict:
        """Save the running VM's state (RAM + devices) to `path` (QMP `migrate` to
        `exec:cat > path`) and its machine description to `path`.json. The VM pauses for
        the final copy only; with keep_running=False it is stopped afterwards (its disk
        overlay stays). Answers seconds, bytes, downtime_ms, total_ms."""
        path = Path(path)
        async with self._lock(instance_id):
            record = await self._require_async(instance_id)
            if self._pid(instance_id) is None:
                raise DriverError(f"instance {instance_id} is not running: nothing to snapshot")
            started = time.monotonic()
            async with self._qmp(instance_id) as q:
                info = await _migrate(q, self.clock, f"exec:cat > {shlex.quote(str(path))}")
                if keep_running:
                    await q.run("cont")
                else:
                    await q.quit()
            seconds = time.monotonic() - started
            _write_json(_sidecar(path), record["machine"])
            if not keep_running:
                await process.wait_exit(
                    self.layout.pid_file(instance_id),
                    self.layout.qmp_socket(instance_id),
                    self.clock,
                    10.0,
                )
                record.update(phase="stopped", started_at=None)
                await self._save(instance_id, record)
        return {
            "seconds": seconds,
            "bytes": path.stat().st_size,
            "downtime_ms": float(info.get("downtime", 0)),
            "total_ms": float(info.get("total-time", 0)),
        }

    async def restore(self, spec: InstanceSpec, path: Path) -> InstanceReport:
        """Start `spec` (created here if needed, not running) from a snapshot file: QEMU
        with `-incoming "exec:cat path"`, then `cont`. The guest carries on where it was;
        its disk is this instance's overlay (carry disk changes with disk_diff)."""
        path = Path(path)
        if not path.is_file():
            raise InvalidInput(f"no snapshot at {path}")
        await self.create(spec)
        async with self._lock(spec.id):
            record = await self._require_async(spec.id)
            if self._pid(spec.id) is not None:
                raise DriverError(f"instance {spec.id} is running: stop it before a restore")
            saved = json.loads(_sidecar(path).read_text()) if _sidecar(path).exists() else None
            machine = self._incoming_machine(record, saved)
            await self._launch(
                spec.id, record, machine, incoming=f"exec:cat {shlex.quote(str(path))}"
            )
            async with self._qmp(spec.id) as q:
                await q.wait_status(self.clock, {"completed"}, self.boot_timeout, "restore")
                await q.run("cont")
            await self._running(spec.id, record, machine)
        return await self._report(spec.id, record)

    async def migrate_incoming(
        self, spec: InstanceSpec, port: int, machine: dict[str, Any] | None = None
    ) -> InstanceReport:
        """Create `spec` here and start a QEMU waiting for its state on
        tcp:<migration_address>:port. `machine` is the source's describe(); the guest
        runs on its own once migrate_out completes; wait_incoming() confirms it."""
        await self.create(spec)
        async with self._lock(spec.id):
            record = await self._require_async(spec.id)
            if self._pid(spec.id) is None:
                target = self._incoming_machine(record, machine)
                uri = f"tcp:{self.migration_address}:{int(port)}"
                await self._launch(spec.id, record, target, incoming=uri)
                async with self._qmp(spec.id) as q:
                    await _tune_migration(q, block=True)
                record.update(phase="incoming", machine=target)
                await self._save(spec.id, record)
        return await self._report(spec.id, record)

    async def wait_incoming(self, instance_id: str, timeout: float = 120.0) -> InstanceReport:
        """Wait until an incoming migration has landed and the guest runs here."""
        async with self._lock(instance_id):
            record = await self._require_async(instance_id)
            deadline = self.clock.monotonic() + timeout
            async with self._qmp(instance_id) as q:
                while (await q.run("query-status"))["status"] != "running":
                    info = await q.run("query-migrate")
                    if info.get("status") == "failed" or self._pid(instance_id) is None:
                        raise DriverError(f"incoming migration of {instance_id} failed: {info}")
                    if self.clock.monotonic() > deadline:
                        raise DriverError(
                            f"incoming migration of {instance_id} took > {timeout:g} s"
                        )
                    await self.clock.sleep(qmp.POLL_SECONDS)
            await self._running(instance_id, record, record["machine"])
        return await self._report(instance_id, record)

    async def migrate_out(self, instance_id: str, uri: str) -> dict:
        """Live-migrate to a target started by migrate_incoming (`uri` = tcp:HOST:PORT):
        RAM plus the disk overlay (incremental block migration). The source QEMU quits
        once the target has it. Answers total_ms, downtime_ms, seconds."""
        async with self._lock(instance_id):
            record = await self._require_async(instance_id)
            if self._pid(instance_id) is None:
                raise DriverError(f"instance {instance_id} is not running: nothing to migrate")
            started = time.monotonic()
            async with self._qmp(instance_id) as q:
                await _tune_migration(q, block=True)
                info = await _migrate(q, self.clock, uri)
                await q.quit()
            seconds = time.monotonic() - started
            await process.wait_exit(
                self.layout.pid_file(instance_id),
                self.layout.qmp_socket(instance_id),
                self.clock,
                10,
            )
            record.update(phase="migrated", started_at=None)
            await self._save(instance_id, record)
        return {
            "seconds": seconds,
            "total_ms": float(info.get("total-time", 0)),
            "downtime_ms": float(info.get("downtime", 0)),
            "bytes": float(info.get("ram", {}).get("transferred", 0)),
        }

    async def checkpoint_disk(self, instance_id: str) -> dict:
        """Start tracking writes to the disk from now (a dirty bitmap; restarted if one
        exists). Lives as long as this QEMU process."""
        async with self._lock(instance_id), self._qmp(instance_id) as q:
            with contextlib.suppress(DriverError):
                await q.run("block-dirty-bitmap-remove", {"node": "disk0-fmt", "name": BITMAP})
            await q.run("block-dirty-bitmap-add", {"node": "disk0-fmt", "name": BITMAP})
        return {"bitmap": BITMAP}

    async def disk_diff(self, instance_id: str, path: Path) -> dict:
        """Write the blocks changed since checkpoint_disk (or the previous diff) to `path`,
        a qcow2 holding only those clusters; the bitmap restarts from now. Answers
        bytes (the file), dirty_bytes, extents [(offset, length)] and seconds."""
        path = Path(path)
        async with self._lock(instance_id), self._qmp(instance_id) as q:
            started = time.monotonic()
            blocks = await q.run("query-block")
            disk = next((b for b in blocks if b.get("device") == "disk0"), None)
            if disk is None:
                raise DriverError(f"instance {instance_id} has no disk0")
            bitmaps = disk.get("inserted", {}).get("dirty-bitmaps") or disk.get("dirty-bitmaps", [])
            mine = next((b for b in bitmaps if b.get("name") == BITMAP), None)
            if mine is None:
                raise DriverError(
                    f"no disk checkpoint on {instance_id}: call checkpoint_disk first"
                )
            await disks.create_empty(path, int(disk["inserted"]["image"]["virtual-size"]))
            job = f"fv-diff-{instance_id}"[:64]
            await q.run(
                "drive-backup",
                {
                    "job-id": job,
                    "device": "disk0",
                    "target": str(path),
                    "format": "qcow2",
                    "mode": "existing",
                    "sync": "incremental",
                    "bitmap": BITMAP,
                    "auto-dismiss": False,
                },
            )
            await q.wait_job(self.clock, job, 300.0)
            seconds = time.monotonic() - started
        return {
            "bytes": path.stat().st_size,
            "dirty_bytes": int(mine.get("count", 0)),
            "extents": await disks.allocated_extents(path),
            "seconds": seconds,
        }

    # -- steps ---------------------------------------------------------------------------

    def _boot_machine(self, record: dict[str, Any]) -> dict[str, Any]:
        """A fresh boot: the spec's size; the hot-plugged CPUs of a previous run are gone."""
        resources = record["spec"]["resources"]
        vcpus = vcpus_of(int(resources["vcpus"]))
        return {
            "memory_mib": max(64, int(resources["memory"]) or 256),
            "vcpus": vcpus,
            "max_vcpus": max(vcpus, self.max_vcpus),
            "hotplugged": [],
            "cpu_model": self.cpu_model,
            "address": self._cidr(record),
            "gateway": str(self.addresses.gateway) if record.get("address") else None,
        }

    def _incoming_machine(
        self, record: dict[str, Any], saved: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The machine a restore or migration target starts: the source's, when known."""
        machine = self._boot_machine(record)
        if saved:
            machine.update({k: saved[k] for k in machine if k in saved})
        return machine

    def _cidr(self, record: dict[str, Any]) -> str | None:
        address = record.get("address")
        return f"{address}/{self.subnet.prefixlen}" if address else None

    async def _launch(
        self,
        instance_id: str,
        record: dict[str, Any],
        machine: dict[str, Any],
        *,
        incoming: str | None = None,
    ) -> int:
        """Start QEMU daemonized; answers the console offset this run's output starts at."""
        layout = self.layout
        tap = mac = None
        if "lease_index" in record:
            index = int(record["lease_index"])
            tap, mac = layout.tap(index), mac_for(layout.agent_id, index)
            async with self._network_lock:
                await attach_tap(self.network, tap)
        spec = record["spec"]
        config = MachineConfig(
            name=spec["name"],
            kernel=Path(record["image"]["kernel"]),
            initramfs=Path(record["image"]["initramfs"]),
            disk=layout.disk(instance_id),
            console=layout.console(instance_id),
            qmp_socket=layout.qmp_socket(instance_id),
            ctl_socket=layout.ctl_socket(instance_id),
            pid_file=layout.pid_file(instance_id),
            memory_mib=machine["memory_mib"],
            vcpus=machine["vcpus"],
            max_vcpus=machine["max_vcpus"],
            accel=self.accel,
            cpu_model=machine["cpu_model"],
            command=tuple(spec.get("command") or ()),
            env=tuple(sorted((spec.get("env") or {}).items())),
            extra_cmdline=record["image"].get("cmdline", ""),
            tap=tap,
            mac=mac,
            address=machine.get("address"),
            gateway=machine.get("gateway"),
        )
        for image_file in (config.kernel, config.initramfs, config.disk):
            if not image_file.exists():
                raise DriverError(f"{image_file} of {instance_id} is missing: create it again")
        try:
            argv = qemu_argv(config, qemu=self.qemu)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        argv += _hotplugged_args(machine)
        if incoming:
            argv += ["-incoming", incoming]
        layout.sockets_dir(instance_id).mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in (config.qmp_socket, config.ctl_socket, config.pid_file):
            stale.unlink(missing_ok=True)
        offset = config.console.stat().st_size if config.console.exists() else 0
        await process.launch(argv, layout.qemu_log(instance_id), timeout=60.0)
        self._cpu_baseline.pop(instance_id, None)
        return offset

    async def _running(
        self, instance_id: str, record: dict[str, Any], machine: dict[str, Any]
    ) -> None:
        """After a boot, restore or migration: balloon to the spec's memory, record it."""
        wanted = int(record["spec"]["resources"]["memory"]) or machine["memory_mib"]
        if wanted < machine["memory_mib"]:
            async with self._qmp(instance_id) as q:
                await q.run("balloon", {"value": wanted * MIB})
        record.update(phase="running", started_at=self.clock.now(), machine=machine)
        await self._save(instance_id, record)

    async def _shutdown(self, instance_id: str, grace: float) -> None:
        """Power-off request (control channel, then ACPI), `quit` after `grace`, SIGKILL
        if QEMU still lives. Idempotent."""
        layout = self.layout
        pid = self._pid(instance_id)
        if pid is None:
            return
        if grace > 0:
            async with guest_send(layout.ctl_socket(instance_id), "sync; poweroff -f"):
                with contextlib.suppress(DriverError):
                    async with self._qmp(instance_id, timeout=2.0) as q:
                        await q.run("system_powerdown")
                exited = await process.wait_exit(
                    layout.pid_file(instance_id), layout.qmp_socket(instance_id), self.clock, grace
                )
            if exited:
                return
        with contextlib.suppress(DriverError):
            async with self._qmp(instance_id, timeout=2.0) as q:
                await q.quit()
        if not await process.wait_exit(
            layout.pid_file(instance_id), layout.qmp_socket(instance_id), self.clock, 5.0
        ):
            process.kill(pid)
            await process.wait_exit(
                layout.pid_file(instance_id), layout.qmp_socket(instance_id), self.clock, 5.0
            )

    def _pid(self, instance_id: str) -> int | None:
        return process.running_pid(
            self.layout.pid_file(instance_id), self.layout.qmp_socket(instance_id)
        )

    def _lock(self, instance_id: str) -> asyncio.Lock:
        return self._locks.setdefault(instance_id, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def _qmp(self, instance_id: str, timeout: float = 10.0) -> AsyncIterator[qmp.Session]:
        async with qmp.session(
            self.layout.qmp_socket(instance_id), self.clock, timeout=timeout
        ) as q:
            yield q

    # -- reports -------------------------------------------------------------------------

    async def _report(self, instance_id: str, record: dict[str, Any]) -> InstanceReport:
        running = self._pid(instance_id) is not None and record["phase"] == "running"
        if running:
            state = "running"
        elif record["phase"] in ("created", "incoming"):
            state = "created"
        else:
            state = "stopped"
        spec = record["spec"]
        return InstanceReport(
            id=instance_id,
            name=spec["name"],
            state=state,
            resources=ResourceVector(**spec["resources"]),
            started_at=record.get("started_at") if running else None,
            address=record.get("address"),
            usage=await self._usage(instance_id, record),
        )

    async def _usage(self, instance_id: str, record: dict[str, Any]) -> dict[str, float]:
        usage = dict.fromkeys(
            (
                "cpu_millicores",
                "cpu_usage_seconds",
                "memory_mib",
                "memory_max_mib",
                "vcpus",
                "disk_read_bytes",
                "disk_write_bytes",
                "net_rx_bytes",
                "net_tx_bytes",
            ),
            0.0,
        )
        lease_index = record.get("lease_index")
        if lease_index is not None:
            rx, tx = counters(self.layout.tap(int(lease_index)))
            usage.update(net_rx_bytes=float(rx), net_tx_bytes=float(tx))
        pid = self._pid(instance_id)
        if pid is None or record["phase"] != "running" or self._lock(instance_id).locked():
            return usage
        cpu = process.cpu_seconds(pid)
        now = self.clock.monotonic()
        last = self._cpu_baseline.get(instance_id)
        if last is not None and now > last[0]:
            usage["cpu_millicores"] = max(0.0, (cpu - last[1]) / (now - last[0]) * 1000)
        if last is None or now - last[0] >= 1.0:
            self._cpu_baseline[instance_id] = (now, cpu)
        usage["cpu_usage_seconds"] = cpu
        usage["memory_max_mib"] = float((record.get("machine") or {}).get("memory_mib", 0))
        with contextlib.suppress(DriverError):
            async with self._lock(instance_id), self._qmp(instance_id, timeout=2.0) as q:
                balloon = await q.run("query-balloon")
                usage["memory_mib"] = balloon["actual"] / MIB
                usage["vcpus"] = float(len(await q.run("query-cpus-fast")))
                for device in await q.run("query-blockstats"):
                    if device.get("device") == "disk0":
                        usage["disk_read_bytes"] = float(device["stats"]["rd_bytes"])
                        usage["disk_write_bytes"] = float(device["stats"]["wr_bytes"])
        return usage

    # -- records -------------------------------------------------------------------------

    def _read_record(self, instance_id: str) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads(self.layout.record(instance_id).read_text())
        except FileNotFoundError:
            return None
        return record

    async def _load(self, instance_id: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._read_record, instance_id)

    def _require(self, instance_id: str) -> dict[str, Any]:
        record = self._read_record(instance_id) if INSTANCE_ID.match(instance_id) else None
        if record is None or not record.get("ready"):
            raise UnknownInstance(instance_id)
        return record

    async def _require_async(self, instance_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._require, instance_id)

    def _load_all(self) -> dict[str, dict[str, Any]]:
        records = {}
        for directory in self.layout.instances_dir.iterdir():
            record = self._read_record(directory.name)
            if record is not None and record.get("ready"):
                records[directory.name] = record
        return records

    async def _save(self, instance_id: str, record: dict[str, Any]) -> None:
        await asyncio.to_thread(_write_json, self.layout.record(instance_id), record)


# -- helpers -------------------------------------------------------------------------------


async def _tune_migration(q: qmp.Session, *, block: bool) -> None:
    """Full bandwidth (QEMU's default is 32 MiB/s); with `block`, the disk overlay travels
    too, only what it holds over the shared base (incremental)."""
    await q.run(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "block", "state": block}]},
    )
    params: dict[str, object] = {"max-bandwidth": MIGRATION_BANDWIDTH}
    if block:
        params["block-incremental"] = True
    await q.run("migrate-set-parameters", params)


async def _migrate(q: qmp.Session, clock: Clock, uri: str) -> dict[str, Any]:
    """`migrate` to `uri`, waiting for completion; answers the final query-migrate."""
    await q.run("migrate-set-parameters", {"max-bandwidth": MIGRATION_BANDWIDTH})
    await q.run("migrate", {"uri": uri})
    return await q.wait_status(clock, {"completed"}, 600.0, f"migration to {uri}")


async def _set_vcpus(q: qmp.Session, machine: dict[str, Any], wanted: int) -> list[dict[str, Any]]:
    """Hot-plug (or unplug, newest first) CPUs until `wanted` are present; answers the
    hot-plugged set. Unplug needs the guest's cooperation (ACPI eject)."""
    hotplugged: list[dict[str, Any]] = list(machine.get("hotplugged") or [])
    present = machine["vcpus"] + len(hotplugged)
    if wanted > present:
        slots = await q.run("query-hotpluggable-cpus")
        free = [s for s in reversed(slots) if "qom-path" not in s]
        for slot in free[: wanted - present]:
            props = dict(slot["props"])
            cpu = {"driver": slot["type"], "id": "cpu" + "-".join(map(str, props.values()))}
            await q.run("device_add", {**cpu, **props})
            hotplugged.append({**cpu, **props})
    while wanted < machine["vcpus"] + len(hotplugged) and hotplugged:
        cpu = hotplugged.pop()
        await q.run("device_del", {"id": cpu["id"]})
    return hotplugged


def _hotplugged_args(machine: dict[str, Any]) -> list[str]:
    """-device lines recreating hot-plugged CPUs on a restore or migration target."""
    args: list[str] = []
    for cpu in machine.get("hotplugged") or []:
        options = ",".join(f"{k}={v}" for k, v in cpu.items() if k != "driver")
        args += ["-device", f"{cpu['driver']},{options}"]
    return args


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _number(options: dict[str, str], key: str, default: str, kind: type) -> Any:
    text = options.get(key, default)
    try:
        value = kind(text)
    except ValueError:
        raise InvalidInput(f"qemu driver option {key}={text!r} is not a number") from None
    if value < 0:
        raise InvalidInput(f"qemu driver option {key}={text!r} must not be negative")
    return value


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _mem_total_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = "unknown", list[str]()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = value.split()
    return model, flags


__all__ = ["HostCacheImages", "QemuDriver", "StoreImages", "VmImages"]


def _remove_sockets(layout: Layout, instance_id: str) -> None:
    """The instance's socket dir, and the agent's when it was the last one."""
    shutil.rmtree(layout.sockets_dir(instance_id), ignore_errors=True)
    with contextlib.suppress(OSError):
        layout.sockets_dir(instance_id).parent.rmdir()
        layout.run_dir.rmdir()
