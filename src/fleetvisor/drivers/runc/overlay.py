"""The instance root filesystem: an overlay of read-only shared layers and a private upper dir.

The layers come from the host's shared image cache and are never written; everything
the instance writes lands in its own upper dir, which survives stop/start and goes away
with destroy. mount(2)/umount2(2) are called directly (no `mount` binary), blocking:
callers run these in a thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
from collections.abc import Sequence
from pathlib import Path

from fleetvisor.errors import DriverError

MNT_DETACH = 2
# The kernel copies mount options into one page; longer option strings fail with EINVAL.
MAX_OPTIONS = 4000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _unescape(field: str) -> str:
    """/proc/self/mountinfo escapes space, tab, newline and backslash as \\ooo (octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> list[Path]:
    """Every mount point of this mount namespace."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [Path(_unescape(line.split()[4])) for line in f if line.strip()]


def is_mounted(target: Path) -> bool:
    return target.resolve() in mount_points()


def options(layers: Sequence[Path], upper: Path, work: Path) -> str:
    """overlayfs options: lowerdir lists the topmost layer first; `layers` is bottom first."""
    for layer in layers:
        if any(c in str(layer) for c in ":,"):
            raise DriverError(f"layer path {layer} contains ':' or ',' which overlayfs cannot take")
    lower = ":".join(str(layer) for layer in reversed(layers))
    return f"lowerdir={lower},upperdir={upper},workdir={work}"


def mount_overlay(layers: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount the overlay at `target` unless already mounted there. Idempotent."""
    if not layers:
        raise DriverError("the image has no layers: the rootfs provider returned an empty list")
    for layer in layers:
        if not layer.is_dir():
            raise DriverError(f"image layer {layer} is not a directory: re-pull the image")
    for directory in (upper, work, target):
        directory.mkdir(parents=True, exist_ok=True)
    if is_mounted(target):
        return
    text = options(layers, upper.resolve(), work.resolve())
    if len(text) > MAX_OPTIONS:
        raise DriverError(
            f"overlay options for {len(layers)} layers are {len(text)} bytes, over the kernel's "
            f"{MAX_OPTIONS}: keep the layer cache at a shorter path or flatten the image"
        )
    result = _libc.mount(b"overlay", os.fsencode(target.resolve()), b"overlay", 0, text.encode())
    if result != 0:
        code = ctypes.get_errno()
        raise DriverError(f"mounting overlay at {target} failed: {os.strerror(code)} ({text})")


def unmount(target: Path) -> None:
    """Unmount `target` if mounted; a busy mount is detached lazily. Idempotent."""
    if not target.exists() or not is_mounted(target):
        return
    path = os.fsencode(target.resolve())
    if _libc.umount2(path, 0) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.EINVAL:  # not a mount point (any more)
        return
    if code == errno.EBUSY and _libc.umount2(path, MNT_DETACH) == 0:
        return
    raise DriverError(f"unmounting {target} failed: {os.strerror(ctypes.get_errno() or code)}")
