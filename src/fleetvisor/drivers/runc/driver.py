"""RuncDriver: an instance is an OCI runtime bundle run by runc, on overlayfs, in its own
network namespace on the agent's bridge, limited by cgroup v1.

Lifecycle (each call idempotent; see README.md for the diagram):
  create   layers + image config from the RootfsProvider, overlay mount, address,
           netns + veth, config.json. Runs nothing.
  start    `runc run --detach`: the container outlives the agent process.
  stop     SIGTERM, grace period on the clock, SIGKILL, `runc delete`. Keeps the upper
           dir, netns and address, so a later start resumes with the same data and IP.
  destroy  stop, `runc delete --force`, unmount, netns/veth/address, cgroups, files.

Checkpoint / restore (CRIU >= 4.1, see criu.py): `checkpoint` dumps the running container
into an images dir and leaves it like `stop` does (upper dir, netns, address kept);
`export_state` tars the upper dir; `restore` brings it back from the images, here
(rollback) or in another driver that first unpacks the upper tar (migration).

State lives in `<state_dir>/runc-driver/`: one directory per instance (the bundle, the
overlay dirs, instance.json, container.log) and runc's own root. A restarted agent
rebuilds its reports from those files and `runc list`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, TypeVar

from fleetvisor.clock import Clock
from fleetvisor.drivers.base import Capability, RootfsProvider, UnknownInstance
from fleetvisor.drivers.runc import bundle, commands, overlay
from fleetvisor.drivers.runc import criu as criu_tools
from fleetvisor.drivers.runc.cgroups import Cgroup
from fleetvisor.drivers.runc.layout import (
    INSTANCE_ID,
    Layout,
    check_agent_id,
    check_instance_id,
    default_agent_id,
)
from fleetvisor.drivers.runc.network import (
    AddressPool,
    BridgeNetwork,
    counters,
    default_subnet,
    link_exists,
    netns_exists,
    parse_subnet,
)
from fleetvisor.drivers.runc.prereqs import check_prerequisites
from fleetvisor.drivers.runc.usage import UsageSampler
from fleetvisor.errors import DriverError, InvalidInput
from fleetvisor.model.resources import Resources, parse_capacity, parse_size_mib
from fleetvisor.model.specs import HostInfo, InstanceReport, InstanceSpec, ResourceVector

N = TypeVar("N", int, float)
STATE_SUBDIR = "runc-driver"
POLL_SECONDS = 0.05
KILL_WAIT_SECONDS = 10.0
LOG_TAIL_BYTES = 4000
CHECKPOINT_TIMEOUT = 300.0  # at least: a dump or restore writes/reads all of the memory
EXEC_OUTPUT_LIMIT = 64 * 1024
EXEC_TIMED_OUT = 124  # exec's exit code when it outlived its timeout (as timeout(1))
RUNNING = ("running", "paused")
OPTIONS = {
    "agent_id": "1-6 lowercase letters/digits in every name this agent creates",
    "subnet": "the instances' /24 inside 198.18.0.0/15",
    "net_mbps": "network capacity to report, Mbit/s",
    "memory_reserve": "memory kept for the host, e.g. 1G",
    "stop_grace": "seconds between SIGTERM and SIGKILL on stop",
    "pids_limit": "maximum processes per instance",
    "runc": "the runc binary",
    "capacity": "report less than the machine, e.g. cpu=2,memory=4G (missing keys: measured)",
}


class RuncDriver:
    kind = "runc"

    def __init__(
        self,
        *,
        clock: Clock,
        state_dir: Path,
        rootfs: RootfsProvider,
        agent_id: str | None = None,
        subnet: str | None = None,
        net_mbps: int = 10_000,
        memory_reserve_mib: int = 1024,
        stop_grace_seconds: float = 10.0,
        pids_limit: int = 4096,
        runc: str = "runc",
        command_timeout: float = commands.DEFAULT_TIMEOUT,
        capacity_limit: dict[str, int] | None = None,
        check_host: bool = True,
    ) -> None:
        """`state_dir` is the agent's; the driver keeps its files in `state_dir/runc-driver`.
        `agent_id` defaults to a hash of that path (stable across restarts).
        `capacity_limit` replaces measured capacity dimensions (vcpus, memory, disk, net),
        for several agents sharing one machine."""
        if check_host:
            check_prerequisites(runc)
        driver_dir = state_dir / STATE_SUBDIR
        self.clock = clock
        self.rootfs = rootfs
        self.layout = Layout(driver_dir, check_agent_id(agent_id or default_agent_id(driver_dir)))
        self.subnet = parse_subnet(subnet) if subnet else default_subnet(self.layout.agent_id)
        self.net_mbps = net_mbps
        self.memory_reserve_mib = memory_reserve_mib
        self.stop_grace_seconds = stop_grace_seconds
        self.pids_limit = pids_limit
        self.runc = shutil.which(runc) or runc
        self.command_timeout = command_timeout
        self.capacity_limit = dict(capacity_limit or {})
        self.addresses = AddressPool(self.layout.network_state, self.subnet)
        self.network = BridgeNetwork(self.layout.bridge, self.subnet)
        self.sampler = UsageSampler()
        self._network_lock = asyncio.Lock()
        for directory in (self.layout.runc_root, self.layout.instances_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.addresses.count()  # fails now, not at the first instance, if the subnet changed

    @classmethod
    def from_options(
        cls, *, clock: Clock, state_dir: Path, options: dict[str, str], rootfs: RootfsProvider
    ) -> RuncDriver:
        """Build from the agent's `--driver-option key=value` pairs (see OPTIONS)."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidInput(
                f"unknown runc driver option(s) {unknown}; known: "
                + ", ".join(f"{k} ({v})" for k, v in OPTIONS.items())
            )
        return cls(
            clock=clock,
            state_dir=state_dir,
            rootfs=rootfs,
            agent_id=options.get("agent_id") or None,
            subnet=options.get("subnet") or None,
            net_mbps=_number(options, "net_mbps", "10000", int),
            memory_reserve_mib=parse_size_mib(
                options.get("memory_reserve", "1G"), what="memory_reserve"
            ),
            stop_grace_seconds=_number(options, "stop_grace", "10", float),
            pids_limit=_number(options, "pids_limit", "4096", int),
            runc=options.get("runc", "runc"),
            capacity_limit=parse_capacity_limit(options.get("capacity", "")),
        )

    # -- host ----------------------------------------------------------------------------

    def host_info(self) -> HostInfo:
        cpus = len(os.sched_getaffinity(0))
        disk = os.statvfs(self.layout.state_dir)
        model, flags = _cpuinfo()
        measured = {
            "vcpus": cpus * 1000,
            "memory": max(0, _mem_total_mib() - self.memory_reserve_mib),
            "disk": disk.f_blocks * disk.f_frsize // 1024**3,
            "net": self.net_mbps,
        }
        capacity = Resources(**{**measured, **self.capacity_limit})
        return HostInfo(
            capacity=ResourceVector.of(capacity),
            cpu_model=model,
            cpu_features=flags,
            driver=self.kind,
            capabilities=sorted(self.capabilities()),
        )

    def capabilities(self) -> set[Capability]:
        found = {Capability.RESIZE_LIVE, Capability.OCI_IMAGES}
        if checkpoint_missing() is None:
            found.add(Capability.CHECKPOINT)
        return found

    def log_path(self, instance_id: str) -> Path:
        """The file holding the instance's stdout and stderr (appended across starts)."""
        self._require(instance_id)
        return self.layout.log(instance_id)

    def address(self, instance_id: str) -> str:
        """The instance's IPv4 address on the agent's bridge (kept from create to destroy)."""
        self._require(instance_id)
        lease = self.addresses.get(instance_id)
        if lease is None:
            raise DriverError(f"instance {instance_id} has no address yet: create it again")
        return str(lease.address)

    # -- lifecycle -----------------------------------------------------------------------

    async def create(self, spec: InstanceSpec) -> InstanceReport:
        check_instance_id(spec.id)
        existing = await self._load(spec.id)
        if existing and existing.get("ready"):
            return await self._report(spec.id, existing, await self._container_state(spec.id))
        try:
            record = existing or {
                "spec": spec.model_dump(mode="json"),
                "phase": "created",
                "ready": False,
                "created_at": self.clock.now(),
                "started_at": None,
            }
            record["layers"] = [str(p) for p in await self.rootfs.layers(spec.image)]
            record["image_config"] = dict(await self.rootfs.config(spec.image))
            await self._save(spec.id, record)
            await self._prepare(spec.id, record)
            record["ready"] = True
            await self._save(spec.id, record)
        except Exception:
            with contextlib.suppress(Exception):
                await self.destroy(spec.id)
            raise
        return await self._report(spec.id, record, None)

    async def start(self, instance_id: str) -> InstanceReport:
        record = await self._require_async(instance_id)
        state = await self._container_state(instance_id)
        if state and state.get("status") in RUNNING:
            return await self._report(instance_id, record, state)
        if state:  # exited on its own, or a half-made container: clear it
            await self._runc("delete", "--force", self.layout.container_id(instance_id))
        if not await asyncio.to_thread(self._still_prepared, instance_id, record):
            await self._prepare(instance_id, record)
        await self._run_container(instance_id)
        self.sampler.forget(instance_id)
        record.update(phase="running", started_at=self.clock.now())
        await self._save(instance_id, record)
        return await self._report(instance_id, record, await self._started_state(instance_id))

    async def _started_state(self, instance_id: str) -> dict[str, Any] | None:
        """Right after `runc run --detach` succeeded, its pid file tells whether the
        container runs; that saves a `runc state` process on every launch."""
        try:
            pid = int(self.layout.pid_file(instance_id).read_text())
        except (OSError, ValueError):
            pid = 0
        if pid > 0 and _alive(pid):
            return {"status": "running", "pid": pid}
        return await self._container_state(instance_id)

    async def stop(self, instance_id: str) -> InstanceReport:
        record = await self._require_async(instance_id)
        await self._stop_container(instance_id)
        self.sampler.forget(instance_id)
        if record["phase"] == "running":
            record.update(phase="stopped", started_at=None)
            await self._save(instance_id, record)
        return await self._report(instance_id, record, None)

    async def destroy(self, instance_id: str) -> None:
        """Remove every trace of the instance; a missing instance is not an error."""
        if not INSTANCE_ID.match(instance_id):
            return  # no such id can have been created
        await self._stop_container(instance_id)
        rootfs = self.layout.rootfs(instance_id)
        await asyncio.to_thread(overlay.unmount, rootfs)
        async with self._network_lock:
            lease = self.addresses.get(instance_id)
            veth = self.layout.host_veth(lease.index) if lease else None
            await self.network.detach(self.layout.netns(instance_id), veth)
            self.addresses.release(instance_id)
            if self.addresses.count() == 0:
                await self.network.remove_bridge()
        await asyncio.to_thread(self._remove_cgroups, instance_id)
        await asyncio.to_thread(self._remove_files, instance_id)
        self.sampler.forget(instance_id)

    async def resize(self, instance_id: str, resources: Resources) -> InstanceReport:
        record = await self._require_async(instance_id)
        vector = ResourceVector.of(resources)
        cgroup = Cgroup(self.layout.cgroups_path(instance_id))
        state = await self._container_state(instance_id)
        if state and state.get("status") in RUNNING:
            await asyncio.to_thread(_apply_limits, cgroup, vector)
        record["spec"]["resources"] = vector.model_dump()
        await self._save(instance_id, record)
        config_path = self.layout.config(instance_id)
        if config_path.exists():
            config = json.loads(await asyncio.to_thread(config_path.read_text))
            await asyncio.to_thread(_write_json, config_path, bundle.with_resources(config, vector))
        return await self._report(instance_id, record, state)

    async def stats(self, instance_id: str) -> dict[str, float]:
        record = await self._require_async(instance_id)
        return await self._usage(instance_id, record)

    async def list(self) -> list[InstanceReport]:
        records = await asyncio.to_thread(self._load_all)
        states = await self._runc_list() if records else {}
        return [
            await self._report(i, r, states.get(self.layout.container_id(i)))
            for i, r in sorted(records.items())
        ]

    async def close(self) -> None:
        """Nothing to release: containers, mounts and links outlive the agent on purpose."""

    # -- checkpoint / restore / exec -----------------------------------------------------

    async def checkpoint(
        self,
        instance_id: str,
        images_dir: Path,
        *,
        leave_running: bool = False,
        page_server: str | None = None,
    ) -> dict[str, Any]:
        """Dump the running instance's processes into `images_dir` (`runc checkpoint`
        with CRIU; created if missing, must hold no earlier dump).

        Afterwards the instance is stopped, as by `stop`: no process, no cgroups, but its
        upper dir, overlay mount, netns and address are kept, so `restore` here (rollback)
        or `export_state` + `restore` elsewhere (migration) can follow. With
        `leave_running` it keeps running (a copy, e.g. for a backup).
        With `page_server` ("ADDRESS:PORT" of a `criu page-server`, see
        `criu.page_server_argv`) the memory pages go there, not into `images_dir`.
        Returns {"dump_s", "image_bytes", "images_dir"}."""
        record = await self._require_async(instance_id)
        tool = _require_criu()
        state = await self._container_state(instance_id)
        images_dir = Path(images_dir)
        work = self.layout.instance_dir(instance_id) / "criu-dump"
        running = bool(state and state.get("status") == "running")
        if not running and not leave_running and _dump_finished(work, images_dir):
            # Dumped by an earlier call whose caller died before it heard (an agent
            # restart mid-migration): the dump stands, the process is gone.
            record.update(phase="stopped", started_at=None)
            await self._save(instance_id, record)
            return {
                "dump_s": 0.0,
                "image_bytes": await asyncio.to_thread(_tree_bytes, images_dir),
                "images_dir": str(images_dir),
                "resumed": True,
            }
        if state is None or not running:
            status = state.get("status") if state else "not running"
            raise DriverError(f"instance {instance_id} cannot be checkpointed: it is {status}")
        await asyncio.to_thread(_empty_dir, images_dir, "checkpoint into")
        await asyncio.to_thread(_fresh_dir, work)
        stdio = await asyncio.to_thread(criu_tools.external_stdio, int(state.get("pid") or 0))
        await asyncio.to_thread(criu_tools.write_stdio_keys, images_dir, stdio)
        config = self._criu_config(instance_id)
        await asyncio.to_thread(criu_tools.write_config, config, criu_tools.dump_options(stdio))
        argv = criu_tools.runc_checkpoint_argv(
            runc=self.runc,
            root=self.layout.runc_root,
            criu=tool.path,
            container=self.layout.container_id(instance_id),
            images_dir=images_dir,
            work_dir=work,
            leave_running=leave_running,
            page_server=page_server,
        )
        began = time.monotonic()
        try:
            result = await _run_with_env(
                argv, criu_tools.config_env(config), self._checkpoint_timeout()
            )
        finally:
            await asyncio.to_thread(_unlink, config)
        dump_s = time.monotonic() - began
        if result.returncode != 0:
            raise _criu_failure(argv, result, work / "dump.log")
        if not leave_running:
            # CRIU killed it: reap it if this process inherited it (as a subreaper)
            criu_tools.reap_child(int(state.get("pid") or 0))
            # runc removed the container (and its cgroups) after the dump; clear anything
            # left, e.g. a container that was stopped instead of removed
            if await self._container_state(instance_id) is not None:
                await self._runc("delete", "--force", self.layout.container_id(instance_id))
            self.sampler.forget(instance_id)
            record.update(phase="stopped", started_at=None)
            await self._save(instance_id, record)
        return {
            "dump_s": dump_s,
            "image_bytes": await asyncio.to_thread(_tree_bytes, images_dir),
            "images_dir": str(images_dir),
        }

    async def export_state(self, instance_id: str, dest: Path) -> None:
        """Write the instance's writable layer (the overlay upper dir) to tar file `dest`,
        with owners, modes, xattrs (`trusted.overlay.*`) and whiteouts (0/0 char devices)
        as overlayfs made them: what `restore` on another driver needs besides the CRIU
        images (layers come from that host's own RootfsProvider, the spec from the caller).
        Take it while the instance is stopped (after `checkpoint`), else files may change
        while they are read."""
        await self._require_async(instance_id)
        upper = self.layout.upper(instance_id)
        await asyncio.to_thread(upper.mkdir, parents=True, exist_ok=True)
        dest = Path(dest)
        argv = ["tar", *_TAR_OPTIONS, "-C", str(upper), "-cf", str(dest), "."]
        await commands.run(argv, timeout=self._checkpoint_timeout())

    async def import_state(self, instance_id: str, upper_tar: Path) -> None:
        """Replace the writable layer of the (not running) instance with tar `upper_tar`
        from `export_state`: unmount, swap the upper dir, mount again. For a migration's
        target after `create`, before `restore` (live) or `start` (cold)."""
        record = await self._require_async(instance_id)
        state = await self._container_state(instance_id)
        if state and state.get("status") in RUNNING:
            raise DriverError(f"instance {instance_id} is running: its files cannot be replaced")
        if state:
            await self._runc("delete", "--force", self.layout.container_id(instance_id))
        await asyncio.to_thread(overlay.unmount, self.layout.rootfs(instance_id))
        await self._unpack_upper(instance_id, Path(upper_tar))
        await self._prepare(instance_id, record)
        await self._save(instance_id, record)

    async def spec_of(self, instance_id: str) -> InstanceSpec:
        """The instance's spec as this driver has it (resources as last resized)."""
        record = await self._require_async(instance_id)
        return InstanceSpec(**record["spec"])

    async def restore(
        self, spec: InstanceSpec, images_dir: Path, upper_tar: Path | None = None
    ) -> InstanceReport:
        """Bring back a checkpointed instance from `images_dir` (`runc restore`): its
        processes continue where `checkpoint` dumped them, memory included.

        A new instance (migration) is created as by `create`, except that `upper_tar`
        (from `export_state`) is unpacked into its upper dir before the overlay is
        mounted. It gets this driver's network: an address of this agent's subnet, so
        possibly not the one it had (open TCP connections are not kept).
        An instance this driver already has (rollback after a dump here, or one made by
        `create` for the migration) is restored in its own bundle; a given `upper_tar`
        then replaces its upper dir first (as `import_state`). DriverError if it runs.
        A failed restore of an instance it made removes that instance again."""
        check_instance_id(spec.id)
        tool = _require_criu()
        instance_id = spec.id
        images_dir = Path(images_dir)
        if not (images_dir / "inventory.img").is_file():
            raise InvalidInput(f"{images_dir} holds no CRIU checkpoint (no inventory.img)")
        existing = await self._load(instance_id)
        if existing and existing.get("ready"):
            record = existing
            state = await self._container_state(instance_id)
            if state and state.get("status") in RUNNING:
                raise DriverError(
                    f"instance {instance_id} is running: stop it (or checkpoint it) first"
                )
            if state:
                await self._runc("delete", "--force", self.layout.container_id(instance_id))
            if upper_tar is not None:
                await asyncio.to_thread(overlay.unmount, self.layout.rootfs(instance_id))
                await self._unpack_upper(instance_id, Path(upper_tar))
            if not await asyncio.to_thread(self._still_prepared, instance_id, record):
                await self._prepare(instance_id, record)
                await self._save(instance_id, record)
            made_here = False
        else:
            record = await self._create_for_restore(spec, existing, upper_tar)
            made_here = True
        began = time.monotonic()
        try:
            await self._restore_container(instance_id, tool, images_dir)
        except Exception:
            if made_here:  # as a failed create: leave nothing behind
                with contextlib.suppress(Exception):
                    await self.destroy(instance_id)
            raise
        self.sampler.forget(instance_id)
        record.update(phase="running", started_at=self.clock.now())
        record["restored"] = {"from": str(images_dir), "restore_s": time.monotonic() - began}
        await self._save(instance_id, record)
        return await self._report(instance_id, record, await self._started_state(instance_id))

    async def exec(
        self, instance_id: str, argv: builtins.list[str], timeout: float
    ) -> tuple[int, str]:
        """Run `argv` in the running instance (`runc exec`: its namespaces, cgroups, user,
        env and cwd). Returns its exit code and its stdout + stderr interleaved, at most
        64 KiB (the rest is read and dropped). After `timeout` seconds it is sent SIGTERM,
        then SIGKILL, and the result is exit code 124 with a note appended."""
        await self._require_async(instance_id)
        if not argv:
            raise InvalidInput("exec needs a command")
        state = await self._container_state(instance_id)
        if not (state and state.get("status") == "running"):
            raise DriverError(f"instance {instance_id} is not running: nothing to exec in")
        command = [
            self.runc,
            "--root",
            str(self.layout.runc_root),
            "exec",
            self.layout.container_id(instance_id),
            *argv,
        ]
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            raise DriverError(f"cannot run `{commands.describe(command)}`: {exc}") from exc
        assert process.stdout is not None
        kept = bytearray()

        async def collect() -> None:
            assert process.stdout is not None
            while chunk := await process.stdout.read(65536):
                if len(kept) < EXEC_OUTPUT_LIMIT:
                    kept.extend(chunk[: EXEC_OUTPUT_LIMIT - len(kept)])
            await process.wait()

        try:
            await asyncio.wait_for(collect(), timeout)
        except TimeoutError:
            # runc exec forwards SIGTERM to the process it runs; SIGKILL only ends runc
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 2.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            text = kept.decode(errors="replace")
            return EXEC_TIMED_OUT, f"{text}\n[exec timed out after {timeout:g} s]"
        except asyncio.CancelledError:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            raise
        return process.returncode or 0, kept.decode(errors="replace")

    async def _create_for_restore(
        self, spec: InstanceSpec, existing: dict[str, Any] | None, upper_tar: Path | None
    ) -> dict[str, Any]:
        """`create`, with the upper dir filled from `upper_tar` before the overlay mounts."""
        instance_id = spec.id
        try:
            record = existing or {
                "spec": spec.model_dump(mode="json"),
                "phase": "created",
                "ready": False,
                "created_at": self.clock.now(),
                "started_at": None,
            }
            record["layers"] = [str(p) for p in await self.rootfs.layers(spec.image)]
            record["image_config"] = dict(await self.rootfs.config(spec.image))
            await self._save(instance_id, record)
            await asyncio.to_thread(overlay.unmount, self.layout.rootfs(instance_id))
            if upper_tar is not None:
                await self._unpack_upper(instance_id, Path(upper_tar))
            await self._prepare(instance_id, record)
            record.update(ready=True, phase="stopped")
            await self._save(instance_id, record)
        except Exception:
            with contextlib.suppress(Exception):
                await self.destroy(instance_id)
            raise
        return record

    async def _unpack_upper(self, instance_id: str, upper_tar: Path) -> None:
        """Replace the (unmounted) upper and work dirs with the contents of `upper_tar`."""
        upper = self.layout.upper(instance_id)
        work = self.layout.work(instance_id)
        if overlay.is_mounted(self.layout.rootfs(instance_id)):
            raise DriverError(f"{self.layout.rootfs(instance_id)} is mounted: not touching upper/")
        for directory in (upper, work):
            await asyncio.to_thread(shutil.rmtree, directory, True)
            await asyncio.to_thread(directory.mkdir, parents=True)
        argv = ["tar", *_TAR_OPTIONS, "-C", str(upper), "-xpf", str(upper_tar)]
        await commands.run(argv, timeout=self._checkpoint_timeout())

    async def _restore_container(
        self, instance_id: str, tool: criu_tools.CriuInfo, images_dir: Path
    ) -> None:
        """`runc restore --detach`, stdio like `runc run`: /dev/null in, the log out."""
        layout = self.layout
        work = layout.instance_dir(instance_id) / "criu-restore"
        await asyncio.to_thread(_fresh_dir, work)
        stdio = await asyncio.to_thread(criu_tools.read_stdio_keys, images_dir)
        config = self._criu_config(instance_id)
        await asyncio.to_thread(criu_tools.write_config, config, criu_tools.restore_options(stdio))
        argv = criu_tools.runc_restore_argv(
            runc=self.runc,
            root=layout.runc_root,
            criu=tool.path,
            container=layout.container_id(instance_id),
            images_dir=images_dir,
            work_dir=work,
            bundle=layout.instance_dir(instance_id),
            pid_file=layout.pid_file(instance_id),
        )
        log = os.open(layout.log(instance_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            offset = os.fstat(log).st_size
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=criu_tools.config_env(config),
            )
        finally:
            os.close(log)
        try:
            code = await asyncio.wait_for(process.wait(), self._checkpoint_timeout())
        except TimeoutError:
            process.kill()
            await process.wait()
            code = None
        finally:
            await asyncio.to_thread(_unlink, config)
        if code == 0:
            return
        tail = await asyncio.to_thread(_read_from, layout.log(instance_id), offset)
        with contextlib.suppress(DriverError):
            await self._runc("delete", "--force", layout.container_id(instance_id))
        what = "did not finish in time" if code is None else f"failed with exit code {code}"
        restore_log = await asyncio.to_thread(_tail, work / "restore.log")
        raise DriverError(
            f"runc could not restore instance {instance_id}: `{commands.describe(argv)}` "
            f"{what}: {tail.strip() or '(no output)'}"
            + (f"\nCRIU restore.log ends:\n{restore_log}" if restore_log else "")
        )

    def _checkpoint_timeout(self) -> float:
        return max(self.command_timeout, CHECKPOINT_TIMEOUT)

    # -- steps ---------------------------------------------------------------------------

    async def _prepare(self, instance_id: str, record: dict[str, Any]) -> None:
        """Mount the rootfs, wire the network, write config.json. Idempotent; also repairs
        what a host reboot removed (mounts, netns) before a start."""
        spec = InstanceSpec(**record["spec"])
        layers = [Path(p) for p in record["layers"]]
        if not all(layer.is_dir() for layer in layers):  # cache evicted: ask again
            layers = await self.rootfs.layers(spec.image)
            record["layers"] = [str(p) for p in layers]
        layout = self.layout
        await asyncio.to_thread(
            overlay.mount_overlay,
            layers,
            layout.upper(instance_id),
            layout.work(instance_id),
            layout.rootfs(instance_id),
        )
        async with self._network_lock:
            lease = self.addresses.allocate(instance_id)
            await self.network.attach(
                layout.netns(instance_id),
                lease,
                layout.host_veth(lease.index),
                layout.peer_veth(lease.index),
            )
        record["address"] = str(lease.address)
        await asyncio.to_thread(self._write_bundle, instance_id, spec, record, str(lease.address))
        record["prepared_boot"] = _boot_id()

    def _still_prepared(self, instance_id: str, record: dict[str, Any]) -> bool:
        """True when `_prepare` completed since the host booted and its mount, netns, veth
        and config.json are all still there (a start right after create): then a start
        skips it and its dozen `ip` commands."""
        layout = self.layout
        lease = self.addresses.get(instance_id)
        return (
            record.get("prepared_boot") == _boot_id()
            and lease is not None
            and layout.config(instance_id).exists()
            and all(Path(layer).is_dir() for layer in record["layers"])
            and netns_exists(layout.netns(instance_id))
            and link_exists(self.network.bridge)
            and link_exists(layout.host_veth(lease.index))
            and overlay.is_mounted(layout.rootfs(instance_id))
        )

    def _write_bundle(
        self, instance_id: str, spec: InstanceSpec, record: dict[str, Any], address: str
    ) -> None:
        layout = self.layout
        rootfs = layout.rootfs(instance_id)
        hostname = bundle.hostname_for(spec.name)
        hosts = layout.hosts_file(instance_id)
        hosts.write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost\n{address}\t{hostname}\n")
        config = bundle.runtime_config(
            spec,
            record.get("image_config") or {},
            netns_path=str(layout.netns_path(instance_id)),
            cgroups_path=layout.cgroups_path(instance_id),
            pids_limit=self.pids_limit,
            passwd=_read_inside(rootfs, "etc/passwd"),
            group=_read_inside(rootfs, "etc/group"),
            hosts_file=str(hosts),
        )
        _write_json(layout.config(instance_id), config)

    def _criu_config(self, instance_id: str) -> Path:
        return self.layout.instance_dir(instance_id) / "criu.conf"

    async def _run_container(self, instance_id: str) -> None:
        """`runc run --detach`, stdio: /dev/null in, the instance's log file out."""
        layout = self.layout
        container = layout.container_id(instance_id)
        args = [
            self.runc,
            "--root",
            str(layout.runc_root),
            "run",
            "--detach",
            "--pid-file",
            str(layout.pid_file(instance_id)),
            "--bundle",
            str(layout.instance_dir(instance_id)),
            container,
        ]
        log = os.open(layout.log(instance_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            offset = os.fstat(log).st_size
            # The container inherits these descriptors: never pipes, which would keep
            # this call waiting for as long as the container runs.
            process = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
            )
        finally:
            os.close(log)
        try:
            code = await asyncio.wait_for(process.wait(), self.command_timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            code = None
        if code == 0:
            return
        tail = await asyncio.to_thread(_read_from, layout.log(instance_id), offset)
        with contextlib.suppress(DriverError):
            await self._runc("delete", "--force", container)
        what = "did not finish in time" if code is None else f"failed with exit code {code}"
        raise DriverError(
            f"runc could not start instance {instance_id}: `{commands.describe(args)}` {what}: "
            f"{tail.strip() or '(no output)'}"
        )

    async def _stop_container(self, instance_id: str) -> None:
        """SIGTERM, wait up to the grace period, SIGKILL, then `runc delete`. Idempotent."""
        container = self.layout.container_id(instance_id)
        state = await self._container_state(instance_id)
        if state is None:
            return
        pid = int(state.get("pid") or 0)
        if state.get("status") in RUNNING and _alive(pid):
            await self._runc("kill", container, "TERM", check=False)
            if not await self._wait_exit(pid, self.stop_grace_seconds):
                await self._runc("kill", container, "KILL", check=False)
                if not await self._wait_exit(pid, KILL_WAIT_SECONDS):
                    raise DriverError(
                        f"instance {instance_id} (pid {pid}) survived SIGKILL for "
                        f"{KILL_WAIT_SECONDS:g} s; check the host for processes stuck in D state"
                    )
        await self._runc("delete", "--force", container)

    async def _wait_exit(self, pid: int, seconds: float) -> bool:
        deadline = self.clock.monotonic() + seconds
        while _alive(pid) or criu_tools.reap_child(pid):
            if self.clock.monotonic() >= deadline:
                return False
            await self.clock.sleep(POLL_SECONDS)
        return True

    # -- runc ----------------------------------------------------------------------------

    async def _runc(self, *args: str, check: bool = True) -> commands.CommandResult:
        command = [self.runc, "--root", str(self.layout.runc_root), *args]
        return await commands.run(command, timeout=self.command_timeout, check=check)

    async def _container_state(self, instance_id: str) -> dict[str, Any] | None:
        """`runc state` of the instance's container, or None when runc has none."""
        container = self.layout.container_id(instance_id)
        if not (self.layout.runc_root / container).exists():
            return None
        result = await self._runc("state", container, check=False)
        if result.returncode != 0:
            if (
                "does not exist" in result.stderr
                or not (self.layout.runc_root / container).exists()
            ):
                return None
            raise commands.failure(["runc", "state", container], result.returncode, result.stderr)
        state: dict[str, Any] = json.loads(result.stdout)
        return state

    async def _runc_list(self) -> dict[str, dict[str, Any]]:
        result = await self._runc("list", "--format", "json")
        entries = json.loads(result.stdout or "null") or []
        return {entry["id"]: entry for entry in entries}

    # -- reports -------------------------------------------------------------------------

    async def _report(
        self, instance_id: str, record: dict[str, Any], state: dict[str, Any] | None
    ) -> InstanceReport:
        """The instance as runc sees it (`state`: its runc state, None when it has none)."""
        running = bool(state and state.get("status") in RUNNING)
        if running:
            status = "running"
        elif record["phase"] == "created" or not record.get("ready"):
            status = "created"
        else:
            status = "stopped"
        spec = record["spec"]
        return InstanceReport(
            id=instance_id,
            name=spec["name"],
            state=status,
            resources=ResourceVector(**spec["resources"]),
            started_at=record.get("started_at") if running else None,
            address=record.get("address"),
            usage=await self._usage(instance_id, record),
        )

    async def _usage(self, instance_id: str, record: dict[str, Any]) -> dict[str, float]:
        cgroup = Cgroup(self.layout.cgroups_path(instance_id))
        stats = await asyncio.to_thread(cgroup.stats)
        lease = self.addresses.get(instance_id)
        rx, tx = counters(self.layout.host_veth(lease.index)) if lease else (0, 0)
        started = record.get("started_at")
        uptime = self.clock.now() - started if started else None
        return self.sampler.usage(instance_id, self.clock.monotonic(), stats, rx, tx, uptime)

    # -- records -------------------------------------------------------------------------

    def _read_record(self, instance_id: str) -> dict[str, Any] | None:
        path = self.layout.record(instance_id)
        try:
            record: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        return record

    async def _load(self, instance_id: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._read_record, instance_id)

    def _require(self, instance_id: str) -> dict[str, Any]:
        record = self._read_record(instance_id) if INSTANCE_ID.match(instance_id) else None
        if record is None:
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
        path = self.layout.record(instance_id)
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(_write_json, path, record)

    def _remove_cgroups(self, instance_id: str) -> None:
        Cgroup(self.layout.cgroups_path(instance_id)).remove()
        Cgroup(self.layout.cgroup_parent).remove_if_empty()

    def _remove_files(self, instance_id: str) -> None:
        directory = self.layout.instance_dir(instance_id)
        if not directory.exists():
            return
        if overlay.is_mounted(self.layout.rootfs(instance_id)):
            raise DriverError(f"{self.layout.rootfs(instance_id)} is still mounted; not removing")
        shutil.rmtree(directory)


# GNU tar: numeric owners, every xattr namespace (overlayfs keeps trusted.overlay.* on
# upper dirs), sparse files; whiteouts are 0/0 character devices and go in as such.
_TAR_OPTIONS = ("--xattrs", "--xattrs-include=*", "--numeric-owner", "--sparse")


def checkpoint_missing() -> str | None:
    """Why this host cannot checkpoint runc containers (None: it can): a CRIU >= 4.1
    and iptables (runc calls it around a checkpoint of a container with a netns)."""
    reason = criu_tools.criu_missing_reason()
    if reason:
        return reason
    if shutil.which("iptables") is None and not os.access("/usr/sbin/iptables", os.X_OK):
        return "iptables is missing (runc checkpoint/restore needs it): apt-get install iptables"
    return None


def _require_criu() -> criu_tools.CriuInfo:
    reason = checkpoint_missing()
    tool = criu_tools.find_criu()
    if reason or tool is None:
        raise DriverError(f"checkpoint/restore is not available on this host: {reason}")
    return tool


def _criu_failure(argv: list[str], result: commands.CommandResult, log: Path) -> DriverError:
    detail = (result.stderr or result.stdout).strip() or "(no output)"
    text = f"`{commands.describe(argv)}` failed with exit code {result.returncode}: {detail}"
    tail = _tail(log)
    return DriverError(text + (f"\nCRIU {log.name} ends:\n{tail}" if tail else ""))


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _empty_dir(path: Path, what: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if any(path.iterdir()):
        raise InvalidInput(f"cannot {what} {path}: it is not empty")


async def _run_with_env(
    argv: builtins.list[str], env: dict[str, str], timeout: float
) -> commands.CommandResult:
    """`commands.run` (no check) with environment `env`."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except OSError as exc:
        raise DriverError(f"cannot run `{commands.describe(argv)}`: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise DriverError(
            f"`{commands.describe(argv)}` did not finish within {timeout:g} s and was killed"
        ) from None
    return commands.CommandResult(
        process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")
    )


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def parse_capacity_limit(text: str) -> dict[str, int]:
    """'cpu=2,memory=4G' -> {"vcpus": 2000, "memory": 4096}; '' -> {} (all measured)."""
    return parse_capacity(text)


def _number(options: dict[str, str], key: str, default: str, kind: type[N]) -> N:
    text = options.get(key, default)
    try:
        value = kind(text)
    except ValueError:
        raise InvalidInput(f"runc driver option {key}={text!r} is not a number") from None
    if value < 0:
        raise InvalidInput(f"runc driver option {key}={text!r} must not be negative")
    return value


def _apply_limits(cgroup: Cgroup, resources: ResourceVector) -> None:
    """Memory first: if the kernel refuses it, nothing has changed."""
    cgroup.set_memory(bundle.memory_limit_bytes(resources.memory))
    cgroup.set_cpu(
        bundle.cpu_quota_us(resources.vcpus),
        bundle.CPU_PERIOD_US,
        bundle.cpu_shares(resources.vcpus),
    )


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie waiting for its reaper counts as exited."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _boot_id() -> str:
    """Changes at every boot of the machine (mounts and network namespaces do not survive)."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _read_inside(rootfs: Path, relative: str) -> str:
    """A small text file of the image, refusing symlinks that lead out of the rootfs."""
    path = (rootfs / relative).resolve()
    if not path.is_relative_to(rootfs.resolve()) or not path.is_file():
        return ""
    try:
        return path.read_text(errors="replace")[:1_000_000]
    except OSError:
        return ""


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(offset, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
        return f.read().decode(errors="replace")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _mem_total_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def _cpuinfo() -> tuple[str, list[str]]:
    model = "unknown"
    flags: list[str] = []
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = value.split()
    return model, flags


def _dump_finished(work: Path, images_dir: Path) -> bool:
    """CRIU ended the dump in `work` successfully, and its images are in `images_dir`."""
    try:
        log = (work / "dump.log").read_text(errors="replace")
    except OSError:
        return False
    return "Dumping finished successfully" in log and (images_dir / "inventory.img").exists()
