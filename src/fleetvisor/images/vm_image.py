"""VM images: Debian's cloud kernel, a busybox initramfs and a qcow2 data disk, stored as
one OCI artifact so the fleet's registry and host caches serve VMs like containers.

```
 /var/cache/fleetvisor/vm-kernel/current   (scripts/deps/qemu.sh: vmlinuz + virtio .ko)
 /bin/busybox (busybox-static)             ──build_vm_image──> OCI layout
   manifest (artifactType application/vnd.fleetvisor.vm.v1)
     config  application/vnd.fleetvisor.vm.config.v1+json   kernel release, cmdline, disk size
     layer   application/vnd.fleetvisor.vm.kernel.v1         vmlinuz
     layer   application/vnd.fleetvisor.vm.initramfs.v1+gzip newc cpio: busybox, /init, modules
     layer   application/vnd.fleetvisor.vm.disk.v1+qcow2     empty data disk (the base)
```

The guest (`GUEST_INIT`): mounts proc/sys/devtmpfs, loads the virtio modules in
dependency order, configures eth0 from `fv_ip=`/`fv_gw=` on the kernel command line,
onlines hot-plugged vCPUs (what udev does elsewhere), serves a control channel (the
virtio-serial port `org.fleetvisor.ctl`) when `fv_ctl=1`, prints `FLEETVISOR-READY` on
the console and runs the instance command (`fv_cmd=<base64>`, default `fv-counter`).
When the command exits the guest powers off.
Everything generated is deterministic: the same inputs give the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetvisor.errors import InvalidInput, NotFound
from fleetvisor.images.build import (
    MEDIA_MANIFEST,
    RootfsBuildError,
    _atomic_write,
    _init_layout,
    _write_json_blob,
    layout_blob_path,
)
from fleetvisor.images.store import ImageStore, Reference

ARTIFACT_TYPE = "application/vnd.fleetvisor.vm.v1"
MEDIA_VM_CONFIG = "application/vnd.fleetvisor.vm.config.v1+json"
MEDIA_KERNEL = "application/vnd.fleetvisor.vm.kernel.v1"
MEDIA_INITRAMFS = "application/vnd.fleetvisor.vm.initramfs.v1+gzip"
MEDIA_DISK = "application/vnd.fleetvisor.vm.disk.v1+qcow2"
TITLE = "org.opencontainers.image.title"
REF_NAME = "org.opencontainers.image.ref.name"
KERNEL_CACHE = Path(os.environ.get("FLEETVISOR_VM_KERNEL_CACHE", "/var/cache/fleetvisor/vm-kernel"))
READY_MARKER = "FLEETVISOR-READY"
EXIT_MARKER = "FLEETVISOR-EXIT"
CTL_DONE = "FV-DONE"
DEFAULT_DISK_MIB = 64
MTIME = 1_700_000_000
# PLATFORM.md: the virtio core in this order, then the devices (their deps first).
CORE_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_mmio",
)
DEVICE_MODULES = ("virtio_balloon", "virtio_blk", "virtio_net", "virtio_console", "virtio-rng")

# The guest's PID 1. Busybox sh; `arg NAME` reads NAME=VALUE from the kernel command line.
GUEST_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /run /tmp
exec </dev/console >/dev/console 2>&1
for m in $(cat /etc/fv-modules); do
    insmod "/lib/modules/$m.ko" || echo "fv-init: insmod $m failed"
done
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}";; esac; done; }
hostname "$(arg fv_name || echo fleetvisor)"
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    a="$(arg fv_ip)"; gw="$(arg fv_gw)"
    [ -n "$a" ] && ip addr add "$a" dev eth0
    [ -n "$gw" ] && ip route add default via "$gw"
fi
# Hot-plugged vCPUs arrive offline; udev onlines them on other systems.
( while :; do
    for c in /sys/devices/system/cpu/cpu[0-9]*/online; do
        [ -e "$c" ] && [ "$(cat "$c")" = 0 ] && echo 1 >"$c"
    done
    sleep 0.5
done ) &
# Control channel: a virtio-serial port named org.fleetvisor.ctl (a unix socket on the
# host). One shell command per line; its output, then "FV-DONE <rc>". Reads end (EOF)
# while no host client is connected: wait and open it again.
if [ "$(arg fv_ctl)" = 1 ]; then
    ( while :; do
        for p in /sys/class/virtio-ports/*; do
            [ "$(cat "$p/name" 2>/dev/null)" = org.fleetvisor.ctl ] || continue
            # one open, read-write: a virtio port refuses a second open (EBUSY)
            while read -r line; do sh -c "$line"; echo "FV-DONE $?"; done \
                3<>"/dev/${p##*/}" <&3 >&3 2>&3
        done
        sleep 0.3
    done ) &
fi
echo FLEETVISOR-READY
cmd="$(arg fv_cmd | base64 -d 2>/dev/null)"
[ -n "$cmd" ] || cmd=fv-counter
sh -c "$cmd"
echo "FLEETVISOR-EXIT $?"
sync
poweroff -f
"""

# Default command: a counter every 0.5 s with the online vCPU count, so tests see that a
# restored or migrated guest carries on, and that a hot-plugged vCPU came online.
GUEST_COUNTER = r"""#!/bin/sh
n=0
while :; do
    echo "fv-counter $n cpus=$(grep -c ^processor /proc/cpuinfo)"
    n=$((n + 1))
    sleep 0.5
done
"""


@dataclass(frozen=True)
class KernelCache:
    """One cached kernel: vmlinuz plus the .ko files and their dependencies."""

    root: Path
    release: str

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"

    def module(self, name: str) -> Path:
        return self.root / "modules" / f"{name}.ko"

    def dependencies(self) -> dict[str, list[str]]:
        """NAME -> the modules it needs (modules.dep written by scripts/deps/qemu.sh)."""
        deps: dict[str, list[str]] = {}
        for line in (self.root / "modules.dep").read_text().splitlines():
            name, _, rest = line.partition(":")
            deps[name.removesuffix(".ko")] = [d.removesuffix(".ko") for d in rest.split()]
        return deps


def kernel_cache(root: Path = KERNEL_CACHE) -> KernelCache:
    """The cached kernel (`current`), or RootfsBuildError saying how to get it."""
    current = root / "current"
    if not (current / ".done").exists() or not (current / "vmlinuz").exists():
        raise RootfsBuildError(
            f"no VM kernel cached in {root}: run scripts/deps/qemu.sh as root "
            "(it fetches Debian's linux-image-*-cloud-amd64 once)"
        )
    return KernelCache(current.resolve(), current.resolve().name)


def module_order(kernel: KernelCache, wanted: Iterable[str] = DEVICE_MODULES) -> list[str]:
    """The virtio core (in PLATFORM.md's order), then `wanted` with each one's deps first;
    modules the kernel has built in (no .ko) are left out."""
    deps = kernel.dependencies()
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order or not kernel.module(name).exists():
            return
        for dep in deps.get(name, []):
            visit(dep)
        order.append(name)

    for name in (*CORE_MODULES, *wanted):
        visit(name)
    return order


# --------------------------------------------------------------------------- initramfs


def _cpio_member(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One newc cpio record (the format the kernel unpacks into its initial rootfs)."""
    encoded = name.encode() + b"\0"
    ino = int.from_bytes(hashlib.sha256(encoded).digest()[:3], "big") + 1
    fields = (ino, mode, 0, 0, 1, MTIME, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    pad = b"\0" * (-(len(header) + len(encoded)) % 4)
    return header + encoded + pad + data + b"\0" * (-len(data) % 4)


def build_initramfs(
    kernel: KernelCache, busybox: Path = Path("/bin/busybox"), modules: Iterable[str] = ()
) -> bytes:
    """A gzip newc cpio: busybox, /init (GUEST_INIT), fv-counter, the modules in load order."""
    if not os.access(busybox, os.X_OK):
        raise RootfsBuildError(f"{busybox} is missing; install Debian's busybox-static")
    order = module_order(kernel, modules or DEVICE_MODULES)
    out = io.BytesIO()
    dirs = ("bin", "sbin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp", "root", "run")
    for d in dirs:
        out.write(_cpio_member(d, 0o040755))
    out.write(_cpio_member("dev/console", 0o020600, rdev=(5, 1)))  # before devtmpfs
    out.write(_cpio_member("bin/busybox", 0o100755, Path(busybox).read_bytes()))
    out.write(_cpio_member("init", 0o100755, GUEST_INIT.encode()))
    out.write(_cpio_member("bin/fv-counter", 0o100755, GUEST_COUNTER.encode()))
    out.write(_cpio_member("etc/fv-modules", 0o100644, ("\n".join(order) + "\n").encode()))
    for name in order:
        out.write(
            _cpio_member(f"lib/modules/{name}.ko", 0o100644, kernel.module(name).read_bytes())
        )
    out.write(_cpio_member("TRAILER!!!", 0))
    return gzip.compress(out.getvalue(), compresslevel=6, mtime=0)


def empty_qcow2(size_mib: int) -> bytes:
    """An empty qcow2 image of `size_mib` (qemu-img; a few hundred KiB whatever the size)."""
    if shutil.which("qemu-img") is None:
        raise RootfsBuildError("qemu-img is missing: run scripts/deps/qemu.sh (qemu-utils)")
    with tempfile.TemporaryDirectory(prefix="fv-vmdisk-") as scratch:
        path = Path(scratch) / "disk.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mib}M"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return path.read_bytes()


# --------------------------------------------------------------------------- the artifact


def _blob(layout: Path, data: bytes, media_type: str, title: str) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = layout_blob_path(layout, digest)
    if not path.exists():
        _atomic_write(path, data)
    return {
        "mediaType": media_type,
        "digest": digest,
        "size": len(data),
        "annotations": {TITLE: title},
    }


def build_vm_image(
    out: Path,
    tag: str = "latest",
    *,
    kernel_root: Path = KERNEL_CACHE,
    busybox: Path = Path("/bin/busybox"),
    disk_mib: int = DEFAULT_DISK_MIB,
    cmdline: str = "",
) -> Path:
    """Write the VM artifact into OCI layout `out`, tagged `tag`. `cmdline` is appended to
    the kernel command line the driver builds (e.g. `quiet`)."""
    if disk_mib < 1:
        raise InvalidInput(f"disk size {disk_mib} MiB: give at least 1")
    out = Path(out)
    _init_layout(out)
    kernel = kernel_cache(kernel_root)
    layers = [
        _blob(out, kernel.vmlinuz.read_bytes(), MEDIA_KERNEL, "vmlinuz"),
        _blob(out, build_initramfs(kernel, busybox), MEDIA_INITRAMFS, "initramfs.cpio.gz"),
        _blob(out, empty_qcow2(disk_mib), MEDIA_DISK, "disk.qcow2"),
    ]
    config = {
        "kernel_release": kernel.release,
        "cmdline": cmdline,
        "disk_mib": disk_mib,
        "ready_marker": READY_MARKER,
        "modules": module_order(kernel),
    }
    config_digest, config_size = _write_json_blob(out, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": MEDIA_VM_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layers,
        "annotations": {"org.opencontainers.image.created": "2023-11-14T22:13:20Z"},
    }
    manifest_digest, manifest_size = _write_json_blob(out, manifest)
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"manifests": []}
    entries = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag]
    entries.append(
        {
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_size,
            "artifactType": ARTIFACT_TYPE,
            "annotations": {REF_NAME: tag},
        }
    )
    doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}
    _atomic_write(index_path, json.dumps({**doc, "manifests": entries}, indent=2).encode())
    return out


@dataclass(frozen=True)
class VmImage:
    """A VM artifact resolved in a store: its blobs as files (read-only, shared)."""

    ref: str
    digest: str
    kernel: Path
    initramfs: Path
    disk: Path
    disk_digest: str
    config: dict[str, Any]


def resolve_vm_image(store: ImageStore, ref: str | Reference) -> VmImage:
    """The kernel, initramfs and disk blobs of VM image `ref`; InvalidInput if `ref` is
    not a VM image (e.g. a container image), NotFound if the store lacks it."""
    manifest = store.manifest(ref)
    if manifest.config.media_type != MEDIA_VM_CONFIG:
        raise InvalidInput(
            f"image {ref} is not a VM image (its config is {manifest.config.media_type}); "
            "build one with `fleetvisor image build-vm NAME`"
        )
    by_type = {layer.media_type: layer for layer in manifest.layers}
    missing = [t for t in (MEDIA_KERNEL, MEDIA_INITRAMFS, MEDIA_DISK) if t not in by_type]
    if missing:
        raise InvalidInput(f"VM image {ref} lacks layers of type {missing}; build it again")
    paths = {}
    for media_type, layer in by_type.items():
        path = store.blob_path(layer.digest)
        if not path.exists():
            raise NotFound(f"blob {layer.digest} of VM image {ref} is missing; pull it again")
        paths[media_type] = path
    config = json.loads(store.read_blob(manifest.config.digest))
    return VmImage(
        str(ref),
        manifest.digest,
        paths[MEDIA_KERNEL],
        paths[MEDIA_INITRAMFS],
        paths[MEDIA_DISK],
        by_type[MEDIA_DISK].digest,
        config if isinstance(config, dict) else {},
    )


__all__ = [
    "ARTIFACT_TYPE",
    "MEDIA_DISK",
    "MEDIA_INITRAMFS",
    "MEDIA_KERNEL",
    "MEDIA_VM_CONFIG",
    "READY_MARKER",
    "VmImage",
    "build_initramfs",
    "build_vm_image",
    "kernel_cache",
    "module_order",
    "resolve_vm_image",
]
