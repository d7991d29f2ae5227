"""Disks: a shared read-only base per image disk, a qcow2 overlay per instance.

```
 host store blob (image's disk layer) ──link or copy──> <bases>/<hex>.qcow2   0444, once per host
 instance: qemu-img create -f qcow2 -b <bases>/<hex>.qcow2 -F qcow2 <instance>/disk.qcow2
```

The base is linked out of the image store (not used in place) so an image removed or
garbage-collected from the store never pulls a disk from under a running VM.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from fleetvisor.drivers.runc import commands


def ensure_base(blob: Path, base: Path) -> Path:
    """`base` holding `blob`'s content, read-only; hard link when on one filesystem."""
    if base.exists():
        return base
    base.parent.mkdir(parents=True, exist_ok=True)
    tmp = base.with_name(f".{base.name}.{secrets.token_hex(4)}")
    try:
        try:
            os.link(blob, tmp)
        except OSError:
            shutil.copyfile(blob, tmp)
            os.chmod(tmp, 0o444)
        os.replace(tmp, base)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return base


async def create_overlay(base: Path, overlay: Path) -> None:
    """A qcow2 overlay of `base` (absolute backing path); kept if it already exists."""
    if overlay.exists():
        return
    tmp = overlay.with_name(f".{overlay.name}.tmp")
    await commands.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(tmp)]
    )
    os.replace(tmp, overlay)


async def adopt_overlay(source: Path, base: Path, overlay: Path) -> None:
    """Make `source` (an overlay from another host) this instance's overlay, on this
    host's copy of its base: `rebase -u` rewrites only the header's backing path, the
    base's content being the same image disk (same digest)."""
    tmp = overlay.with_name(f".{overlay.name}.tmp")
    shutil.copyfile(source, tmp)
    await commands.run(
        ["qemu-img", "rebase", "-q", "-u", "-b", str(base), "-F", "qcow2", "-f", "qcow2", str(tmp)]
    )
    os.replace(tmp, overlay)


async def create_empty(path: Path, size_bytes: int) -> None:
    """An empty qcow2 without backing: the target of an incremental backup."""
    await commands.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size_bytes)])


async def allocated_extents(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the data a qcow2 file itself holds (not its backing chain)."""
    result = await commands.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(path)])
    extents: list[dict[str, Any]] = json.loads(result.stdout)
    return [
        (int(e["start"]), int(e["length"]))
        for e in extents
        if e.get("data") and e.get("depth", 0) == 0
    ]
