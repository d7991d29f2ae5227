"""`fleetvisor scale-policy ...`: local scaling policies of instances."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from pydantic import ValidationError

from fleetvisor.cli import output
from fleetvisor.cli.output import console, emit_json, fail, table
from fleetvisor.model.resources import parse_cpu, parse_size_mib
from fleetvisor.model.scaling import METRICS, ScalingPolicy

scaling_app = typer.Typer(
    help=(
        "Local scaling: the instance's host carves part of its resources into a sibling on "
        "the same host when a metric stays high, and folds it back when load falls. The "
        "host's allocation does not change and no scheduling is involved."
    ),
    no_args_is_help=True,
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _ctx():  # type: ignore[no-untyped-def]
    from fleetvisor.cli.main import ctx

    return ctx


def parse_trigger(text: str) -> dict[str, Any]:
    """'cpu:0.8:0.3' -> carve at cpu >= 0.8, fold at cpu <= 0.3."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in METRICS:
        raise typer.BadParameter(
            f"{text!r}: write METRIC:ABOVE:BELOW with METRIC one of {', '.join(METRICS)}, "
            "e.g. cpu:0.8:0.3 or latency:200:50 (milliseconds)"
        )
    try:
        return {"metric": parts[0], "above": float(parts[1]), "below": float(parts[2])}
    except ValueError:
        raise typer.BadParameter(f"{text!r}: ABOVE and BELOW must be numbers") from None


@scaling_app.command("set")
def set_policy(
    name: Annotated[str, typer.Argument(help="The instance.")],
    metric: Annotated[
        list[str],
        typer.Option(
            "--metric",
            "-m",
            help=(
                "METRIC:ABOVE:BELOW, repeatable. cpu, memory and throttled are fractions of "
                "the group's allocation (cpu:0.8:0.3); latency is an HTTP probe of the "
                "service in ms (latency:200:50, needs --port). Carve when any metric stays "
                "at or above ABOVE; fold when all stay at or below BELOW."
            ),
        ),
    ],
    hold: Annotated[float, typer.Option(help="Seconds a metric must stay high.")] = 2.0,
    fold_hold: Annotated[float, typer.Option(help="Seconds all must stay low to fold.")] = 10.0,
    cooldown: Annotated[float, typer.Option(help="Seconds between two actions.")] = 30.0,
    carve: Annotated[float, typer.Option(help="Share of the parent a sibling gets.")] = 0.5,
    max_siblings: Annotated[int, typer.Option(help="At most this many siblings.")] = 1,
    min_cpu: Annotated[str, typer.Option(help="The parent keeps at least this CPU.")] = "100m",
    min_memory: Annotated[str, typer.Option(help="... and this memory.")] = "32M",
    port: Annotated[
        int | None,
        typer.Option(
            help="The port the service listens on inside the instance: the host then "
            "serves it at one endpoint spread over the parent and its siblings."
        ),
    ] = None,
    listen_port: Annotated[
        int | None, typer.Option(help="Host port of the service endpoint [default: any].")
    ] = None,
    probe_path: Annotated[str, typer.Option(help="Path the latency probe GETs.")] = "/",
    as_json: JsonOpt = False,
) -> None:
    """Set the instance's scaling policy (replaces the one it has).

    Example: fleetvisor scale-policy set web -m cpu:0.8:0.3 --hold 2 --port 8080
    """
    body = {
        "triggers": [parse_trigger(m) for m in metric],
        "hold_s": hold,
        "fold_hold_s": fold_hold,
        "cooldown_s": cooldown,
        "carve_fraction": carve,
        "max_siblings": max_siblings,
        "min_parent": {
            "vcpus": parse_cpu(min_cpu),
            "memory": parse_size_mib(min_memory),
            "disk": 0,
            "net": 0,
        },
        "service_port": port,
        "listen_port": listen_port,
        "probe_path": probe_path,
    }
    try:
        ScalingPolicy.model_validate(body)  # say what is wrong before the round trip
    except ValidationError as exc:
        fail("; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()))
    state = _ctx().client().set_scaling_policy(name, body)
    if as_json:
        emit_json(state)
        return
    console.print(f"{name}: {ScalingPolicy.model_validate(state['policy']).describe()}")
    _print_group(state)


@scaling_app.command("show")
def show_policy(name: str, as_json: JsonOpt = False) -> None:
    """The instance's policy, whole size, siblings and service endpoint."""
    state = _ctx().client().scaling_policy(name)
    if as_json:
        emit_json(state)
        return
    if "parent" in state:
        console.print(f"{name} is a sibling carved out of {state['parent']}")
        return
    if state["policy"] is None:
        console.print(f"{name} has no scaling policy (set one: fleetvisor scale-policy set)")
        return
    console.print(f"{name}: {ScalingPolicy.model_validate(state['policy']).describe()}")
    _print_group(state)


@scaling_app.command("rm")
def remove_policy(name: str, as_json: JsonOpt = False) -> None:
    """Remove the policy: the host folds the siblings back and stops the manager."""
    state = _ctx().client().remove_scaling_policy(name)
    if as_json:
        emit_json(state)
        return
    console.print(f"{name}: scaling policy removed; siblings fold back")


def _print_group(state: dict[str, Any]) -> None:
    size = state["size"]
    console.print(f"  size       {output.cpu(size['vcpus'])} cpu, {size['memory']} MiB (whole)")
    console.print(f"  endpoint   {state.get('endpoint') or '-'}")
    if state["siblings"]:
        table(
            ["SIBLING", "CPU", "MEMORY", "ADDRESS"],
            [
                (
                    s["name"],
                    output.cpu(s["resources"]["vcpus"]),
                    f"{s['resources']['memory']} MiB",
                    s["address"] or "-",
                )
                for s in state["siblings"]
            ],
        )
