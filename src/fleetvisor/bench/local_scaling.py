"""`fleetvisor bench local-scaling`: one real service under a load ramp, static vs scaled.

    temp dir --> LocalFleet (runc, 1 host, own netns) --> push the httpwork image
      (a one-worker HTTP service: each request burns WORK_US of CPU, one at a time)
      --> for mode in (static, scaled):
            create the instance (2 CPU, one worker) with a service endpoint:
              static: endpoint only (max_siblings 0); scaled: cpu policy, 1 sibling
            open-loop load at the endpoint: low --> 4x low --> low (Poisson arrivals)
            meanwhile, every 0.5 s: the group's rows, the host's allocation, and the
            members' cgroup limits as the kernel has them
            remove the instance
      --> per phase p95 and throughput; trigger -> first answer of the sibling;
          allocation before / with sibling / after; JSON
    everything (fleet, netns, mounts, containers, cgroups, temp dir) removed, also on error

Both modes go through the same endpoint, so the comparison is the sibling alone. The
reaction time starts when the host's trigger fired (the carve event's `triggered_at`)
and ends when the load generator got its first answer from the sibling.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetvisor.bench.fleet import BenchError, ProgressFn, throwaway_fleet
from fleetvisor.bench.loadgen import (
    Phase,
    RequestRecord,
    first_response_from,
    run_load,
    summarize,
)
from fleetvisor.client import ApiError, FleetClient
from fleetvisor.drivers.runc.cgroups import CGROUP_ROOT
from fleetvisor.images.build import build_httpwork_image

TARGET_REACTION_S = 1.0
TARGET_P95_RATIO = 2.0
POLL_S = 0.5


@dataclass(frozen=True)
class LocalScalingConfig:
    work_us: int = 20_000  # CPU per request: one worker serves ~1e6/work_us requests/s
    low_rps: float = 13.0
    ramp: float = 4.0  # high = ramp x low
    low_s: float = 8.0
    high_s: float = 12.0
    cool_s: float = 14.0  # the last low phase: long enough to fold back
    cpu_millicores: int = 2000
    memory_mib: int = 256
    seed: int = 1

    def phases(self) -> list[Phase]:
        return [
            Phase("low", self.low_s, self.low_rps),
            Phase("high", self.high_s, self.low_rps * self.ramp),
            Phase("low_after", self.cool_s, self.low_rps),
        ]

    def policy(self, scaled: bool) -> dict[str, Any]:
        # One busy worker uses half of 2 CPUs: carve at 0.4 held 1 s; fold at 0.2 held 3 s.
        return {
            "triggers": [{"metric": "cpu", "above": 0.4, "below": 0.2}],
            "hold_s": 1.0,
            "fold_hold_s": 3.0,
            "cooldown_s": 3.0,
            "carve_fraction": 0.5,
            "max_siblings": 1 if scaled else 0,
            "service_port": 8080,
        }


@dataclass
class _Sample:
    at: float  # monotonic
    members: dict[str, dict[str, int]]  # name -> the controller's row (vcpus, memory)
    allocated: dict[str, int]  # the host's allocation as the controller has it
    kernel: dict[str, tuple[int, int]]  # name -> (cpu quota in millicores, memory MiB)


@dataclass
class _ModeResult:
    summary: dict[str, dict[str, Any]]
    errors: int
    reaction_s: float | None = None
    samples: list[_Sample] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def run_local_scaling_bench(
    config: LocalScalingConfig, report: ProgressFn | None = None
) -> dict[str, Any]:
    progress = report or (lambda _what, _done, _total: None)
    with _fleet(progress) as (client, host, image):
        results = {}
        for index, mode in enumerate(("static", "scaled")):
            progress(f"{mode}: load ramp", index, 2)
            results[mode] = _run_mode(client, host, image, config, mode)
        progress("done", 2, 2)
    return _report(config, results["static"], results["scaled"])


# ------------------------------------------------------------------------------ one mode


def _run_mode(
    client: FleetClient, host: str, image: str, config: LocalScalingConfig, mode: str
) -> _ModeResult:
    name = f"fvbench-{mode}"
    body = {
        "name": name,
        "image": image,
        "resources": {
            "vcpus": config.cpu_millicores,
            "memory": config.memory_mib,
            "disk": 1,
            "net": 100,
        },
        "env": {"WORK_US": str(config.work_us)},
        "scaling": config.policy(scaled=mode == "scaled"),
    }
    accepted = client.create_instance(body)
    try:
        op = client.wait_operation(accepted["operation"]["id"], timeout=120)
        if op["state"] != "succeeded":
            raise BenchError(f"{name} did not start: {op['error']}")
        endpoint = _wait_endpoint(client, name)
        first_event = _last_event_id(client)
        stop = threading.Event()
        samples: list[_Sample] = []
        watcher = threading.Thread(
            target=_watch, args=(client, host, name, samples, stop), daemon=True
        )
        watcher.start()
        try:
            address, port = endpoint.rsplit(":", 1)
            # In a process of its own: the watcher's work must not delay its clock.
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                records = pool.submit(
                    _load, address, int(port), config.phases(), config.seed
                ).result()
            if mode == "scaled":
                _wait_folded(client, name, timeout=30.0)
            time.sleep(2 * POLL_S)
        finally:
            stop.set()
            watcher.join(timeout=10)
        summary = summarize(records, config.phases())
        result = _ModeResult(
            summary=summary,
            errors=sum(s["errors"] for s in summary.values()),
            samples=samples,
            events=client.events(after=first_event, subject=f"instance/{name}", limit=1000),
        )
        carved = [e for e in result.events if e["kind"] == "instance.carved"]
        if carved and carved[0]["data"].get("triggered_at") is not None:
            sibling = carved[0]["data"]["sibling"]
            triggered = carved[0]["data"]["triggered_at"] - (time.time() - time.monotonic())
            answered = first_response_from(records, lambda served: served == sibling)
            if answered is not None:
                result.reaction_s = answered - triggered
        return result
    finally:
        with contextlib.suppress(ApiError):
            client.wait_operation(client.delete_instance(name)["id"], timeout=120)


def _load(host: str, port: int, phases: list[Phase], seed: int) -> list[RequestRecord]:
    return asyncio.run(run_load(host, port, phases, seed=seed, timeout=10.0))


def _wait_endpoint(client: FleetClient, name: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        endpoint = client.instance(name).get("endpoint")
        if endpoint:
            return str(endpoint)
        time.sleep(0.1)
    raise BenchError(f"{name} has no service endpoint after {timeout:.0f}s")


def _wait_folded(client: FleetClient, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [i for i in client.instances() if i.get("parent") == name]:
            return
        time.sleep(POLL_S)


def _last_event_id(client: FleetClient) -> int:
    return max((e["id"] for e in client.events(limit=1, tail=True)), default=0)


def _watch(
    client: FleetClient, host: str, name: str, samples: list[_Sample], stop: threading.Event
) -> None:
    """What the controller and the kernel say about the group, every POLL_S."""
    cgroups = _CgroupFinder()
    while not stop.is_set():
        with contextlib.suppress(ApiError, OSError):
            group = [
                i for i in client.instances(host=host) if i["name"] == name or i["parent"] == name
            ]
            allocated = client.host(host)["allocated"]
            samples.append(
                _Sample(
                    at=time.monotonic(),
                    members={i["name"]: i["resources"] for i in group},
                    allocated={k: allocated[k] for k in ("vcpus", "memory", "disk", "net")},
                    kernel={i["name"]: cgroups.limits(i["id"]) for i in group},
                )
            )
        stop.wait(POLL_S)


class _CgroupFinder:
    """An instance's cgroup limits as the kernel has them (its directories found once)."""

    def __init__(self) -> None:
        self._dirs: dict[str, tuple[Path, Path]] = {}

    def limits(self, instance_id: str) -> tuple[int, int]:
        """(CFS quota in millicores, memory limit in MiB); (-1, -1) until it exists."""
        dirs = self._dirs.get(instance_id) or self._find(instance_id)
        if dirs is None:
            return -1, -1
        cpu_dir, mem_dir = dirs
        try:
            period = int((cpu_dir / "cpu.cfs_period_us").read_text())
            quota = int(int((cpu_dir / "cpu.cfs_quota_us").read_text()) * 1000 / period)
            memory = int((mem_dir / "memory.limit_in_bytes").read_text()) // (1024 * 1024)
        except OSError:
            self._dirs.pop(instance_id, None)
            return -1, -1
        return quota, memory

    def _find(self, instance_id: str) -> tuple[Path, Path] | None:
        cpu = next(iter(sorted(CGROUP_ROOT.glob(f"cpu,cpuacct/**/{instance_id}"))), None)
        cpu = cpu or next(iter(sorted(CGROUP_ROOT.glob(f"cpu/**/{instance_id}"))), None)
        memory = next(iter(sorted(CGROUP_ROOT.glob(f"memory/**/{instance_id}"))), None)
        if cpu is None or memory is None:
            return None
        self._dirs[instance_id] = (cpu, memory)
        return cpu, memory


# ------------------------------------------------------------------------------- figures


def _conservation(config: LocalScalingConfig, samples: list[_Sample]) -> dict[str, Any]:
    """Before (parent alone), with the sibling, after (folded): do the shares add up?"""
    size = (config.cpu_millicores, config.memory_mib)

    def rows(sample: _Sample) -> tuple[int, int]:
        return (
            sum(m["vcpus"] for m in sample.members.values()),
            sum(m["memory"] for m in sample.members.values()),
        )

    def kernel(sample: _Sample) -> tuple[int, int]:
        return (
            sum(k[0] for k in sample.kernel.values()),
            sum(k[1] for k in sample.kernel.values()),
        )

    settled = [s for s in samples if s.members and all(k[0] > 0 for k in s.kernel.values())]
    with_sibling = [s for s in settled if len(s.members) > 1]
    alone = [s for s in settled if len(s.members) == 1]
    stages = {
        "before": alone[0] if alone else None,
        "with_sibling": with_sibling[len(with_sibling) // 2] if with_sibling else None,
        "after": alone[-1]
        if alone and with_sibling and alone[-1].at > with_sibling[-1].at
        else None,
    }
    allocations = {tuple(s.allocated.values()) for s in samples}
    table = {
        stage: {
            "members": len(s.members),
            "rows": dict(zip(("vcpus", "memory"), rows(s), strict=True)),
            "kernel": dict(zip(("cpu_quota_millicores", "memory_mib"), kernel(s), strict=True)),
            "host_allocated": s.allocated,
        }
        if s
        else None
        for stage, s in stages.items()
    }
    conserved = (
        all(s is not None for s in stages.values())
        and len(allocations) == 1
        and all(rows(s) == size for s in settled)
        and all(kernel(s) == size for s in stages.values() if s is not None)
        # in between, a step may leave less allocated, never more
        and all(k <= v for s in settled for k, v in zip(kernel(s), size, strict=True))
    )
    return {"conserved": conserved, "stages": table}


def _report(config: LocalScalingConfig, static: _ModeResult, scaled: _ModeResult) -> dict[str, Any]:
    conservation = _conservation(config, scaled.samples)
    static_high = static.summary["high"]["p95_ms"]
    scaled_high = scaled.summary["high"]["p95_ms"]
    ratio = static_high / scaled_high if static_high and scaled_high else None
    carves = [e for e in scaled.events if e["kind"] == "instance.carved"]
    folds = [e for e in scaled.events if e["kind"] == "instance.folded"]
    return {
        "benchmark": "local-scaling",
        "service": {
            "image": "httpwork (one worker, single-threaded HTTP/1.0)",
            "work_us_per_request": config.work_us,
            "instance": {"vcpus": config.cpu_millicores, "memory": config.memory_mib},
        },
        "phases": [
            {"name": p.name, "seconds": p.seconds, "rate_rps": p.rate} for p in config.phases()
        ],
        "reaction_s": _round(scaled.reaction_s),
        "static_p95_ms_high": _round(static_high),
        "scaled_p95_ms_high": _round(scaled_high),
        "p95_high_static_over_scaled": _round(ratio),
        "request_errors": scaled.errors,
        "static_request_errors": static.errors,
        "host_allocation_conserved": conservation["conserved"],
        "allocation": conservation["stages"],
        "carves": len(carves),
        "folds": len(folds),
        "per_phase": {
            mode: {
                phase: {
                    k: _round(v) if isinstance(v, float) else v
                    for k, v in figures.items()
                    if k in ("requests", "ok", "errors", "throughput_rps", "p50_ms", "p95_ms")
                }
                | {"served_by": figures["served_by"]}
                for phase, figures in result.summary.items()
            }
            for mode, result in (("static", static), ("scaled", scaled))
        },
        "targets": {
            "reaction_s_max": TARGET_REACTION_S,
            "p95_high_ratio_min": TARGET_P95_RATIO,
            "request_errors": 0,
            "met": bool(
                scaled.reaction_s is not None
                and scaled.reaction_s <= TARGET_REACTION_S
                and ratio is not None
                and ratio >= TARGET_P95_RATIO
                and scaled.errors == 0
                and conservation["conserved"]
            ),
        },
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# ------------------------------------------------------------------------------- fleet


@contextlib.contextmanager
def _fleet(progress: ProgressFn) -> Iterator[tuple[FleetClient, str, str]]:
    with throwaway_fleet(
        prefix="fvbench-scale-",
        image=lambda workdir: build_httpwork_image(workdir / "httpwork"),
        image_name="fvbench/httpwork",
        progress=progress,
        preparing="building the httpwork image",
    ) as bench:
        yield bench.client, bench.hosts[0], bench.image.ref
