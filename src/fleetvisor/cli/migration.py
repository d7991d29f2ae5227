"""`fleetvisor migrate NAME` and `fleetvisor drain HOST`: move instances with their state."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fleetvisor.cli.output import console, emit_json, fail, table

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
STEPS = {
    "place": "choosing the target",
    "prepare_target": "preparing the target",
    "pack": "checkpointing on the source",
    "run_on_target": "restoring on the target",
    "clean_source": "cleaning the source",
}


def _ctx():  # type: ignore[no-untyped-def]
    from fleetvisor.cli.main import ctx

    return ctx


def migrate(
    name: Annotated[str, typer.Argument(help="The instance to move.")],
    to: Annotated[
        str | None, typer.Option("--to", help="Target host (default: the engine picks one).")
    ] = None,
    live: Annotated[
        bool, typer.Option("--live", help="Only live: CRIU checkpoint/restore, memory kept.")
    ] = False,
    cold: Annotated[
        bool, typer.Option("--cold", help="Only cold: stop, move its files, start.")
    ] = False,
    wait: Annotated[bool, typer.Option(help="Wait for the migration to end.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Move an instance to another host with its state.

    Live when both hosts can checkpoint (the process keeps its memory, files and
    identity); otherwise cold (its files travel, the process starts again). The target
    keeps every placement rule of the instance. Examples:

        fleetvisor migrate web                 # the engine picks the target
        fleetvisor migrate web --to host-3 --live
    """
    if live and cold:
        fail("--live and --cold exclude each other; give one, or neither for the best available")
    mode = "live" if live else "cold" if cold else "auto"
    client = _ctx().client()
    op = client.migrate_instance(name, to=to, mode=mode)
    if wait:
        op = _follow(client, op, f"migrate {name}")
    if as_json:
        emit_json(op)
    elif op["state"] == "succeeded":
        result = op.get("result") or {}
        console.print(
            f"{name}: migrated ({result.get('mode', '?')}), downtime "
            f"{result.get('downtime_ms', 0):.0f} ms"
        )
    elif not wait:
        console.print(f"{name}: migration {op['id']} {op['state']}")
    if op["state"] in ("failed", "rolled_back"):
        fail(f"migration of {name} failed: {op['error']}")


def drain(
    host: Annotated[str, typer.Argument(help="The host to empty.")],
    wait: Annotated[bool, typer.Option(help="Wait for every migration to end.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Empty a host: it takes no new instances, and every instance on it migrates, one
    after the other, to hosts that keep its placement rules (`fleetvisor hosts ready
    HOST` takes new instances again)."""
    client = _ctx().client()
    answer = client.drain_host(host)
    ops: list[dict[str, Any]] = answer["operations"]
    if wait and ops:
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
            disable=as_json,
        ) as progress:
            task = progress.add_task(f"draining {host}", total=len(ops))
            for i, op in enumerate(ops):
                progress.update(task, description=f"migrating {op['instance']}")
                ops[i] = client.wait_operation(op["id"], timeout=900.0)
                progress.advance(task)
    if as_json:
        emit_json({**answer, "operations": ops})
        return
    table(
        ["INSTANCE", "STATE", "MODE", "DOWNTIME", "ERROR"],
        [
            (
                op["instance"],
                op["state"],
                (op.get("result") or {}).get("mode", ""),
                _ms(op),
                op["error"],
            )
            for op in ops
        ],
    )
    failed = [op for op in ops if op["state"] in ("failed", "rolled_back")]
    console.print(f"{host}: draining, {len(ops) - len(failed)}/{len(ops)} instance(s) moved")
    if failed:
        fail(f"{len(failed)} migration(s) failed; they stay on {host} (see ERROR)")


def _ms(op: dict[str, Any]) -> str:
    value = (op.get("result") or {}).get("downtime_ms")
    return f"{value:.0f} ms" if isinstance(value, int | float) else ""


def _follow(client: Any, op: dict[str, Any], what: str) -> dict[str, Any]:
    with console.status(f"{what}…") as status:
        return dict(
            client.wait_operation(
                op["id"],
                timeout=900.0,
                on_update=lambda o: status.update(
                    f"{what}: {STEPS.get(o['step'], o['step'] or o['state'])}"
                ),
            )
        )
