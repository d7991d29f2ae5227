"""RuncDriver: an instance is an OCI runtime bundle run by runc, on overlayfs, in its own
network namespace on the agent's bridge, limited by cgroup v1.

Lifecycle (each call idempotent; see README.md for the diagram):
  create   layers + image config from the RootfsProvider, overlay mount, address,
           netns + veth, config.json. Runs nothing.
  start    `runc run --detach`: the container outlives the agent process.
  stop     SIGTERM, grace period on the clock, SIGKILL, `runc delete`. Keeps the upper
           dir, netns and address, so a later start resumes with the same data and IP.
  destroy  stop, `runc delete --force`, unmount, netns/veth/address, cgroups, files.

State lives in `<state_dir>/runc-driver/`: one directory per instance (the bundle, the
overlay dirs, instance.json, container.log) and runc's own root. A restarted agent
rebuilds its reports from those files and `runc list`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, TypeVar

from fleetvisor.clock import Clock
from fleetvisor.drivers.base import Capability, RootfsProvider, UnknownInstance
from fleetvisor.drivers.runc import bundle, commands, overlay
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
        return {Capability.RESIZE_LIVE, Capability.OCI_IMAGES}

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
        while _alive(pid):
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
