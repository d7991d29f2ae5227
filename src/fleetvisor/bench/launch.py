"""`fleetvisor bench launch`: API-call-to-running latency, cold and cached, against raw runc.

    temp dir --> LocalFleet (runc, 1 host, own netns, --port 0) --> push IMAGE to its registry
      --> warm-up: one fleet launch and one raw runc run (not measured)
      --> round 1..N:
            drop the image from the host cache (blobs + unpacked layers)   [not timed]
            cold   : create API call ... operation done, instance running  --> remove
            cached : create API call ... operation done, instance running  --> remove
            raw    : `runc run --detach` of an equivalent bundle           --> remove
      --> p50/p95 per mode, ratios, targets --> JSON
    everything (fleet, netns, mounts, containers, cgroups, temp dir) removed, also on error/Ctrl-C

A fleet launch's end is the time the controller recorded the create operation as succeeded
(it does so right after the agent's `start` answered with the container running), so the
client's poll interval does not count. Rounds interleave the modes, so slow drift of a
shared machine spreads over all three alike. See README.md for how to read the ratios.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetvisor.bench.fleet import BenchError, BenchImage, ProgressFn, throwaway_fleet
from fleetvisor.client import ApiError, FleetClient
from fleetvisor.drivers.runc import bundle, overlay
from fleetvisor.drivers.runc.cgroups import Cgroup
from fleetvisor.errors import FleetvisorError, NotFound
from fleetvisor.images.build import (
    RootfsBuildError,
    build_busybox_image,
    build_rootfs_image,
    debootstrap_minbase,
)
from fleetvisor.images.layers import LayerCache
from fleetvisor.images.store import ImageStore
from fleetvisor.model.specs import InstanceSpec, ResourceVector

MB = 1_000_000
COLD_TARGET_MIN_BYTES = 30 * MB  # the cold/cached target only means something for big images
CACHED_OVER_RAW_MAX = 1.5
COLD_OVER_CACHED_MIN = 5.0
DEFAULT_COMMAND = ("sleep", "3600")
KEYWORDS = ("busybox", "minbase")
POLL_SECONDS = 0.05  # how often the bench asks whether an operation ended (not in the figure)
OPERATION_TIMEOUT = 300.0
RUNC_TIMEOUT = 30.0
PIDS_LIMIT = 4096  # the runc driver's default
MODES = ("cold", "cached", "raw_runc")


@dataclass(frozen=True)
class LaunchBenchConfig:
    image: str  # "busybox", "minbase", or the path of an OCI layout / archive
    count: int = 10
    command: tuple[str, ...] = DEFAULT_COMMAND
    cpu_millicores: int = 500
    memory_mib: int = 256
    rootfs_cache: Path = field(default_factory=lambda: default_rootfs_cache())


def default_rootfs_cache() -> Path:
    """Where built base trees are kept between runs (same place as the integration tests)."""
    if override := os.environ.get("FLEETVISOR_ROOTFS_CACHE"):
        return Path(override)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fleetvisor" / "rootfs"


# --------------------------------------------------------------------------- statistics


def p50(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))


def p95(samples: Sequence[float]) -> float:
    """Nearest-rank 95th percentile (with few samples: the largest or next to largest)."""
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(0.95 * len(ordered))) - 1]


def summarize(
    config: LaunchBenchConfig,
    image: BenchImage,
    samples: dict[str, list[float]],
    load_average: tuple[float, float] = (0.0, 0.0),
) -> dict[str, Any]:
    """The JSON document: percentiles per mode, the two ratios and the targets.
    `load_average`: the machine's 1-minute load at the start and at the end (noise hint)."""
    result: dict[str, Any] = {
        "benchmark": "launch",
        "image": config.image,
        "image_ref": image.ref,
        "image_bytes": image.image_bytes,
        "layers": len(image.layers),
        "count": config.count,
        "command": list(config.command),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_start": round(load_average[0], 2),
        "load_average_end": round(load_average[1], 2),
    }
    for mode in MODES:
        result[f"{mode}_p50_ms"] = round(p50(samples[mode]), 1)
        result[f"{mode}_p95_ms"] = round(p95(samples[mode]), 1)
    cached_over_raw = p50(samples["cached"]) / p50(samples["raw_runc"])
    cold_over_cached = p50(samples["cold"]) / p50(samples["cached"])
    applies = image.image_bytes >= COLD_TARGET_MIN_BYTES
    cold_met = cold_over_cached >= COLD_OVER_CACHED_MIN if applies else None
    result.update(
        cached_over_raw=round(cached_over_raw, 2),
        cold_over_cached=round(cold_over_cached, 2),
        cached_over_raw_target=CACHED_OVER_RAW_MAX,
        cached_over_raw_target_met=cached_over_raw <= CACHED_OVER_RAW_MAX,
        cold_over_cached_target=COLD_OVER_CACHED_MIN,
        cold_target_applies=applies,
        cold_over_cached_target_met=cold_met,
        samples_ms={mode: [round(s, 1) for s in samples[mode]] for mode in MODES},
    )
    return result


# --------------------------------------------------------------------------- the image


def image_source(image: str, workdir: Path, rootfs_cache: Path) -> Path:
    """An OCI layout or archive for IMAGE: a keyword is built here, a path is used as is."""
    try:
        if image == "busybox":
            return build_busybox_image(workdir / "busybox-layout", "latest")
        if image == "minbase":
            tree = debootstrap_minbase(rootfs_cache)
            return build_rootfs_image(workdir / "minbase-layout", tree, "latest")
    except RootfsBuildError as exc:
        raise BenchError(f"cannot build the {image} image here: {exc}") from exc
    path = Path(image)
    if not path.exists():
        raise BenchError(
            f"--image {image!r} is neither {' nor '.join(KEYWORDS)} nor an existing path; "
            "give an OCI layout directory or an OCI / `docker save` archive"
        )
    return path


# --------------------------------------------------------------------------- the host cache


class SharedCache:
    """The fleet's shared host image cache, opened with the same multi-process-safe classes
    the agents use (HostImageCache: `<cache>/store` and `<cache>/layers`), so the bench can
    empty it between cold launches while the agent keeps running."""

    def __init__(self, root: Path) -> None:
        self.store = ImageStore(root / "store")
        self.layers = LayerCache(root / "layers", allow_setuid=True)

    def holds(self, image: BenchImage) -> bool:
        """True when every layer of the image is both stored and unpacked here."""
        return all(
            self.store.has_blob(layer.digest) and self.layers.has(layer.digest)
            for layer in image.layers
        )

    def drop(self, image: BenchImage) -> None:
        """Forget the image: manifest entries, then unreferenced blobs, then every unpacked
        layer no instance holds. Fails if anything of the image is left."""
        with contextlib.suppress(NotFound):
            self.store.remove(f"{image.name}@{image.digest}")
        self.store.gc(min_age=0)
        self.layers.evict(0)
        left = [
            layer.digest
            for layer in image.layers
            if self.store.has_blob(layer.digest) or self.layers.has(layer.digest)
        ]
        if left:
            users = {digest: self.layers.users(digest) for digest in left}
            raise BenchError(f"could not empty the host cache: still holding {users}")

    def pin_layers(self, holder: str, image: BenchImage) -> list[Path]:
        """The image's unpacked layer directories (base first), held for `holder` so no
        eviction takes them while a raw runc container uses them."""
        digests = [layer.digest for layer in image.layers]
        self.layers.acquire(holder, digests)
        return [
            self.layers.ensure(layer.digest, self.store.blob_path, layer.media_type)
            for layer in image.layers
        ]

    def unpin(self, holder: str) -> None:
        self.layers.release(holder)


# --------------------------------------------------------------------------- fleet launches


class FleetLauncher:
    """Creates an instance through the API and times it until the controller has it running."""

    def __init__(self, client: FleetClient, image: BenchImage, config: LaunchBenchConfig) -> None:
        self.client = client
        self.body: dict[str, Any] = {
            "image": image.ref,
            "command": list(config.command),
            "resources": {"vcpus": config.cpu_millicores, "memory": config.memory_mib},
        }

    def launch(self, name: str) -> float:
        """Milliseconds from the create call to the operation's recorded success."""
        began = time.time()
        accepted = self.client.create_instance({**self.body, "name": name})
        op = self._wait(accepted["operation"]["id"])
        if op["state"] != "succeeded":
            raise BenchError(f"creating {name} ended {op['state']}: {op['error'] or op['step']}")
        status = self.client.instance(name)["status"]
        if status != "running":
            raise BenchError(f"{name} was created but is {status}, not running")
        return (float(op["updated_at"]) - began) * 1000

    def remove(self, name: str) -> None:
        op = self._wait(self.client.delete_instance(name)["id"])
        if op["state"] != "succeeded":
            raise BenchError(f"removing {name} ended {op['state']}: {op['error']}")

    def _wait(self, op_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + OPERATION_TIMEOUT
        while True:
            op: dict[str, Any] = self.client.operation(op_id)
            if op["state"] in ("succeeded", "failed", "rolled_back"):
                return op
            if time.monotonic() > deadline:
                raise BenchError(
                    f"operation {op_id} still {op['state']} after {OPERATION_TIMEOUT}s"
                )
            time.sleep(POLL_SECONDS)


# --------------------------------------------------------------------------- raw runc


class RawRunc:
    """`runc run --detach` of bundles equivalent to the fleet's instances: the same unpacked
    layers under overlayfs, the same command, env, user, mounts, capabilities and cgroup
    limits (bundle.runtime_config), but a fresh empty network namespace made by runc.
    Names start with `fvbench-<tag>`; everything lives under `workdir`."""

    def __init__(
        self, workdir: Path, image: BenchImage, config: LaunchBenchConfig, tag: str
    ) -> None:
        self.workdir = workdir
        self.image = image
        self.config = config
        self.prefix = f"fvbench-{tag}"
        self.root = workdir / "runc-root"
        self.cgroup_parent = f"/{self.prefix}"
        self.runc = shutil.which("runc") or "runc"
        self.live: set[str] = set()

    def container(self, index: int) -> str:
        return f"{self.prefix}-{index}"

    def prepare(self, index: int, layers: list[Path]) -> None:
        """Overlay mount, hosts file and config.json: the work a driver does before runc."""
        directory = self.workdir / self.container(index)
        rootfs = directory / "rootfs"
        self.live.add(self.container(index))
        overlay.mount_overlay(layers, directory / "upper", directory / "work", rootfs)
        hosts = directory / "hosts"
        hosts.write_text("127.0.0.1\tlocalhost\n::1\tlocalhost\n")
        spec = InstanceSpec(
            id=self.container(index),
            name=self.container(index),
            image=self.image.ref,
            command=list(self.config.command),
            resources=ResourceVector(
                vcpus=self.config.cpu_millicores, memory=self.config.memory_mib, disk=0, net=0
            ),
        )
        runtime = bundle.runtime_config(
            spec,
            self.image.config,
            netns_path="",
            cgroups_path=f"{self.cgroup_parent}/{index}",
            pids_limit=PIDS_LIMIT,
            passwd=_read_text(rootfs / "etc/passwd"),
            group=_read_text(rootfs / "etc/group"),
            hosts_file=str(hosts),
        )
        runtime["linux"]["namespaces"] = [
            {"type": kind} for kind in ("pid", "ipc", "uts", "mount", "network")
        ]
        (directory / "config.json").write_text(json.dumps(runtime, indent=1))

    def run(self, index: int) -> float:
        """Milliseconds from invoking `runc run --detach` until it returned (started)."""
        container = self.container(index)
        directory = self.workdir / container
        argv = [self.runc, "--root", str(self.root), "run", "--detach"]
        argv += ["--bundle", str(directory), container]
        with open(directory / "container.log", "ab") as log:
            began = time.monotonic()
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=RUNC_TIMEOUT
            )
            elapsed = time.monotonic() - began
        if done.returncode != 0:
            tail = (directory / "container.log").read_text(errors="replace")[-2000:]
            raise BenchError(f"`runc run` of {container} failed ({done.returncode}): {tail}")
        status = self._runc("state", container)
        if '"running"' not in status:
            raise BenchError(f"raw runc container {container} is not running: {status}")
        return elapsed * 1000

    def remove(self, index: int) -> None:
        """Kill and delete the container, unmount its rootfs, remove its cgroup and files."""
        container = self.container(index)
        directory = self.workdir / container
        self._runc("delete", "--force", container, check=False)
        overlay.unmount(directory / "rootfs")
        Cgroup(f"{self.cgroup_parent}/{index}").remove()
        if not overlay.is_mounted(directory / "rootfs"):
            shutil.rmtree(directory, ignore_errors=True)
        self.live.discard(container)

    def close(self) -> None:
        """Remove whatever is left (after an error or Ctrl-C), then the cgroup parent."""
        for container in sorted(self.live):
            with contextlib.suppress(OSError, FleetvisorError, subprocess.SubprocessError):
                self.remove(int(container.rsplit("-", 1)[1]))
        Cgroup(self.cgroup_parent).remove_if_empty()

    def _runc(self, *args: str, check: bool = True) -> str:
        argv = [self.runc, "--root", str(self.root), *args]
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUNC_TIMEOUT
        )
        if check and done.returncode != 0:
            raise BenchError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
        return done.stdout


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace") if not path.is_symlink() else ""
    except OSError:
        return ""


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class _Run:
    """What the rounds work with; `_bench_run` sets it up and takes it down."""

    image: BenchImage
    cache: SharedCache
    launcher: FleetLauncher
    raw: RawRunc


def run_launch_bench(
    config: LaunchBenchConfig, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Run the whole benchmark and answer the JSON document (see `summarize`)."""
    if config.count < 1:
        raise BenchError("--count must be at least 1")
    if os.geteuid() != 0:
        raise BenchError("the launch benchmark runs runc, overlayfs and netns: run it as root")
    report = progress or (lambda _what, _done, _total: None)
    total = 3 * config.count + 2
    load_at_start = os.getloadavg()[0]
    with _bench_run(config, report) as run:
        report("warm-up launch", 0, total)
        _warm_up(run)
        samples: dict[str, list[float]] = {mode: [] for mode in MODES}
        for index in range(1, config.count + 1):
            for mode in MODES:
                report(f"{mode} launch {index}/{config.count}", 3 * (index - 1) + 2, total)
                samples[mode].append(_measure(run, mode, index))
        report("removing the fleet", total, total)
        return summarize(config, run.image, samples, (load_at_start, os.getloadavg()[0]))


def _warm_up(run: _Run) -> None:
    """First launches pay one-time costs (imports, first connections, page cache of runc):
    one fleet launch and one raw run, not measured."""
    _fleet_launch(run, "fvbench-warm-up")
    _raw_launch(run, 0)


def _measure(run: _Run, mode: str, index: int) -> float:
    if mode == "raw_runc":
        return _raw_launch(run, index)
    if mode == "cold":
        run.cache.drop(run.image)
    elif not run.cache.holds(run.image):
        raise BenchError("the image left the host cache before a cached launch")
    return _fleet_launch(run, f"fvbench-{mode}-{index}")


def _fleet_launch(run: _Run, name: str) -> float:
    try:
        return run.launcher.launch(name)
    finally:
        with contextlib.suppress(ApiError, BenchError):  # the agent removes it at exit anyway
            run.launcher.remove(name)


def _raw_launch(run: _Run, index: int) -> float:
    holder = run.raw.container(index)
    layers = run.cache.pin_layers(holder, run.image)
    try:
        run.raw.prepare(index, layers)
        return run.raw.run(index)
    finally:
        run.raw.remove(index)
        run.cache.unpin(holder)


@contextlib.contextmanager
def _bench_run(config: LaunchBenchConfig, report: ProgressFn) -> Iterator[_Run]:
    """Temp dir, fleet, image and raw runc workspace; all removed on the way out."""
    name = f"fvbench/{config.image}" if config.image in KEYWORDS else "fvbench/image"
    with contextlib.ExitStack() as stack:
        bench = stack.enter_context(
            throwaway_fleet(
                prefix="fvbench-",
                image=lambda workdir: image_source(config.image, workdir, config.rootfs_cache),
                image_name=name,
                progress=report,
                preparing=f"preparing image {config.image}",
            )
        )
        image = bench.image
        if any(pin["image"] == image.ref for pin in bench.client.cache_pins()):
            raise BenchError(f"{image.ref} is pinned: cold launches would find it prepopulated")
        raw = RawRunc(bench.workdir / "raw", image, config, secrets.token_hex(3))
        stack.callback(raw.close)
        yield _Run(
            image=image,
            cache=SharedCache(bench.state_dir / "cache"),
            launcher=FleetLauncher(bench.client, image, config),
            raw=raw,
        )
