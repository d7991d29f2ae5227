"""`fleetvisor bench migrate`: live and cold migration of a runc instance against bare CRIU.

    checks: root, runc, CRIU >= 4.1 (scripts/deps/criu.sh), busybox-static, gcc
    temp dir --> memcounter image --> LocalFleet (runc, 2 hosts, own netns) --> push it
      --> instance `fvbench-mc`: memcounter holding MEM MiB, one count every TICK ms,
          behind a shell that appends a line to /data/starts at every start
      --> watcher: both hosts' container.log of the instance, every 5 ms, each line stamped
      --> round 1..N (every migration goes to the other host):
            live  `fleetvisor migrate fvbench-mc --live --to OTHER --json`  (CLI, timed)
            cold  `fleetvisor migrate fvbench-mc --cold --to OTHER --json`  (CLI, timed)
            raw   raw_criu_roundtrip: the same memcounter binary, same MEM, as a plain
                  host process: `criu dump` + `criu restore -d` (in a helper process)
      --> medians, live / raw, state_preserved, samples --> JSON
    everything (fleet, netns, mounts, containers, cgroups, temp dir) removed, also on error

Figures per migration (the JSON has their medians and every sample; see README.md):
  downtime_ms     the operation's result, as the controller measures it: the source's
                  checkpoint (dump_s) + the target's step (pull the package, restore)
  observed_gap_ms from memcounter's own output: the time between its last `counter` line
                  on the source and its first on the target, less the one tick it sleeps
                  anyway. A live-restored memcounter sleeps the rest of the tick it was
                  frozen in (its EINTR loop resumes with the time left), so this is the
                  time it was frozen, to within the watcher's 5 ms. Cold: from the last
                  count to the new process's first, including its start (filling MEM)
  total_s         wall time of the CLI call (includes the CLI's start-up and its polling
                  of the operation, which backs off to 1 s)
  operation_s     the operation's own span: its updated_at - created_at (controller clock)
  steps_ms        time in each step of the operation, as a poller saw them (every 50 ms)
  target_*_ms     where the target's time went, when its agent logs it and its driver
                  records it (pull of the package, runc restore, running after); else null
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetvisor.bench.fleet import BenchError, ProgressFn, ThrowawayFleet, throwaway_fleet
from fleetvisor.client import ApiError, FleetClient
from fleetvisor.drivers.runc.driver import STATE_SUBDIR
from fleetvisor.drivers.runc.layout import Layout, default_agent_id

TARGET_RATIO = 1.5  # live downtime <= 1.5 x bare CRIU dump + restore
INSTANCE = "fvbench-mc"
COUNTER = re.compile(r"^counter (\d+)$")
STARTS = re.compile(r"^starts=(\d+)$")
# Every start appends to /data/starts and prints the count: the file is in the writable
# layer, so it travels with a cold migration. Then memcounter runs in the foreground.
SCRIPT = "echo start >> /data/starts; echo starts=$(wc -l < /data/starts); exec /bin/memcounter"
WATCH_S = 0.005
STEP_POLL_S = 0.05
# agent/migration.py's line for a received migration: "migration ID: NAME pulled in Xs,
# running after Ys" (read when present; the figures are null when it is not)
AGENT_LINE = r"migration {}: \S+ pulled in ([0-9.]+)s, running after ([0-9.]+)s"
SETTLE_LINES = 3  # counter lines printed on the current host before the next migration


@dataclass(frozen=True)
class MigrateBenchConfig:
    memory_mib: int = 100  # MEM_MB of memcounter
    rounds: int = 3
    tick_ms: int = 100
    cpu_millicores: int = 1000
    headroom_mib: int = 64  # the instance's memory limit: memory_mib + headroom_mib
    timeout_s: float = 300.0  # one migration, one start, one raw round


# ------------------------------------------------------------------------------- entry


def run_migrate_bench(
    config: MigrateBenchConfig, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Run the whole benchmark and answer the JSON document (see `_report`)."""
    if config.rounds < 1:
        raise BenchError("--rounds must be at least 1")
    if config.memory_mib < 1:
        raise BenchError("--memory must be at least 1 MiB")
    report = progress or (lambda _what, _done, _total: None)
    criu, binary = _check_machine()
    total = 3 * config.rounds + 1
    load_at_start = os.getloadavg()[0]
    samples: list[dict[str, Any]] = []
    with _bench_run(config, report) as run:
        report("starting memcounter", 0, total)
        run.start_instance()
        # The raw floor runs in a helper process: raw_criu_roundtrip makes its process a
        # child subreaper, and this one is the fleet agents' parent (their containers
        # would be re-parented here instead of to init).
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=spawn) as floor:
            for index in range(1, config.rounds + 1):
                step = 3 * (index - 1) + 1
                report(f"round {index}/{config.rounds}: live migration", step, total)
                live = run.migrate("live")
                report(f"round {index}/{config.rounds}: cold migration", step + 1, total)
                cold = run.migrate("cold")
                report(f"round {index}/{config.rounds}: raw CRIU", step + 2, total)
                raw = floor.submit(
                    _raw_floor, criu, config.memory_mib, run.fleet.workdir, binary, config
                ).result()
                samples.append({"round": index, "live": live, "cold": cold, "raw": raw})
        report("removing the fleet", total, total)
    return _report(config, samples, (load_at_start, os.getloadavg()[0]))


def _check_machine() -> tuple[Any, Path]:
    """Everything the run needs, checked before anything starts: (CriuInfo, memcounter)."""
    from fleetvisor.drivers.runc import PrerequisiteMissing, check_prerequisites
    from fleetvisor.drivers.runc.criu import find_criu
    from fleetvisor.drivers.runc.driver import checkpoint_missing
    from fleetvisor.images.build import WorkloadBuildError, compile_memcounter

    if os.geteuid() != 0:
        raise BenchError(
            "the migrate benchmark runs runc, CRIU, overlayfs and network namespaces: "
            "run it as root"
        )
    try:
        check_prerequisites()
    except PrerequisiteMissing as exc:
        raise BenchError(str(exc)) from exc
    missing = checkpoint_missing()
    criu = find_criu()
    if missing or criu is None:
        message = f"live migration needs checkpoint/restore (CRIU >= 4.1, iptables): {missing}"
        if "scripts/deps/criu.sh" not in message:
            message += "; scripts/deps/criu.sh installs both (run it as root)"
        raise BenchError(message)
    if shutil.which("nsenter") is None:
        raise BenchError(
            "nsenter is missing (hosts run in their own netns): apt-get install util-linux"
        )
    if not os.access("/bin/busybox", os.X_OK):
        raise BenchError(
            "the memcounter image needs Debian's busybox-static: apt-get install busybox-static"
        )
    try:
        binary = compile_memcounter()
    except WorkloadBuildError as exc:
        hint = f": apt-get install {' '.join(exc.missing_packages)}" if exc.missing_packages else ""
        raise BenchError(f"cannot compile memcounter: {exc}{hint}") from exc
    return criu, binary


# ------------------------------------------------------------------------------- the run


@contextlib.contextmanager
def _bench_run(config: MigrateBenchConfig, report: ProgressFn) -> Iterator[_Run]:
    """Temp dir, 2-host fleet with the memcounter image, log watcher; all removed after."""
    from fleetvisor.images.build import build_memcounter_image

    with contextlib.ExitStack() as stack:
        fleet = stack.enter_context(
            throwaway_fleet(
                prefix="fvbench-migrate-",
                image=lambda workdir: build_memcounter_image(
                    workdir / "memcounter", mem_mb=config.memory_mib, tick_ms=config.tick_ms
                ),
                image_name="fvbench/memcounter",
                progress=report,
                preparing="building the memcounter image",
                hosts=2,
            )
        )
        lacking = [h["name"] for h in fleet.client.hosts() if "checkpoint" not in h["capabilities"]]
        if lacking:
            raise BenchError(
                f"{', '.join(lacking)} of the throwaway fleet cannot checkpoint; "
                "see its agent logs (CRIU >= 4.1 and iptables: scripts/deps/criu.sh)"
            )
        run = _Run(config, fleet)
        stack.callback(run.close)
        yield run


@dataclass
class _Line:
    at: float  # monotonic, when the watcher saw it
    text: str


@dataclass
class _Segment:
    """One life of the instance's log file on one host (the file, from creation to removal)."""

    host: str
    lines: list[_Line] = field(default_factory=list)

    def counters(self) -> list[tuple[float, int]]:
        return [(ln.at, int(m.group(1))) for ln in self.lines if (m := COUNTER.match(ln.text))]

    def starts(self) -> list[int]:
        return [int(m.group(1)) for ln in self.lines if (m := STARTS.match(ln.text))]


class _LogWatcher:
    """Every WATCH_S, new lines of the instance's container.log on each host, stamped with
    the time they were seen. A file that disappears ends its segment; when it appears
    again (the instance came back to that host), a new segment begins."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        self._open: dict[str, tuple[_Segment, int, bytes]] = {}  # host -> (seg, offset, rest)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fvbench-logs", daemon=True)
        self._thread.start()

    def current(self, host: str) -> _Segment | None:
        """The segment of the file on `host` now (None if it has no file)."""
        with self._lock:
            held = self._open.get(host)
            return held[0] if held else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for host, path in self.paths.items():
                with contextlib.suppress(OSError):
                    self._poll(host, path)
            self._stop.wait(WATCH_S)

    def _poll(self, host: str, path: Path) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            with self._lock:
                self._open.pop(host, None)
            return
        with self._lock:
            held = self._open.get(host)
            if held is None or size < held[1]:
                held = (_Segment(host), 0, b"")
                self._open[host] = held
        segment, offset, rest = held
        if size == offset:
            return
        with path.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read(size - offset)
        now = time.monotonic()
        *complete, rest = (rest + chunk).split(b"\n")
        with self._lock:
            segment.lines.extend(_Line(now, c.decode(errors="replace")) for c in complete)
            self._open[host] = (segment, offset + len(chunk), rest)


class _StepWatcher:
    """Polls the instance's running operation every STEP_POLL_S: when each step was first
    seen (wall clock, as the controller's timestamps)."""

    def __init__(self, client: FleetClient, instance: str) -> None:
        self.client = client
        self.instance = instance
        self.steps: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fvbench-steps", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        op_id = ""
        while not self._stop.is_set():
            with contextlib.suppress(ApiError, KeyError):
                if not op_id:
                    ops = self.client.operations(instance=self.instance, state="running")
                    op_id = next((o["id"] for o in ops if o["kind"] == "migrate"), "")
                if op_id:
                    op = self.client.operation(op_id)
                    if op["state"] != "running":
                        return
                    if not self.steps or self.steps[-1][1] != op["step"]:
                        self.steps.append((time.time(), op["step"]))
            self._stop.wait(STEP_POLL_S)

    def halt(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.client.close()

    def spans(self, op: dict[str, Any]) -> dict[str, float]:
        """Milliseconds spent in each step of the ended operation `op`: from a step's first
        sighting to the next one's; the first starts at the operation's creation and the
        last ends at its last update (so each span is within about STEP_POLL_S)."""
        if not self.steps:
            return {}
        marks = [(float(op["created_at"]), self.steps[0][1]), *self.steps[1:]]
        marks.append((float(op["updated_at"]), "end"))
        spans: dict[str, float] = {}
        for (began, step), (ended, _next) in zip(marks, marks[1:], strict=False):
            spans[step] = round(spans.get(step, 0.0) + max(0.0, ended - began) * 1000, 1)
        return spans


class _Run:
    def __init__(self, config: MigrateBenchConfig, fleet: ThrowawayFleet) -> None:
        self.config = config
        self.fleet = fleet
        self.client = fleet.client
        self.watcher: _LogWatcher | None = None
        self.instance_id = ""
        self.starts = 0  # times the instance's process started (the count in /data/starts)
        self.cli_env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETVISOR_")}
        self.cli_env |= {"FLEETVISOR_URL": fleet.url, "FLEETVISOR_TOKEN": fleet.token}

    # -- the instance ----------------------------------------------------------------------

    def start_instance(self) -> None:
        config = self.config
        body = {
            "name": INSTANCE,
            "image": self.fleet.image.ref,
            "command": ["sh", "-c", SCRIPT],
            "env": {"MEM_MB": str(config.memory_mib), "TICK_MS": str(config.tick_ms)},
            "resources": {
                "vcpus": config.cpu_millicores,
                "memory": config.memory_mib + config.headroom_mib,
            },
        }
        accepted = self.client.create_instance(body)
        self.instance_id = accepted["instance"]["id"]
        op = self.client.wait_operation(accepted["operation"]["id"], timeout=config.timeout_s)
        if op["state"] != "succeeded":
            raise BenchError(f"{INSTANCE} did not start: {op['error'] or op['state']}")
        self.watcher = _LogWatcher({h: self._log_path(h) for h in self.fleet.hosts})
        self.starts = 1
        self._settle(self.host())

    def host(self) -> str:
        return str(self.client.instance(INSTANCE)["host"])

    def _layout(self, host: str) -> Layout:
        """The runc driver's paths on `host` (what its agent keeps where)."""
        driver_dir = self.fleet.agent_dir(host) / STATE_SUBDIR
        return Layout(driver_dir, default_agent_id(driver_dir))

    def _log_path(self, host: str) -> Path:
        return self._layout(host).log(self.instance_id)

    def _settle(self, host: str, after: int = 0) -> _Segment:
        """Wait until the file on `host` has SETTLE_LINES counter lines after `after`."""
        assert self.watcher is not None
        deadline = time.monotonic() + self.config.timeout_s
        while True:
            segment = self.watcher.current(host)
            if segment is not None:
                counts = [n for _t, n in segment.counters() if n > after or after == 0]
                if len(counts) >= SETTLE_LINES:
                    return segment
            if time.monotonic() > deadline:
                tail = segment.lines[-5:] if segment else "no log file"
                raise BenchError(
                    f"{INSTANCE} printed no {SETTLE_LINES} counts on {host} within "
                    f"{self.config.timeout_s:.0f}s; its log ends: {tail}"
                )
            time.sleep(0.02)

    # -- one migration ---------------------------------------------------------------------

    def migrate(self, mode: str) -> dict[str, Any]:
        assert self.watcher is not None
        source = self.host()
        target = next(h for h in self.fleet.hosts if h != source)
        before = self._settle(source)
        steps = _StepWatcher(FleetClient(self.fleet.url, self.fleet.token), INSTANCE)
        try:
            op, total_s = self._cli("migrate", INSTANCE, f"--{mode}", "--to", target, "--json")
        finally:
            steps.halt()
        span = steps.spans(op)
        result = op.get("result") or {}
        if op.get("state") != "succeeded":
            raise BenchError(
                f"{mode} migration of {INSTANCE} ended {op.get('state')}: {op.get('error')}"
            )
        if result.get("mode") != mode:
            raise BenchError(f"asked for a {mode} migration, the operation did {result}")
        if self.host() != target:
            raise BenchError(f"{INSTANCE} is on {self.host()} after a migration to {target}")
        if mode == "cold":
            self.starts += 1
        # the source printed its last line before it stopped: its segment is complete
        last = before.counters()[-1][1]
        after = self._settle(target, after=last if mode == "live" else 0)
        sample = {
            "source": source,
            "target": target,
            "downtime_ms": float(result["downtime_ms"]),
            "dump_ms": round(float(result.get("dump_s") or 0.0) * 1000, 1),
            "package_bytes": int(result.get("package_bytes") or 0),
            "total_s": round(total_s, 3),
            "operation_s": round(float(op["updated_at"]) - float(op["created_at"]), 3),
            "steps_ms": span,
        }
        sample |= self._target_detail(target, str(op["id"]))
        return sample | self._observed(mode, before, after)

    def _target_detail(self, target: str, op_id: str) -> dict[str, float | None]:
        """Where the target's time went, when its agent and driver say (None otherwise):
        the agent's log line for the migration (package pulled after X s, instance running
        after Y s) and the driver's record of its `runc restore` (live only)."""
        detail: dict[str, float | None] = {
            "target_pull_ms": None,
            "target_running_ms": None,
            "target_restore_ms": None,
        }
        with contextlib.suppress(OSError):
            log = (self.fleet.state_dir / "logs" / f"{target}.log").read_text(errors="replace")
            if found := re.search(AGENT_LINE.format(re.escape(op_id)), log):
                detail["target_pull_ms"] = round(float(found.group(1)) * 1000, 1)
                detail["target_running_ms"] = round(float(found.group(2)) * 1000, 1)
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            record = json.loads(self._layout(target).record(self.instance_id).read_text())
            restored = record.get("restored") or {}
            if restored.get("restore_s") is not None and op_id in str(restored.get("from")):
                detail["target_restore_ms"] = round(float(restored["restore_s"]) * 1000, 1)
        return detail

    def _observed(self, mode: str, before: _Segment, after: _Segment) -> dict[str, Any]:
        """What memcounter's output says: the gap, and whether its state went along.
        `before`: every line it printed on the source; `after`: the target's so far."""
        last_at, last = before.counters()[-1]
        target_counts = after.counters()
        first_at, first = target_counts[0]
        values = [n for _t, n in target_counts]
        consecutive = values == list(range(first, first + len(values)))
        if mode == "live":
            # one process all along: the count goes on where it was, it never starts again
            preserved = consecutive and first > last and first != 1
        else:
            # a new process: the count starts at 1; /data/starts travelled with the files
            preserved = consecutive and first == 1 and after.starts() == [self.starts]
        interval_ms = (first_at - last_at) * 1000
        return {
            "observed_gap_ms": round(interval_ms - self.config.tick_ms, 1),
            "observed_interval_ms": round(interval_ms, 1),
            "last_count_on_source": last,
            "first_count_on_target": first,
            "starts": after.starts(),
            "state_preserved": preserved,
        }

    def _cli(self, *args: str) -> tuple[dict[str, Any], float]:
        """`fleetvisor ARGS` against the throwaway fleet: its JSON and its wall time."""
        argv = [sys.executable, "-m", "fleetvisor", *args]
        began = time.monotonic()
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=self.cli_env,
                timeout=self.config.timeout_s,
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"`fleetvisor {' '.join(args)}` took over {exc.timeout:.0f}s") from exc
        elapsed = time.monotonic() - began
        try:
            answer: dict[str, Any] = json.loads(done.stdout)
        except ValueError:
            raise BenchError(
                f"`fleetvisor {' '.join(args)}` failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            ) from None
        return answer, elapsed

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        if self.instance_id:
            with contextlib.suppress(ApiError):  # the agents remove it at exit anyway
                self.client.wait_operation(
                    self.client.delete_instance(INSTANCE)["id"], timeout=self.config.timeout_s
                )


# ------------------------------------------------------------------------------- the floor


def _raw_floor(
    criu: Any, mem_mb: int, workdir: Path, binary: Path, config: MigrateBenchConfig
) -> dict[str, Any]:
    """One bare CRIU dump + restore of memcounter (runs in the helper process)."""
    from fleetvisor.drivers.runc.criu_floor import raw_criu_roundtrip
    from fleetvisor.errors import DriverError

    try:
        found = asyncio.run(
            raw_criu_roundtrip(
                criu,
                mem_mb,
                workdir,
                binary=binary,
                tick_ms=config.tick_ms,
                timeout=config.timeout_s,
            )
        )
    except DriverError as exc:
        raise BenchError(f"the raw CRIU round trip failed: {exc}") from exc
    return {
        "dump_ms": round(found["dump_s"] * 1000, 1),
        "restore_ms": round(found["restore_s"] * 1000, 1),
        "total_ms": round(found["total_ms"], 1),
        "image_bytes": int(found["image_bytes"]),
        "counter_at_dump": found["counter_at_dump"],
        "counter_after_restore": found["counter_after_restore"],
    }


# ------------------------------------------------------------------------------- figures


def _median(values: list[float]) -> float:
    return round(float(statistics.median(values)), 1)


def _report(
    config: MigrateBenchConfig,
    samples: list[dict[str, Any]],
    load_average: tuple[float, float],
) -> dict[str, Any]:
    def of(mode: str, key: str) -> list[float]:
        return [float(s[mode][key]) for s in samples]

    live = _median(of("live", "downtime_ms"))
    raw = _median(of("raw", "total_ms"))
    ratio = round(live / raw, 2) if raw > 0 else None
    steps: dict[str, list[float]] = {}
    for sample in samples:
        for step, ms in sample["live"]["steps_ms"].items():
            steps.setdefault(step, []).append(ms)
    detail: dict[str, float | None] = {}
    for key in ("dump_ms", "target_pull_ms", "target_restore_ms", "target_running_ms"):
        known = [float(s["live"][key]) for s in samples if s["live"].get(key) is not None]
        detail[key.removeprefix("target_")] = _median(known) if known else None
    return {
        "benchmark": "migrate",
        "memory_mib": config.memory_mib,
        "tick_ms": config.tick_ms,
        "rounds": config.rounds,
        "instance": {
            "vcpus": config.cpu_millicores,
            "memory_mib": config.memory_mib + config.headroom_mib,
        },
        "live_downtime_ms": live,
        "cold_downtime_ms": _median(of("cold", "downtime_ms")),
        "raw_criu_ms": raw,
        "raw_dump_ms": _median(of("raw", "dump_ms")),
        "raw_restore_ms": _median(of("raw", "restore_ms")),
        "live_over_raw": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio is not None and ratio <= TARGET_RATIO,
        "state_preserved": all(
            s[mode]["state_preserved"] for s in samples for mode in ("live", "cold")
        ),
        "live_observed_gap_ms": _median(of("live", "observed_gap_ms")),
        "cold_observed_gap_ms": _median(of("cold", "observed_gap_ms")),
        "live_total_s": round(statistics.median(of("live", "total_s")), 3),
        "cold_total_s": round(statistics.median(of("cold", "total_s")), 3),
        "live_operation_s": round(statistics.median(of("live", "operation_s")), 3),
        "cold_operation_s": round(statistics.median(of("cold", "operation_s")), 3),
        "live_steps_ms": {step: _median(ms) for step, ms in steps.items()},
        "live_breakdown_ms": detail,
        "package_bytes": int(statistics.median(of("live", "package_bytes"))),
        "cold_package_bytes": int(statistics.median(of("cold", "package_bytes"))),
        "raw_image_bytes": int(statistics.median(of("raw", "image_bytes"))),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_start": round(load_average[0], 2),
        "load_average_end": round(load_average[1], 2),
        "samples": samples,
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The human table of `fleetvisor bench migrate` (without --json)."""
    lines = [
        f"memcounter {result['memory_mib']} MiB, tick {result['tick_ms']} ms, "
        f"{result['rounds']} round(s), medians",
        f"  {'':<5} {'downtime':>10} {'observed':>10} {'CLI wall':>9} {'package':>11}",
    ]
    for mode in ("live", "cold"):
        package = result["package_bytes" if mode == "live" else "cold_package_bytes"]
        lines.append(
            f"  {mode:<5} {result[f'{mode}_downtime_ms']:>7.0f} ms "
            f"{result[f'{mode}_observed_gap_ms']:>7.0f} ms "
            f"{result[f'{mode}_total_s']:>7.2f} s {package / 2**20:>7.1f} MiB"
        )
    lines += [
        f"  {'raw':<5} {result['raw_criu_ms']:>7.0f} ms {'':>10} {'':>9} "
        f"{result['raw_image_bytes'] / 2**20:>7.1f} MiB  (dump "
        f"{result['raw_dump_ms']:.0f} + restore {result['raw_restore_ms']:.0f})",
        f"  live / raw {result['live_over_raw']} (target <= {result['target_ratio']}: "
        f"{'met' if result['meets_target'] else 'not met'}); "
        f"state preserved: {result['state_preserved']}",
    ]
    if result.get("live_steps_ms"):
        order = ("place", "prepare_target", "pack", "run_on_target", "clean_source")
        spans = sorted(
            result["live_steps_ms"].items(),
            key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order),
        )
        steps = ", ".join(f"{k} {v:.0f}" for k, v in spans)
        lines.append(f"  live steps (ms): {steps}")
    return lines
