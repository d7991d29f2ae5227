"""The Driver protocol every kind of instance runtime implements.

Features check capabilities, never driver names. Every call is idempotent where the
controller may retry it: create of an existing id, start of a running instance,
destroy of a missing one all succeed without side effects.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from fleetvisor.clock import Clock
from fleetvisor.model.resources import Resources
from fleetvisor.model.specs import HostInfo, InstanceReport, InstanceSpec


class Capability(StrEnum):
    RESIZE_LIVE = "resize_live"
    CHECKPOINT = "checkpoint"
    LIVE_MIGRATE = "live_migrate"
    DISK_DIFF = "disk_diff"
    SECURE_GUEST = "secure_guest"
    OCI_IMAGES = "oci_images"  # runs real images: they must be in the fleet's registry


class Driver(Protocol):
    kind: str

    def host_info(self) -> HostInfo: ...

    def capabilities(self) -> set[Capability]: ...

    async def create(self, spec: InstanceSpec) -> InstanceReport: ...

    async def start(self, instance_id: str) -> InstanceReport: ...

    async def stop(self, instance_id: str) -> InstanceReport: ...

    async def destroy(self, instance_id: str) -> None: ...

    async def resize(self, instance_id: str, resources: Resources) -> InstanceReport: ...

    async def stats(self, instance_id: str) -> dict[str, float]: ...

    async def list(self) -> list[InstanceReport]: ...

    def log_path(self, instance_id: str) -> Path | None:
        """The file holding the instance's output (stdout/stderr, or a VM's console)."""
        ...

    async def close(self) -> None: ...


class RootfsProvider(Protocol):
    """Where a driver gets an instance's root filesystem: unpacked image layers.

    The agent implements it over the host's shared layer cache (pulling what is
    missing); tests hand in a provider over a directory they built.
    """

    async def layers(self, image: str) -> list[Path]:
        """Unpacked layer directories of `image`, bottom layer first. Read-only: shared."""
        ...

    async def config(self, image: str) -> dict[str, Any]:
        """The image's runtime config (OCI image config `config`: Entrypoint, Cmd, Env,
        WorkingDir, User); {} when the image has none."""
        ...


class UnknownInstance(KeyError):
    """The driver has no instance with this id."""


DRIVERS = ("sim", "runc", "qemu")


def load_driver(
    kind: str,
    *,
    clock: Clock,
    state_dir: Path,
    options: dict[str, str],
    rootfs: RootfsProvider | None = None,
) -> Driver:
    from fleetvisor.errors import InvalidInput

    if kind == "sim":
        from fleetvisor.drivers.sim import SimDriver

        return SimDriver.from_options(clock=clock, state_dir=state_dir, options=options)
    if kind == "runc":
        from fleetvisor.drivers.runc import RuncDriver

        if rootfs is None:
            raise InvalidInput("the runc driver needs the host's image cache")
        return RuncDriver.from_options(
            clock=clock, state_dir=state_dir, options=options, rootfs=rootfs
        )
    if kind == "qemu":
        from fleetvisor.drivers.qemu import QemuDriver

        # VM images come through the same host image cache (as OCI artifacts)
        return QemuDriver.from_options(
            clock=clock, state_dir=state_dir, options=options, images=rootfs
        )
    raise InvalidInput(f"unknown driver {kind!r}; available drivers: {', '.join(DRIVERS)}")
