"""`fleetvisor bench ...`: benchmarks that print JSON with a baseline measured in the same run."""

from __future__ import annotations

import contextlib
import shlex
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fleetvisor.cli.output import emit_json, fail
from fleetvisor.model.resources import parse_cpu, parse_size_mib

bench_app = typer.Typer(
    help="Benchmarks: each prints JSON with its figure and a baseline measured in the same run.",
    no_args_is_help=True,
)
stderr = Console(stderr=True, highlight=False)


@bench_app.command("launch")
def launch(
    image: Annotated[
        str,
        typer.Option(
            help="busybox, minbase (Debian minbase, built once with debootstrap and cached), "
            "or the path of an OCI layout directory or OCI / `docker save` archive."
        ),
    ],
    count: Annotated[int, typer.Option(min=1, help="Launches measured per mode.")] = 10,
    command: Annotated[
        str, typer.Option(help="What each instance runs; it must keep running.")
    ] = "sleep 3600",
    cpu: Annotated[str, typer.Option(help="CPU of each instance, e.g. 0.5 or 500m.")] = "0.5",
    memory: Annotated[str, typer.Option(help="Memory of each instance, e.g. 256M.")] = "256M",
    rootfs_cache: Annotated[
        Path | None,
        typer.Option(help="Where built base trees are kept [default: ~/.cache/fleetvisor/rootfs]."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Only the JSON document (no progress bar, no table).")
    ] = False,
) -> None:
    """API-call-to-running latency (p50, p95): cold cache, cached, and raw `runc run -d`.

    Starts a throwaway fleet (runc, one host, temp state dir), imports IMAGE into it,
    measures COUNT launches per mode and removes everything it made. Needs root.
    """
    from fleetvisor.bench.launch import LaunchBenchConfig, run_launch_bench
    from fleetvisor.client import ApiError
    from fleetvisor.errors import FleetvisorError

    if not shlex.split(command):
        fail("--command must not be empty, e.g. --command 'sleep 3600'")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # clean up on SIGTERM as on Ctrl-C
    try:
        config = LaunchBenchConfig(
            image=image,
            count=count,
            command=tuple(shlex.split(command)),
            cpu_millicores=parse_cpu(cpu),
            memory_mib=parse_size_mib(memory),
            **({"rootfs_cache": rootfs_cache} if rootfs_cache else {}),
        )
        with _progress_bar(show=not as_json) as progress:
            result = run_launch_bench(config, progress)
    except (ApiError, FleetvisorError) as exc:  # BenchError is a FleetvisorError
        fail(str(exc))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not as_json:
        _print_table(result)
    emit_json(result)


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _progress_bar(show: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A Rich progress bar on stderr, fed by the benchmark's progress(what, done, total)."""
    if not show:
        yield None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn())
    with Progress(
        *columns,
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=1)
        yield lambda what, done, total: bar.update(
            task, description=what, completed=done, total=total
        )


def _print_table(result: dict[str, Any]) -> None:
    stderr.print(
        f"[bold]{result['image_ref']}[/bold]: {result['image_bytes'] / 1e6:.1f} MB, "
        f"{result['count']} launch(es) per mode"
    )
    for mode in ("cold", "cached", "raw_runc"):
        stderr.print(
            f"  {mode:<9} p50 {result[f'{mode}_p50_ms']:>8.1f} ms   "
            f"p95 {result[f'{mode}_p95_ms']:>8.1f} ms"
        )
    met = result["cached_over_raw_target_met"]
    stderr.print(f"  cached/raw  {result['cached_over_raw']:.2f}  (target <= 1.5: {met})")
    cold_met = result["cold_over_cached_target_met"]
    stderr.print(
        f"  cold/cached {result['cold_over_cached']:.2f}  (target >= 5"
        + (f": {cold_met})" if cold_met is not None else ", only for images >= 30 MB)")
    )


@bench_app.command("placement")
def placement(
    hosts: Annotated[int, typer.Option(min=10, help="Hosts in the synthetic fleet.")] = 5000,
    instances: Annotated[int, typer.Option(min=1, help="Instances to place.")] = 10000,
    groups: Annotated[int, typer.Option(min=0, help="Hard anti-affinity groups.")] = 1000,
    api_hosts: Annotated[int, typer.Option(min=1, help="Hosts behind the API run.")] = 500,
    api_instances: Annotated[int, typer.Option(min=1, help="Creates through the API.")] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed of the synthetic fleet.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Only the JSON object.")] = False,
) -> None:
    """Placement engine speed (basic, hard anti-affinity), violations, hosts used against the
    CP-SAT optimum, and creates/s through the API's batch endpoint, all in one run."""
    from fleetvisor.bench import placement as engine_bench
    from fleetvisor.bench import placement_api

    with stderr.status("placing on the synthetic fleet…"):
        engine = engine_bench.run(hosts, instances, groups, seed)
    with stderr.status("creating through the API…"):
        api = placement_api.run(api_hosts, api_instances)
    ratios = [o["batch_ratio_to_optimum"] for o in engine["optimality"]]
    result = {
        "hosts": hosts,
        "instances": instances,
        "engine_placements_per_s": engine["basic"]["placements_per_s"],
        "engine_anti_affinity_placements_per_s": engine["hard_anti_affinity"]["placements_per_s"],
        "first_fit_placements_per_s": engine["basic"]["first_fit_placements_per_s"],
        **api,
        "violations": engine["basic"]["group_violations"]
        + engine["hard_anti_affinity"]["group_violations"],
        "oversubscribed_hosts": engine["basic"]["oversubscribed_hosts"]
        + engine["hard_anti_affinity"]["oversubscribed_hosts"],
        "hosts_used_over_optimum": max(ratios) if ratios else None,
        "detail": engine,
    }
    emit_json(result)


@bench_app.command("boot")
def boot(
    runs: Annotated[int, typer.Option(min=1, max=50, help="Interleaved runs of each start.")] = 5,
    as_json: Annotated[
        bool, typer.Option("--json", help="Only the JSON document (no progress spinner).")
    ] = False,
) -> None:
    """Measured boot over a swtpm: the chain's cost against a plain agent start in the same
    run, and how many tamper cases (changed code, stale nonce, foreign key, rollback...)
    leave the host untrusted. Prints JSON: plain_start_s, measured_start_s, overhead_s,
    tamper_cases_detected, tamper_cases_total, and the breakdown."""
    from fleetvisor.trust.bench import measure_boot_overhead
    from fleetvisor.trust.errors import ToolsMissing

    status = "booting plain and measured agents…"
    try:
        with contextlib.nullcontext() if as_json else stderr.status(status):
            result = measure_boot_overhead(runs=runs)
    except ToolsMissing as exc:
        fail(str(exc))
    emit_json(result)


@bench_app.command("vm")
def vm(
    rounds: Annotated[int, typer.Option(min=1, max=20, help="Interleaved rounds.")] = 5,
    memory: Annotated[str, typer.Option(help="Guest memory, e.g. 256M.")] = "256M",
    accel: Annotated[str, typer.Option(help="auto (boot test), kvm or tcg.")] = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Only the JSON document (no progress spinner).")
    ] = False,
) -> None:
    """The QEMU driver against raw QEMU (same command line, QMP by hand): boot to ready,
    snapshot, restore and live-migration downtime, their ratios (target <= 1.2) and
    whether the guest carried on. Needs root, QEMU and scripts/deps/qemu.sh's kernel."""
    import asyncio

    from fleetvisor.bench.vm import VmBenchConfig, run_vm_bench
    from fleetvisor.errors import DriverError, FleetvisorError
    from fleetvisor.images.build import RootfsBuildError

    config = VmBenchConfig(rounds=rounds, memory_mib=parse_size_mib(memory), accel=accel)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with contextlib.nullcontext() if as_json else stderr.status("booting VMs…"):
            result = asyncio.run(run_vm_bench(config))
    except (FleetvisorError, DriverError, RootfsBuildError) as exc:
        fail(str(exc))
    finally:
        signal.signal(signal.SIGTERM, previous)
    emit_json(result)


@bench_app.command("local-scaling")
def local_scaling(
    work_us: Annotated[
        int, typer.Option(min=100, help="CPU microseconds each request costs the service.")
    ] = 20_000,
    low_rps: Annotated[float, typer.Option(min=1, help="Requests/s in the low phases.")] = 13.0,
    ramp: Annotated[float, typer.Option(min=1, help="High phase = RAMP x low.")] = 4.0,
    low_s: Annotated[float, typer.Option(min=1, help="Seconds of the first low phase.")] = 8.0,
    high_s: Annotated[float, typer.Option(min=1, help="Seconds of the high phase.")] = 12.0,
    cool_s: Annotated[
        float, typer.Option(min=1, help="Seconds of the last low phase (time to fold back).")
    ] = 14.0,
    seed: Annotated[int, typer.Option(help="Seed of the Poisson arrivals.")] = 1,
    as_json: Annotated[
        bool, typer.Option("--json", help="Only the JSON document (no progress bar, no table).")
    ] = False,
) -> None:
    """A one-worker HTTP service under a load ramp (low -> RAMP x low -> low), statically
    sized and then with a local scaling policy: p95 and throughput per phase, trigger ->
    sibling serving, request errors, and whether the host's allocation stayed the same.

    Starts a throwaway fleet (runc, one host, temp state dir) and removes everything it
    made. Needs root, gcc and a static libc (Debian: gcc libc6-dev).
    """
    from fleetvisor.bench.local_scaling import LocalScalingConfig, run_local_scaling_bench
    from fleetvisor.client import ApiError
    from fleetvisor.errors import FleetvisorError
    from fleetvisor.images.build import RootfsBuildError, WorkloadBuildError

    config = LocalScalingConfig(
        work_us=work_us,
        low_rps=low_rps,
        ramp=ramp,
        low_s=low_s,
        high_s=high_s,
        cool_s=cool_s,
        seed=seed,
    )
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with _progress_bar(show=not as_json) as progress:
            result = run_local_scaling_bench(config, progress)
    except (ApiError, FleetvisorError, RootfsBuildError, WorkloadBuildError) as exc:
        fail(str(exc))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not as_json:
        for mode in ("static", "scaled"):
            phases = result["per_phase"][mode]
            stderr.print(
                f"  {mode:<7}"
                + "".join(
                    f"  {name}: p95 {p['p95_ms'] or 0:>7.1f} ms {p['throughput_rps']:>6.1f}/s"
                    for name, p in phases.items()
                )
            )
        stderr.print(
            f"  reaction {result['reaction_s']} s, p95 high static/scaled "
            f"{result['p95_high_static_over_scaled']}, errors {result['request_errors']}, "
            f"allocation conserved: {result['host_allocation_conserved']}"
        )
    emit_json(result)


@bench_app.command("migrate")
def migrate(
    memory: Annotated[str, typer.Option(help="Memory memcounter holds, e.g. 100M.")] = "100M",
    rounds: Annotated[
        int, typer.Option(min=1, max=50, help="Rounds of live, cold and raw CRIU.")
    ] = 3,
    as_json: Annotated[
        bool, typer.Option("--json", help="Only the JSON document (no progress bar, no table).")
    ] = False,
) -> None:
    """Live and cold migration of a runc instance against bare CRIU: downtime (the
    operation's and as seen in the workload's output), CLI wall time, package size, and
    whether the state went along, with live / raw CRIU (target <= 1.5).

    Starts a throwaway 2-host runc fleet, runs memcounter holding MEMORY, migrates it back
    and forth, and removes everything it made. Needs root, runc, CRIU >= 4.1
    (scripts/deps/criu.sh), busybox-static and gcc with a static libc.
    """
    from fleetvisor.bench.migrate import MigrateBenchConfig, run_migrate_bench, summary_lines
    from fleetvisor.client import ApiError
    from fleetvisor.errors import FleetvisorError
    from fleetvisor.images.build import RootfsBuildError, WorkloadBuildError

    config = MigrateBenchConfig(memory_mib=parse_size_mib(memory), rounds=rounds)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with _progress_bar(show=not as_json) as progress:
            result = run_migrate_bench(config, progress)
    except (ApiError, FleetvisorError, RootfsBuildError, WorkloadBuildError) as exc:
        fail(str(exc))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not as_json:
        for line in summary_lines(result):
            stderr.print(line, markup=False, soft_wrap=True)
    emit_json(result)
