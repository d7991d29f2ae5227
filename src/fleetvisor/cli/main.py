"""The `fleetvisor` command: thin over the Python client (every command is one client call).

fleetvisor up --hosts 3          a local fleet: controller + 3 agents (sim driver)
fleetvisor run web-1 --image busybox --cpu 0.5 --memory 256M
fleetvisor ls | show | stop | start | rm | hosts | events --follow   (each with --json)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fleetvisor import __version__
from fleetvisor.cli import migration, output
from fleetvisor.cli.bench import bench_app
from fleetvisor.cli.images import cache_app, image_app
from fleetvisor.cli.output import console, emit_json, fail, styled, table
from fleetvisor.cli.scaling import scaling_app
from fleetvisor.cli.trust import (
    LoaderConfigOpt,
    MeasuredBootOpt,
    ReleaseDirOpt,
    SwtpmOpt,
    TpmDirOpt,
    boot_options,
    host_app,
    release_app,
)
from fleetvisor.client import ApiError, FleetClient, connect_local
from fleetvisor.client.client import DEFAULT_PORT, default_state_dir
from fleetvisor.errors import FleetvisorError
from fleetvisor.model.resources import parse_cpu, parse_size_gib, parse_size_mib

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    help="fleetvisor: a control plane for fleets of virtualization hosts.\n\n"
    "Start a local fleet with [bold]fleetvisor up --hosts 3[/bold], then run "
    "instances on it from another shell.",
)
hosts_app = typer.Typer(help="Hosts of the fleet: list (default), show, drain, ready.")
op_app = typer.Typer(
    help="Operations: the long-running actions (create, start, stop, rm).", no_args_is_help=True
)
site_app = typer.Typer(help="Sites (datacenters).", no_args_is_help=True)
cluster_app = typer.Typer(help="Clusters of hosts inside a site.", no_args_is_help=True)
group_app = typer.Typer(
    help="Placement groups: affinity or anti-affinity of instances.", no_args_is_help=True
)
app.add_typer(hosts_app, name="hosts")
app.add_typer(op_app, name="op")
app.add_typer(site_app, name="site")
app.add_typer(cluster_app, name="cluster")
app.add_typer(group_app, name="group")
app.add_typer(image_app, name="image")
app.add_typer(cache_app, name="cache")
app.add_typer(bench_app, name="bench")
app.add_typer(scaling_app, name="scale-policy")
app.command()(migration.migrate)
app.command()(migration.drain)
app.add_typer(host_app, name="host")
app.add_typer(release_app, name="release")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
DriverOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--driver-opt", help="Driver option key=value (repeat), e.g. subnet=198.19.1.0/24."
    ),
]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir", envvar="FLEETVISOR_HOME", help="State directory [default: ~/.fleetvisor]."
    ),
]


class Ctx:
    url: str | None = None
    token: str | None = None
    state_dir: Path | None = None

    def client(self) -> FleetClient:
        try:
            return connect_local(self.url, self.token, self.state_dir)
        except ApiError as exc:
            fail(exc.detail)
            raise


ctx = Ctx()


@app.callback()
def _global(
    url: Annotated[
        str | None,
        typer.Option(
            "--url", envvar="FLEETVISOR_URL", help="Controller URL [default: from the state dir]."
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", envvar="FLEETVISOR_TOKEN", help="Admin token [default: from the state dir]."
        ),
    ] = None,
    state_dir: StateDirOpt = None,
) -> None:
    ctx.url, ctx.token, ctx.state_dir = url, token, state_dir


def main() -> None:
    try:
        app()
    except ApiError as exc:
        fail(exc.detail or exc.title)
    except FleetvisorError as exc:
        fail(exc.detail)


# -- processes ---------------------------------------------------------------------------------


@app.command()
def up(
    hosts: Annotated[int, typer.Option("--hosts", min=1, max=64, help="Number of agents.")] = 3,
    driver: Annotated[str, typer.Option(help="Driver of every agent.")] = "sim",
    state_dir: StateDirOpt = None,
    port: Annotated[int, typer.Option(help="Controller port (0 picks a free one).")] = DEFAULT_PORT,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            envvar="FLEETVISOR_DB",
            help="SQLAlchemy URL [default: SQLite in the state dir].",
        ),
    ] = None,
    heartbeat_interval: Annotated[float, typer.Option(min=0.05)] = 2.0,
    down_after: Annotated[
        int, typer.Option(min=1, help="Missed heartbeats before a host is down.")
    ] = 3,
    capacity: Annotated[
        str,
        typer.Option(
            help="Per-host capacity for the sim driver, e.g. cpu=16,memory=64G,disk=500,net=10000."
        ),
    ] = "",
    host_netns: Annotated[
        bool | None,
        typer.Option(
            "--host-netns/--no-host-netns",
            help="Each host in its own network namespace and address (root) "
            "[default: on for real drivers, off for sim].",
        ),
    ] = None,
    driver_opt: DriverOpt = None,
) -> None:
    """Start a local fleet: a controller and N agents as separate processes. Ctrl-C stops all."""
    from fleetvisor.fleet.local import FleetError, FleetOptions, LocalFleet

    state = state_dir or ctx.state_dir or default_state_dir()
    fleet = LocalFleet(
        FleetOptions(
            hosts=hosts,
            driver=driver,
            state_dir=state,
            port=port,
            db_url=db,
            heartbeat_interval=heartbeat_interval,
            down_after_missed=down_after,
            host_capacity=capacity,
            host_netns=host_netns,
            driver_options=driver_opt or [],
        ),
        say=lambda m: console.print(f"[yellow]{m}[/yellow]"),
    )
    stopping = {"now": False}

    def request_stop(_sig: int, _frame: Any) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("starting controller", total=hosts)

            def progress(what: str, done: int, total: int) -> None:
                bar.update(task, description=what, completed=done, total=total)

            fleet.start(progress)
    except FleetError as exc:
        fleet.stop()
        fail(str(exc))
    except BaseException:
        fleet.stop()
        raise
    console.print(f"[green]fleet up[/green]: controller + {hosts} {driver} agent(s)")
    console.print(f"  API         {fleet.url}   (OpenAPI: {fleet.url}/openapi.json)")
    console.print(f"  admin token {state / 'admin.token'}")
    console.print(f"  state       {state}   (logs in {state / 'logs'})")
    hint = "" if state == default_state_dir() else f"FLEETVISOR_HOME={state} "
    console.print(
        f"  try         {hint}fleetvisor run web-1 --image busybox --cpu 0.5 --memory 256M"
    )
    console.print(f"              {hint}fleetvisor dashboard   (live view; Ctrl-C leaves it)")
    console.print("Ctrl-C stops the fleet.")
    console.file.flush()  # a supervisor's output often goes to a file: show it now
    try:
        fleet.supervise(lambda: stopping["now"])
    finally:
        console.print("stopping the fleet…")
        fleet.stop()
        console.print("fleet stopped")


@app.command()
def controller(
    state_dir: StateDirOpt = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            envvar="FLEETVISOR_DB",
            help="SQLAlchemy URL [default: SQLite in the state dir].",
        ),
    ] = None,
    listen: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = DEFAULT_PORT,
    heartbeat_interval: Annotated[float, typer.Option(min=0.05)] = 2.0,
    down_after: Annotated[int, typer.Option(min=1)] = 3,
    operation_timeout: Annotated[float, typer.Option(min=1.0)] = 120.0,
    scheduler_config: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            help='Placement settings as JSON, e.g. {"weights": {"resource_fit": 1, '
            '"load_forecast": 2}, "fit_strategy": "spread"}.',
        ),
    ] = None,
) -> None:
    """Run the controller: REST API, operations, health checks, OCI registry."""
    import json

    from fleetvisor.controller.serve import serve
    from fleetvisor.controller.settings import ControllerSettings
    from fleetvisor.scheduler import SchedulerConfig, known_models

    _logging()
    serve(
        state_dir=state_dir or ctx.state_dir or default_state_dir(),
        db_url=db,
        listen=listen,
        port=port,
        settings=ControllerSettings(
            heartbeat_interval=heartbeat_interval,
            down_after_missed=down_after,
            operation_timeout=operation_timeout,
        ),
        scheduler=SchedulerConfig.from_mapping(
            json.loads(scheduler_config.read_text()), known_models()
        )
        if scheduler_config
        else None,
    )


@app.command()
def agent(
    controller_url: Annotated[str, typer.Option("--controller", help="Controller URL.")],
    name: Annotated[str, typer.Option(help="Host name [default: this machine's].")] = "",
    token: Annotated[
        str | None, typer.Option(envvar="FLEETVISOR_TOKEN", help="Token allowed to register hosts.")
    ] = None,
    token_file: Annotated[Path | None, typer.Option(help="Read the token from this file.")] = None,
    driver: Annotated[str, typer.Option(help="Instance driver: sim.")] = "sim",
    state_dir: Annotated[Path | None, typer.Option(help="Agent state directory.")] = None,
    cluster: Annotated[str, typer.Option(help="Cluster to join.")] = "default",
    label: Annotated[list[str] | None, typer.Option(help="Host label key=value (repeat).")] = None,
    listen: Annotated[str, typer.Option(help="Address of the agent API.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Agent API port (0 picks a free one).")] = 0,
    capacity: Annotated[str, typer.Option(help="sim driver: host capacity.")] = "",
    seed: Annotated[int, typer.Option(help="sim driver: workload seed.")] = 0,
    driver_opt: DriverOpt = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="The machine's shared image cache (one for every agent on it) "
            "[default: /var/lib/fleetvisor/cache]."
        ),
    ] = None,
    cache_budget: Annotated[
        str, typer.Option(help="Size the image cache may fill, e.g. 20G.")
    ] = "20G",
    measured_boot: MeasuredBootOpt = False,
    loader_config: LoaderConfigOpt = Path("/etc/fleetvisor/loader.json"),
    tpm_dir: TpmDirOpt = None,
    swtpm: SwtpmOpt = False,
    release_dir: ReleaseDirOpt = None,
    remove_instances_and_exit: Annotated[
        bool,
        typer.Option(hidden=True, help="Destroy this host's instances, then exit (cleanup)."),
    ] = False,
    destroy_on_exit: Annotated[
        bool,
        typer.Option(
            help="Remove this host's instances when the agent exits "
            "(throwaway fleets; real hosts keep them running)."
        ),
    ] = False,
) -> None:
    """Run a host agent: registers with the controller and runs instances through a driver."""
    from fleetvisor.agent.runtime import run_agent

    _logging()
    secret = token or (token_file.read_text().strip() if token_file else None)
    if not secret:
        fail("pass --token, --token-file or FLEETVISOR_TOKEN: the controller's admin token")
    host = name or os.uname().nodename.split(".")[0].lower()
    labels = dict(_key_value(item, "label") for item in (label or []))
    run_agent(
        name=host,
        controller_url=controller_url,
        token=secret or "",
        driver_kind=driver,
        state_dir=state_dir or default_state_dir() / "agents" / host,
        driver_options={
            **({"capacity": capacity} if capacity else {}),
            **({"seed": str(seed)} if driver == "sim" else {}),
            **dict(_key_value(item, "driver option") for item in driver_opt or []),
        },
        cache_dir=cache_dir or Path("/var/lib/fleetvisor/cache"),
        cache_budget=parse_size_mib(cache_budget, what="cache budget") << 20,
        destroy_on_exit=destroy_on_exit,
        remove_and_exit=remove_instances_and_exit,
        measured_boot=boot_options(measured_boot, loader_config, tpm_dir, swtpm, release_dir),
        cluster=cluster,
        labels=labels,
        listen=listen,
        port=port,
    )


# -- instances ---------------------------------------------------------------------------------


@app.command()
def run(
    name: Annotated[str, typer.Argument(help="Instance name (lowercase, digits, '-').")],
    image: Annotated[str, typer.Option(help="Image to run, e.g. busybox.")],
    cpu: Annotated[str, typer.Option(help="CPUs: 0.5, 2 or 250m.")] = "1",
    memory: Annotated[str, typer.Option(help="Memory: 256M, 2G.")] = "256M",
    disk: Annotated[str, typer.Option(help="Disk: 1G, 20G.")] = "1G",
    net: Annotated[int, typer.Option(help="Network Mbit/s.")] = 100,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE (repeat).")
    ] = None,
    label: Annotated[list[str] | None, typer.Option(help="key=value (repeat).")] = None,
    require_label: Annotated[
        list[str] | None, typer.Option(help="Only hosts with this label key=value (repeat).")
    ] = None,
    group: Annotated[str | None, typer.Option(help="Placement group.")] = None,
    driver: Annotated[str | None, typer.Option(help="Only hosts with this driver.")] = None,
    stopped: Annotated[bool, typer.Option("--stopped", help="Create but do not start.")] = False,
    secure: Annotated[
        bool, typer.Option("--secure", help="A secure instance (requires a trusted host).")
    ] = False,
    trusted_host: Annotated[
        bool | None,
        typer.Option(
            "--trusted-host/--any-host",
            help="Only hosts whose attestation is trusted [default: on with --secure].",
        ),
    ] = None,
    probe: Annotated[
        list[str] | None,
        typer.Option(
            help="A liveness probe (repeat): tcp:PORT, http:PORT/PATH or exec:COMMAND, "
            "optionally ;every=S;fail=N, e.g. 'http:8080/healthz;every=2;fail=3'.",
        ),
    ] = None,
    remedy: Annotated[
        list[str] | None,
        typer.Option(
            help="ISSUE=REMEDY (repeat), REMEDY restart, migrate or alert; ISSUE e.g. "
            "probe_failed, oom_killed, noisy_neighbour, restart_loop, host_down.",
        ),
    ] = None,
    health: Annotated[
        str | None,
        typer.Option(help="A whole health policy as JSON (probes, detectors, remedies)."),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait until it runs.")] = True,
    command: Annotated[list[str] | None, typer.Argument(help="Command and arguments.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an instance and start it; waits until it runs unless --no-wait.

    With --probe, --remedy or --health the instance is monitored: its host probes it and
    watches its counters (CPU throttling, memory, OOM kills, run-queue wait), restarts it
    in place, and the fleet migrates it when the policy says so (see DESIGN.md)."""
    body = {
        "name": name,
        "image": image,
        "resources": {
            "vcpus": parse_cpu(cpu),
            "memory": parse_size_mib(memory),
            "disk": parse_size_gib(disk),
            "net": net,
        },
        "command": command or [],
        "env": dict(_key_value(e, "env") for e in env or []),
        "labels": dict(_key_value(item, "label") for item in label or []),
        "placement_group": group,
        "required_labels": dict(_key_value(item, "label") for item in require_label or []),
        "driver": driver,
        "start": not stopped,
        "secure": secure,
        "trusted_host": trusted_host,
    }
    if probe or remedy or health:
        from fleetvisor.cli.health import health_policy

        body["health"] = health_policy(probe or [], remedy or [], health)
    client = ctx.client()
    accepted = client.create_instance(body)
    op = accepted["operation"]
    if wait:
        op = _wait(client, op, f"creating {name}")
    instance = client.instance(name) if op["state"] != "rolled_back" else accepted["instance"]
    if as_json:
        emit_json({"instance": instance, "operation": op})
    elif op["state"] in ("succeeded", "pending", "running"):
        console.print(f"{name}: {styled(instance['status'])} on {instance['host']}")
    if op["state"] in ("failed", "rolled_back"):
        fail(f"creating {name} {op['state'].replace('_', ' ')}: {op['error']}")


@app.command("ls")
def list_instances(
    host: Annotated[str | None, typer.Option(help="Only instances on this host.")] = None,
    status: Annotated[str | None, typer.Option(help="Only instances with this status.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List instances."""
    items = ctx.client().instances(host=host, status=status)
    if as_json:
        return emit_json(items)
    table(
        ["NAME", "STATUS", "HOST", "IMAGE", "CPU", "MEMORY", "GROUP"],
        [
            (
                i["name"],
                styled(i["status"]),
                i["host"],
                i["image"],
                output.cpu(i["resources"]["vcpus"]),
                f"{i['resources']['memory']}M",
                i["placement_group"],
            )
            for i in items
        ],
    )
    return None


@app.command()
def show(name: str, as_json: JsonOpt = False) -> None:
    """Show one instance, its recent operations and events."""
    client = ctx.client()
    instance = client.instance(name)
    ops = client.operations(instance=name, limit=5)
    recent = client.events(subject=f"instance/{name}", limit=1000)[-10:]
    if as_json:
        return emit_json({**instance, "operations": ops, "events": recent})
    r = instance["resources"]
    console.print(
        f"[bold]{instance['name']}[/bold]  {styled(instance['status'])}"
        f"{'  ' + instance['status_message'] if instance['status_message'] else ''}"
    )
    for key, value in [
        ("id", instance["id"]),
        ("host", instance["host"]),
        ("address", instance["address"]),
        ("image", instance["image"]),
        ("driver", instance["driver"]),
        ("desired", instance["desired_power"]),
        (
            "resources",
            f"{output.cpu(r['vcpus'])} cpu, {r['memory']} MiB, {r['disk']} GiB, {r['net']} Mbit/s",
        ),
        ("group", instance["placement_group"]),
        ("command", " ".join(instance["command"]) or "-"),
        ("created", output.ago(instance["created_at"])),
    ]:
        console.print(f"  {key:<10} {value if value is not None else '-'}")
    if instance.get("parent"):
        console.print(f"  {'sibling of':<10} {instance['parent']} (carved by its scaling policy)")
    if instance.get("scaling"):
        from fleetvisor.cli.scaling import _print_group
        from fleetvisor.model.scaling import ScalingPolicy

        policy = ScalingPolicy.model_validate(instance["scaling"])
        console.print(f"  {'scaling':<10} {policy.describe()}")
        _print_group(client.scaling_policy(name))
    if ops:
        table(
            ["OPERATION", "KIND", "STATE", "STEP", "ERROR"],
            [(o["id"][:12], o["kind"], styled(o["state"]), o["step"], o["error"]) for o in ops],
        )
    if recent:
        table(
            ["TIME", "EVENT", "MESSAGE"],
            [(output.clock(e["at"]), e["kind"], e["message"]) for e in recent],
        )
    return None


def _power(name: str, action: str, as_json: bool, wait: bool) -> None:
    client = ctx.client()
    call = {
        "start": client.start_instance,
        "stop": client.stop_instance,
        "rm": client.delete_instance,
    }[action]
    op = call(name)
    if wait:
        op = _wait(client, op, f"{action} {name}")
    if as_json:
        emit_json(op)
    elif op["state"] == "succeeded":
        console.print(f"{name}: {action} done" + (f" ({op['error']})" if op["error"] else ""))
    if op["state"] in ("failed", "rolled_back"):
        fail(f"{action} of {name} failed: {op['error']}")


@app.command()
def logs(
    name: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output.")
    ] = False,
    tail: Annotated[int | None, typer.Option(min=0, help="Only the last N lines.")] = None,
) -> None:
    """Print an instance's output (stdout/stderr of a container, console of a VM)."""
    import sys

    with contextlib.suppress(KeyboardInterrupt):
        for chunk in ctx.client().logs(name, follow=follow, tail=tail):
            sys.stdout.write(chunk)
            sys.stdout.flush()


@app.command()
def explain(name: str, as_json: JsonOpt = False) -> None:
    """Why an instance went where it went: hosts filtered out and why, scores per model."""
    placement = ctx.client().explain(name)
    if as_json:
        emit_json(placement)
    else:
        console.print(placement.get("text", ""), markup=False)


@app.command()
def rebalance(
    max_moves: Annotated[int, typer.Option(min=0, help="At most this many moves.")] = 10,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show the plan.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait for the moves to end.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Consolidate the fleet: a CP-SAT move plan that keeps every hard rule at every step
    (cold moves for now), then run it unless --dry-run."""
    client = ctx.client()
    plan = client.rebalance(max_moves, dry_run)
    if wait and plan["operations"]:
        with console.status("moving…") as status:
            for i, op_id in enumerate(plan["operations"], 1):
                status.update(f"move {i}/{len(plan['operations'])}")
                op = client.wait_operation(op_id)
                if op["state"] != "succeeded":
                    fail(f"move {i} ({op['instance']}) {op['state']}: {op['error']}")
    if as_json:
        emit_json(plan)
        return
    table(["INSTANCE", "FROM", "TO"], [(m["instance"], m["from"], m["to"]) for m in plan["moves"]])
    verb = "would use" if dry_run else "use"
    console.print(
        f"{len(plan['moves'])} move(s) ({plan['status']}); hosts {verb} "
        f"{plan['hosts_used_after']} instead of {plan['hosts_used_before']}"
    )


WaitOpt = Annotated[bool, typer.Option(help="Wait for the operation to end.")]


@app.command()
def start(name: str, wait: WaitOpt = True, as_json: JsonOpt = False) -> None:
    """Start a stopped instance."""
    _power(name, "start", as_json, wait)


@app.command()
def stop(name: str, wait: WaitOpt = True, as_json: JsonOpt = False) -> None:
    """Stop a running instance (it keeps its host and resources)."""
    _power(name, "stop", as_json, wait)


@app.command()
def rm(name: str, wait: WaitOpt = True, as_json: JsonOpt = False) -> None:
    """Remove an instance and release its resources."""
    _power(name, "rm", as_json, wait)


def _wait(client: FleetClient, op: dict[str, Any], what: str) -> dict[str, Any]:
    with console.status(f"{what}…") as status:
        return client.wait_operation(
            op["id"], on_update=lambda o: status.update(f"{what}: {o['state']} {o['step']}")
        )


# -- hosts -------------------------------------------------------------------------------------


@hosts_app.callback(invoke_without_command=True)
def hosts(typer_ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List hosts with state, heartbeat and allocation."""
    if typer_ctx.invoked_subcommand:
        return None
    items = ctx.client().hosts()
    if as_json:
        return emit_json(items)
    table(
        [
            "NAME",
            "STATE",
            "CLUSTER",
            "DRIVER",
            "CPU (alloc/cap)",
            "MEMORY MiB",
            "INSTANCES",
            "HEARTBEAT",
            "TRUST",
        ],
        [
            (
                h["name"],
                styled(h["state"]),
                h["cluster"],
                h["driver"],
                f"{output.cpu(h['allocated']['vcpus'])}/{output.cpu(h['capacity']['vcpus'])}",
                f"{h['allocated']['memory']}/{h['capacity']['memory']}",
                h["instances"],
                output.ago(h["last_heartbeat"]),
                styled(h.get("attestation_state", "unknown")),
            )
            for h in items
        ],
    )
    return None


@hosts_app.command("show")
def host_show(name: str, as_json: JsonOpt = False) -> None:
    """Show one host: capacity, allocation, capabilities, metrics, instances."""
    client = ctx.client()
    host = client.host(name)
    instances = client.instances(host=name)
    if as_json:
        return emit_json({**host, "instance_names": [i["name"] for i in instances]})
    console.print(
        f"[bold]{host['name']}[/bold]  {styled(host['state'])}  cluster {host['cluster']}"
    )
    for key in ("driver", "cpu_model", "agent_url"):
        console.print(f"  {key:<12} {host[key]}")
    console.print(f"  {'capabilities':<12} {', '.join(host['capabilities']) or '-'}")
    console.print(f"  {'heartbeat':<12} {output.ago(host['last_heartbeat'])}")
    table(
        ["RESOURCE", "CAPACITY", "ALLOCATED", "FREE", "USED (metrics)"],
        [
            (
                "cpu",
                output.cpu(host["capacity"]["vcpus"]),
                output.cpu(host["allocated"]["vcpus"]),
                output.cpu(host["free"]["vcpus"]),
                f"{host['metrics'].get('cpu_millicores', 0) / 1000:.2f}",
            ),
            (
                "memory MiB",
                host["capacity"]["memory"],
                host["allocated"]["memory"],
                host["free"]["memory"],
                f"{host['metrics'].get('memory_mib', 0):.0f}",
            ),
            (
                "disk GiB",
                host["capacity"]["disk"],
                host["allocated"]["disk"],
                host["free"]["disk"],
                "-",
            ),
            (
                "net Mbit/s",
                host["capacity"]["net"],
                host["allocated"]["net"],
                host["free"]["net"],
                f"{host['metrics'].get('net_mbps', 0):.1f}",
            ),
        ],
    )
    console.print(f"  instances: {', '.join(i['name'] for i in instances) or '-'}")
    counters = host.get("cache", {}).get("counters", {})
    if counters:
        from fleetvisor.cli.images import human

        latency = (
            f", launch p50 {counters['launch_p50_ms']:.0f} ms p95 "
            f"{counters['launch_p95_ms']:.0f} ms"
            if "launch_p50_ms" in counters
            else ""
        )
        console.print(
            f"  image cache: {len(host['cache'].get('layers', []))} layer(s), "
            f"{human(counters.get('total_bytes', 0))} of {human(counters.get('budget_bytes', 0))}; "
            f"hits {counters.get('hits', 0):.0f}, misses {counters.get('misses', 0):.0f}, "
            f"pulled {human(counters.get('bytes_pulled', 0))}, "
            f"saved by sharing {human(counters.get('bytes_saved', 0))}{latency}"
        )
    return None


@hosts_app.command("drain")
def host_drain(
    name: str,
    wait: Annotated[bool, typer.Option(help="Wait for every migration to end.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Empty a host: no new instances, and every instance migrates off (= fleetvisor drain)."""
    migration.drain(name, wait=wait, as_json=as_json)


@hosts_app.command("ready")
def host_ready(name: str, as_json: JsonOpt = False) -> None:
    """Let a drained host take new instances again."""
    host = ctx.client().set_host_state(name, "ready")
    emit_json(host) if as_json else console.print(f"{name}: {styled(host['state'])}")


# -- events and operations ---------------------------------------------------------------------


@app.command()
def events(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events.")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many recent events.")] = 20,
    kind: Annotated[
        str | None, typer.Option(help="Only kinds starting with this, e.g. host.")
    ] = None,
    subject: Annotated[
        str | None, typer.Option(help="Only this subject, e.g. instance/web-1.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the event log (the newest last); --follow streams new ones as they happen."""
    client = ctx.client()
    recent = client.events(limit=limit, kind=kind, subject=subject, tail=not (kind or subject))
    if kind or subject:
        recent = client.events(limit=1000, kind=kind, subject=subject)[-limit:]
    printer = _event_printer(as_json)
    for event in recent:
        printer(event)
    if not follow:
        return
    last = recent[-1]["id"] if recent else 0
    if not recent:
        newest = client.events(limit=1, tail=True)
        last = newest[-1]["id"] if newest else 0
    try:
        for event in client.follow_events(after=last, kind=kind, subject=subject):
            printer(event)
    except KeyboardInterrupt:
        pass


def _event_printer(as_json: bool):  # type: ignore[no-untyped-def]
    import json
    import sys

    def show_event(event: dict[str, Any]) -> None:
        if as_json:
            sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
            sys.stdout.flush()
        else:
            console.print(
                f"{output.clock(event['at'])}  [bold]{event['kind']:<24}[/bold] "
                f"{event['subject']:<22} {event['message']}"
            )

    return show_event


@op_app.command("ls")
def op_list(
    state: Annotated[str | None, typer.Option()] = None,
    instance: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    as_json: JsonOpt = False,
) -> None:
    """List recent operations."""
    items = ctx.client().operations(state=state, instance=instance, limit=limit)
    if as_json:
        return emit_json(items)
    table(
        ["ID", "KIND", "INSTANCE", "STATE", "STEP", "TRIES", "ERROR"],
        [
            (
                o["id"],
                o["kind"],
                o["instance"],
                styled(o["state"]),
                o["step"],
                o["attempts"],
                o["error"],
            )
            for o in items
        ],
    )
    return None


@op_app.command("show")
def op_show(op_id: str, as_json: JsonOpt = False) -> None:
    """Show one operation."""
    op = ctx.client().operation(op_id)
    if as_json:
        return emit_json(op)
    for key, value in op.items():
        console.print(f"  {key:<11} {value}")
    return None


@op_app.command("wait")
def op_wait(op_id: str, timeout: float = 300.0, as_json: JsonOpt = False) -> None:
    """Wait until an operation ends."""
    client = ctx.client()
    op = client.wait_operation(op_id, timeout=timeout)
    emit_json(op) if as_json else console.print(f"{op_id}: {styled(op['state'])} {op['error']}")


# -- inventory ---------------------------------------------------------------------------------


@site_app.command("ls")
def site_list(as_json: JsonOpt = False) -> None:
    """List sites."""
    items = ctx.client().sites()
    emit_json(items) if as_json else table(
        ["NAME", "CLUSTERS"], [(s["name"], s["clusters"]) for s in items]
    )


@site_app.command("create")
def site_create(name: str, as_json: JsonOpt = False) -> None:
    """Create a site."""
    site = ctx.client().create_site(name)
    emit_json(site) if as_json else console.print(f"site {name} created")


@site_app.command("rm")
def site_rm(name: str) -> None:
    """Remove an empty site."""
    ctx.client().delete_site(name)
    console.print(f"site {name} removed")


@cluster_app.command("ls")
def cluster_list(as_json: JsonOpt = False) -> None:
    """List clusters."""
    items = ctx.client().clusters()
    emit_json(items) if as_json else table(
        ["NAME", "SITE", "HOSTS"], [(c["name"], c["site"], c["hosts"]) for c in items]
    )


@cluster_app.command("create")
def cluster_create(
    name: str, site: Annotated[str, typer.Option()] = "default", as_json: JsonOpt = False
) -> None:
    """Create a cluster in a site."""
    cluster = ctx.client().create_cluster(name, site)
    emit_json(cluster) if as_json else console.print(f"cluster {name} created in site {site}")


@cluster_app.command("rm")
def cluster_rm(name: str) -> None:
    """Remove an empty cluster."""
    ctx.client().delete_cluster(name)
    console.print(f"cluster {name} removed")


@group_app.command("ls")
def group_list(as_json: JsonOpt = False) -> None:
    """List placement groups."""
    items = ctx.client().groups()
    if as_json:
        return emit_json(items)
    table(
        ["NAME", "POLICY", "STRENGTH", "SCOPE", "MAX/SCOPE", "MEMBERS"],
        [
            (g["name"], g["policy"], g["strength"], g["scope"], g["max_per_scope"], g["members"])
            for g in items
        ],
    )
    return None


@group_app.command("create")
def group_create(
    name: str,
    policy: Annotated[str, typer.Option(help="affinity or anti-affinity")],
    strength: Annotated[str, typer.Option(help="hard or soft")] = "hard",
    scope: Annotated[str, typer.Option(help="host, cluster or site")] = "host",
    max_per_scope: Annotated[int | None, typer.Option(min=1)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a placement group."""
    group = ctx.client().create_group(name, policy, strength, scope, max_per_scope)
    emit_json(group) if as_json else console.print(
        f"placement group {name}: {strength} {policy} per {scope}"
    )


@group_app.command("show")
def group_show(name: str, as_json: JsonOpt = False) -> None:
    """Show a placement group and its members."""
    group = ctx.client().group(name)
    if as_json:
        return emit_json(group)
    for key, value in group.items():
        console.print(f"  {key:<14} {value}")
    return None


@group_app.command("rm")
def group_rm(name: str) -> None:
    """Remove a placement group without members."""
    ctx.client().delete_group(name)
    console.print(f"placement group {name} removed")


@app.command()
def dashboard(
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
) -> None:
    """A live view of the fleet: hosts with allocation bars, instances, newest events."""
    from fleetvisor.cli.dashboard import run_dashboard

    with contextlib.suppress(KeyboardInterrupt):
        run_dashboard(ctx.client(), interval=interval, once=once)


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


def _key_value(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        fail(f"{what} {text!r} must look like key=value")
    return key, value


def _logging() -> None:
    logging.basicConfig(
        level=os.environ.get("FLEETVISOR_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
