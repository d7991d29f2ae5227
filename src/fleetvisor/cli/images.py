"""`fleetvisor image ...` and `fleetvisor cache ...`: the fleet's images and host caches."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from fleetvisor.cli.output import console, emit_json, fail, table

image_app = typer.Typer(
    help="Images in the fleet's registry: import, ls, inspect, rm.", no_args_is_help=True
)
cache_app = typer.Typer(
    help="Host image caches: pin images every host keeps; see the plan.", no_args_is_help=True
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _ctx():  # type: ignore[no-untyped-def]
    from fleetvisor.cli.main import ctx

    return ctx


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


@image_app.command("import")
def image_import(
    source: Annotated[
        Path,
        typer.Argument(
            help="An OCI layout directory, an OCI archive or a `docker save` tar.", exists=True
        ),
    ],
    name: Annotated[str, typer.Option(help="NAME[:TAG] to store it under, e.g. busybox:1.36.")],
    as_json: JsonOpt = False,
) -> None:
    """Import an image into the fleet's registry (every digest verified), ready to run."""
    _import_and_push(source, name, as_json)


@image_app.command("build")
def image_build(
    kind: Annotated[
        str,
        typer.Argument(
            help="busybox (from Debian's busybox-static, with an "
            "httpd layer), minbase (Debian minbase, debootstrap) or httpwork (busybox + "
            "/bin/httpwork, a one-worker HTTP server burning WORK_US of CPU per request; "
            "compiled here with gcc, static) or memcounter (busybox + /bin/memcounter, "
            "holding MEM_MB of memory and counting into /data/counter every TICK_MS)."
        ),
    ],
    name: Annotated[str | None, typer.Option(help="NAME[:TAG] [default: KIND:latest].")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build a small real image on this machine and import it: no public registry needed."""
    from fleetvisor.images import build

    with tempfile.TemporaryDirectory(prefix="fv-build-") as scratch:
        out = Path(scratch) / "layout"
        try:
            if kind == "busybox":
                build.build_busybox_image(out, extra_layers=[build.httpd_layer()])
            elif kind == "minbase":
                cache = Path.home() / ".cache" / "fleetvisor" / "rootfs"
                with console.status("debootstrap (a minute the first time; cached after)…"):
                    tree = build.debootstrap_minbase(cache)
                build.build_rootfs_image(out, tree)
            elif kind == "httpwork":
                with console.status("compiling httpwork (once; cached after)…"):
                    build.build_httpwork_image(out)
            elif kind == "memcounter":
                with console.status("compiling memcounter (once; cached after)…"):
                    build.build_memcounter_image(out)
            else:
                raise typer.BadParameter(
                    f"{kind!r}: build busybox, minbase, httpwork or memcounter"
                )
        except (build.RootfsBuildError, build.WorkloadBuildError) as exc:
            fail(str(exc))
        _import_and_push(out, name or f"{kind}:latest", as_json)


@image_app.command("build-vm")
def image_build_vm(
    name: Annotated[str, typer.Argument(help="NAME[:TAG] to store the VM image under.")],
    disk_mib: Annotated[int, typer.Option(help="Size of the VM's data disk (qcow2).")] = 64,
    as_json: JsonOpt = False,
) -> None:
    """Build a small bootable VM image (Debian cloud kernel, busybox initramfs, qcow2
    disk) as an OCI artifact and push it: run scripts/deps/qemu.sh once first."""
    from fleetvisor.images import build, vm_image

    with tempfile.TemporaryDirectory(prefix="fv-build-vm-") as scratch:
        out = Path(scratch) / "layout"
        try:
            vm_image.build_vm_image(out, disk_mib=disk_mib)
        except build.RootfsBuildError as exc:
            fail(str(exc))
        _import_and_push(out, name, as_json)


def _import_and_push(source: Path, name: str, as_json: bool) -> None:
    from fleetvisor.images.archive import import_image
    from fleetvisor.images.registry_client import RegistryClient
    from fleetvisor.images.store import ImageStore

    client = _ctx().client()
    with tempfile.TemporaryDirectory(prefix="fv-import-") as scratch:
        store = ImageStore(Path(scratch))
        info = import_image(store, source, name)
        with Progress(
            TextColumn("pushing {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task(info.ref, total=info.size)
            registry = RegistryClient(client.url, client.token)
            try:
                transfer = registry.push(store, info.ref, progress=lambda n: bar.advance(task, n))
            finally:
                registry.close()
    result = {
        "ref": info.ref,
        "digest": transfer.digest,
        "size": info.size,
        "layers": info.layers,
        "bytes_sent": transfer.bytes_transferred,
    }
    if as_json:
        emit_json(result)
    else:
        console.print(
            f"{info.ref}: {transfer.digest} ({human(info.size)}, {info.layers} "
            f"layer(s); {human(transfer.bytes_transferred)} sent)"
        )


@image_app.command("ls")
def image_ls(as_json: JsonOpt = False) -> None:
    """List the images of the fleet's registry."""
    items = _ctx().client().images()
    if as_json:
        emit_json(items)
        return
    table(
        ["IMAGE", "DIGEST", "SIZE", "LAYERS", "CREATED"],
        [
            (i["ref"], i["digest"][:19], human(i["size"]), i["layers"], i["created"] or "-")
            for i in items
        ],
    )


@image_app.command("inspect")
def image_inspect(ref: str, as_json: JsonOpt = True) -> None:
    """Show an image: manifest (config and layers) and runtime config."""
    emit_json(_ctx().client().image(ref))


@image_app.command("rm")
def image_rm(ref: str) -> None:
    """Remove an image's tag from the registry (instances keep running)."""
    _ctx().client().remove_image(ref)
    console.print(f"{ref} removed")


@cache_app.command("pin")
def cache_pin(image: str, as_json: JsonOpt = False) -> None:
    """Keep IMAGE in every host's cache, whatever its popularity (within the budget)."""
    pin = _ctx().client().pin_image(image)
    if as_json:
        emit_json(pin)
    else:
        where = "" if pin["digest"] else " (not in the registry yet: import it)"
        console.print(f"{image} pinned{where}")


@cache_app.command("unpin")
def cache_unpin(image: str) -> None:
    """Stop pinning IMAGE."""
    _ctx().client().unpin_image(image)
    console.print(f"{image} unpinned")


@cache_app.command("pins")
def cache_pins(as_json: JsonOpt = False) -> None:
    """List pinned images."""
    items = _ctx().client().cache_pins()
    if as_json:
        emit_json(items)
        return
    table(
        ["IMAGE", "DIGEST", "SIZE"],
        [
            (
                p["image"],
                (p["digest"] or "not in registry")[:19],
                human(p["size"]) if p["size"] is not None else "-",
            )
            for p in items
        ],
    )


@cache_app.command("plan")
def cache_plan(
    budget: Annotated[str, typer.Option(help="Cache budget of a host, e.g. 20G.")] = "20G",
    as_json: JsonOpt = False,
) -> None:
    """What a host with this budget prepopulates: pinned, then most launched images."""
    from fleetvisor.model.resources import parse_size_mib

    items = _ctx().client().cache_plan(parse_size_mib(budget, what="budget") << 20)
    if as_json:
        emit_json(items)
        return
    table(
        ["IMAGE", "PINNED", "LAUNCHES", "SIZE"],
        [(p["image"], "yes" if p["pinned"] else "", p["uses"], human(p["size"])) for p in items],
    )
