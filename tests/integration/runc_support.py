"""What the runc integration tests share: the skip reason and a rootfs over a directory."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Any

from fleetvisor.drivers.runc import PrerequisiteMissing, check_prerequisites


def is_static(binary: str) -> bool:
    """True when the ELF file has no PT_INTERP (no dynamic loader): it runs in any rootfs."""
    with open(binary, "rb") as f:
        head = f.read(8192)
    if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only; others: assume dynamic
        return False
    phoff = struct.unpack_from("<Q", head, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    return all(struct.unpack_from("<I", head, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def runc_missing(needs: str) -> str | None:
    """Why runc containers with a busybox rootfs cannot run here (`needs`: what the tests
    need root for), or None when they can."""
    if os.geteuid() != 0:
        return f"{needs} needs root (mounts, cgroups, network namespaces)"
    try:
        check_prerequisites()
    except PrerequisiteMissing as exc:
        return str(exc)
    busybox = shutil.which("busybox")
    if busybox is None or not is_static(busybox):
        return "a static busybox is needed for the test rootfs: apt-get install busybox-static"
    return None


class DirectoryRootfs:
    """A RootfsProvider over one prepared directory (the real one reads the layer cache)."""

    def __init__(self, layer: Path, config: dict[str, Any]) -> None:
        self.layer = layer
        self.image_config = config

    async def layers(self, image: str) -> list[Path]:
        return [self.layer]

    async def config(self, image: str) -> dict[str, Any]:
        return dict(self.image_config)
