"""Which accelerator boots guests here: KVM if a guest reaches the ready marker under it,
else TCG. Decided once by a short boot test and cached in the driver's state dir.

`/dev/kvm` existing is not enough: on a PVM host it opens fine and stock kernels hang.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from fleetvisor.images.build import RootfsBuildError
from fleetvisor.images.vm_image import READY_MARKER, build_initramfs, kernel_cache

PROBE_SECONDS = 10.0  # a KVM guest boots in ~1 s; a PVM host hangs forever
ACCELS = ("kvm", "tcg")


def _host_key(qemu: str) -> str:
    """What the answer depends on: the host kernel and the QEMU binary."""
    try:
        stat = os.stat(qemu)
        binary = f"{stat.st_size}-{int(stat.st_mtime)}"
    except OSError:
        binary = "missing"
    return f"{platform.release()}/{qemu}/{binary}"


def detect(cache: Path, qemu: str, *, timeout: float = PROBE_SECONDS) -> str:
    """'kvm' or 'tcg', from `cache` when it was measured on this host, else by boot test."""
    key = _host_key(qemu)
    try:
        known = json.loads(cache.read_text())
        if known.get("host") == key and known.get("accel") in ACCELS:
            return str(known["accel"])
    except (OSError, ValueError):
        pass
    result = probe(qemu, timeout=timeout)
    accel = "kvm" if result["booted"] else "tcg"
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"host": key, "accel": accel, "probe": result}, indent=1))
    os.replace(tmp, cache)
    return accel


def probe(qemu: str, *, timeout: float = PROBE_SECONDS) -> dict[str, object]:
    """Boot the cached kernel + a fresh initramfs under KVM; did it print the marker?"""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return {"booted": False, "reason": "no usable /dev/kvm"}
    try:
        kernel = kernel_cache()
        initramfs = build_initramfs(kernel)
    except RootfsBuildError as exc:
        return {"booted": False, "reason": str(exc)}
    with tempfile.TemporaryDirectory(prefix="fv-accel-probe-") as scratch:
        initrd = Path(scratch) / "initramfs"
        initrd.write_bytes(initramfs)
        console = Path(scratch) / "console.log"
        argv = [
            qemu, "-M", "q35", "-accel", "kvm", "-cpu", "host", "-m", "256",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet fv_cmd=dHJ1ZQ==",  # `true`: power off
            "-serial", f"file:{console}",
        ]  # fmt: skip
        started = time.monotonic()
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        booted = False
        try:
            while time.monotonic() - started < timeout:
                booted = _has_marker(console)
                if booted or process.poll() is not None:
                    break
                time.sleep(0.05)
            booted = booted or _has_marker(console)
        finally:
            process.kill()
            _, err = process.communicate()
        seconds = round(time.monotonic() - started, 2)
        reason = "booted" if booted else (err.decode(errors="replace").strip()[-300:] or "hung")
        return {"booted": booted, "seconds": seconds, "reason": reason}


def _has_marker(console: Path) -> bool:
    return console.exists() and READY_MARKER in console.read_text(errors="replace")
