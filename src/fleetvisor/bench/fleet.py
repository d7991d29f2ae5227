"""The throwaway runc fleet every fleet benchmark runs on (launch, local-scaling, migrate).

    temp dir (prefix) --> the image: built or found there, before any fleet process starts
      --> LocalFleet (runc, N hosts, each in its own netns, --port 0) in <temp>/fleet
      --> admin client --> the image imported (digests verified) and pushed to its registry
      --> yield ThrowawayFleet
    on the way out, also after an error, Ctrl-C or SIGTERM (raised as KeyboardInterrupt):
      client closed, agents then controller stopped (agents run --destroy-on-exit, so their
      containers, mounts, netns and cgroups go with them), fleet network removed, temp dir
      removed (mounts below it detached first)

The benchmarks' own set-up (raw baselines, the instances they measure) goes in their own
context managers on top of this one, so one ExitStack unwinds both.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetvisor.client import FleetClient
from fleetvisor.drivers.runc import overlay
from fleetvisor.errors import FleetvisorError
from fleetvisor.fleet.local import FleetError, FleetOptions, LocalFleet
from fleetvisor.images.archive import import_image
from fleetvisor.images.registry_client import RegistryClient
from fleetvisor.images.store import Descriptor, ImageStore

ProgressFn = Callable[[str, int, int], None]
"""progress(what is happening, steps done, steps in all)."""


class BenchError(FleetvisorError):
    """The benchmark could not run or measure; the message says what to change."""


@dataclass(frozen=True)
class BenchImage:
    """The image as pushed to the throwaway fleet's registry."""

    ref: str  # name:tag in the registry
    name: str
    digest: str  # manifest digest
    layers: tuple[Descriptor, ...]  # base first
    image_bytes: int  # compressed size of its blobs (config + layers)
    config: dict[str, Any]  # runtime defaults (Env, WorkingDir, User, ...)


@dataclass(frozen=True)
class ThrowawayFleet:
    """A running fleet that lives as long as the `throwaway_fleet` block."""

    workdir: Path  # the temp dir: everything below it is removed at the end
    fleet: LocalFleet
    client: FleetClient  # admin
    token: str
    image: BenchImage
    hosts: tuple[str, ...]  # host names, sorted

    @property
    def state_dir(self) -> Path:
        return self.fleet.state_dir

    @property
    def url(self) -> str:
        return self.fleet.url

    def agent_dir(self, host: str) -> Path:
        """The state dir of `host`'s agent (LocalFleet: <state>/agents/<host>)."""
        return self.state_dir / "agents" / host


@contextlib.contextmanager
def throwaway_fleet(
    *,
    prefix: str,
    image: Callable[[Path], Path],
    image_name: str,
    progress: ProgressFn,
    hosts: int = 1,
    preparing: str = "preparing the image",
) -> Iterator[ThrowawayFleet]:
    """A temp dir named `prefix`..., the image `image(temp dir)` gives (an OCI layout or
    archive; called before the fleet starts, so a bad image fails fast; `preparing` is
    the progress line meanwhile), a runc fleet of `hosts` hosts there with the image
    pushed as `image_name`. Everything is removed on the way out, whatever happens.
    Raises BenchError when the fleet does not start."""
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix=prefix))
        stack.callback(remove_tree, workdir)
        progress(preparing, 0, 1)
        source = image(workdir)
        fleet = LocalFleet(
            FleetOptions(hosts=hosts, driver="runc", state_dir=workdir / "fleet", port=0),
            say=lambda message: print(message, file=sys.stderr),
        )
        stack.callback(fleet.stop)
        try:
            fleet.start(progress)
        except FleetError as exc:
            raise BenchError(f"the throwaway fleet did not start: {exc}") from exc
        token = (workdir / "fleet" / "admin.token").read_text().strip()
        client = stack.enter_context(FleetClient(fleet.url, token))
        progress("pushing the image", 0, 1)
        pushed = push_image(source, image_name, client, workdir / "import")
        names = tuple(sorted(h["name"] for h in client.hosts()))
        if len(names) < hosts:
            raise BenchError(f"the throwaway fleet has {len(names)} host(s), not {hosts}")
        yield ThrowawayFleet(
            workdir=workdir, fleet=fleet, client=client, token=token, image=pushed, hosts=names
        )


def push_image(source: Path, name: str, client: FleetClient, scratch: Path) -> BenchImage:
    """Import `source` (every digest verified) and push it to the fleet's registry."""
    store = ImageStore(scratch)
    info = import_image(store, source, name)
    manifest = store.manifest(info.ref)
    registry = RegistryClient(client.url, client.token)
    try:
        registry.push(store, info.ref)
    finally:
        registry.close()
    return BenchImage(
        ref=info.ref,
        name=info.name,
        digest=info.digest,
        layers=manifest.layers,
        image_bytes=sum(blob.size for blob in manifest.blobs),
        config=store.image_config(info.ref),
    )


def remove_tree(path: Path) -> None:
    """Delete a bench's temp dir, detaching any mount left below it first (never delete
    through a mounted overlay)."""
    resolved = path.resolve()
    below = [p for p in overlay.mount_points() if p == resolved or resolved in p.parents]
    for point in sorted(below, key=lambda p: len(p.parts), reverse=True):
        overlay.unmount(point)
    if any(p == resolved or resolved in p.parents for p in overlay.mount_points()):
        raise BenchError(f"{path} still has mounts below it; not removing it")
    shutil.rmtree(path, ignore_errors=True)
