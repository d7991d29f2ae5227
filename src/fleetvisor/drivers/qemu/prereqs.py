"""What a host needs for VMs, and what to install when a part is missing."""

from __future__ import annotations

import os
import shutil


def qemu_missing() -> str | None:
    """Why VMs cannot run here (what to install), or None when they can."""
    from fleetvisor.images.build import RootfsBuildError
    from fleetvisor.images.vm_image import kernel_cache

    if os.geteuid() != 0:
        return "VMs need root (taps, bridges)"
    for tool in ("qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} is missing: run scripts/deps/qemu.sh"
    try:
        kernel_cache()
    except RootfsBuildError as exc:
        return str(exc)
    if shutil.which("busybox") is None:
        return "busybox is missing: apt-get install busybox-static"
    return None
