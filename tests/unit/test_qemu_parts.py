"""The QEMU driver's pure parts: command line, module order, initramfs format, the VM
artifact's media types, the control channel protocol. No QEMU, no root."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import re
from pathlib import Path

import pytest

from fleetvisor.drivers.qemu.command import MachineConfig, kernel_cmdline, qemu_argv, vcpus_of
from fleetvisor.drivers.qemu.guest import guest_exec
from fleetvisor.errors import InvalidInput
from fleetvisor.images.build import build_busybox_image
from fleetvisor.images.store import ImageStore
from fleetvisor.images.vm_image import (
    CORE_MODULES,
    KernelCache,
    _cpio_member,
    module_order,
    resolve_vm_image,
)


def config(**changes: object) -> MachineConfig:
    base = MachineConfig(
        name="web 1",
        kernel=Path("/k"),
        initramfs=Path("/i"),
        disk=Path("/d/disk.qcow2"),
        console=Path("/d/console.log"),
        qmp_socket=Path("/d/qmp.sock"),
        ctl_socket=Path("/d/ctl.sock"),
        pid_file=Path("/d/qemu.pid"),
        memory_mib=512,
        vcpus=1,
        max_vcpus=4,
    )
    return MachineConfig(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def test_vcpus_round_up_to_whole_cpus() -> None:
    assert [vcpus_of(m) for m in (0, 500, 1000, 1001, 2000)] == [1, 1, 1, 2, 2]


def test_argv_describes_the_machine() -> None:
    argv = qemu_argv(config(tap="fvab-t2", mac="52:54:00:01:00:02"))
    joined = " ".join(argv)
    assert argv[argv.index("-smp") + 1] == "1,maxcpus=4"
    assert argv[argv.index("-m") + 1] == "512"
    assert "-daemonize" in argv and "-pidfile" in argv
    assert "virtio-balloon-pci" in joined and "tap,id=net0,ifname=fvab-t2" in joined
    assert "file,id=console,path=/d/console.log,append=on" in joined
    assert "-nic" not in argv
    assert "-nic" in qemu_argv(config())


def test_cmdline_carries_the_command_and_env_in_base64() -> None:
    line = kernel_cmdline(
        config(command=("sh", "-c", "echo 'hi'"), env=(("A", "b c"),), address="198.18.7.2/24")
    )
    assert "fv_ip=198.18.7.2/24" in line and "fv_name=web-1" in line
    encoded = next(w for w in line.split() if w.startswith("fv_cmd="))[len("fv_cmd=") :]
    script = base64.b64decode(encoded).decode()
    assert script == "export A='b c'; 'sh' '-c' 'echo '\"'\"'hi'\"'\"''"


def test_cmdline_too_long_is_refused() -> None:
    with pytest.raises(ValueError, match="shorten"):
        kernel_cmdline(config(command=("x" * 3000,)))


def test_module_order_puts_dependencies_first(tmp_path: Path) -> None:
    (tmp_path / "modules").mkdir()
    names = [*CORE_MODULES, "virtio_balloon", "failover", "net_failover", "virtio_net"]
    for name in names:
        (tmp_path / "modules" / f"{name}.ko").write_bytes(b"")
    (tmp_path / "modules.dep").write_text(
        "virtio.ko: virtio_ring.ko\nvirtio_net.ko: virtio_ring.ko virtio.ko net_failover.ko\n"
        "net_failover.ko: failover.ko\nvirtio_balloon.ko: virtio.ko\n"
    )
    order = module_order(KernelCache(tmp_path, "test"), ["virtio_net", "virtio_balloon", "nope"])
    assert order[: len(CORE_MODULES)] == list(CORE_MODULES)
    assert order[len(CORE_MODULES) :] == [
        "failover",
        "net_failover",
        "virtio_net",
        "virtio_balloon",
    ]


def test_cpio_records_are_newc_and_aligned() -> None:
    record = _cpio_member("init", 0o100755, b"#!/bin/sh\n")
    assert record.startswith(b"070701") and len(record) % 4 == 0
    assert int(record[6 + 6 * 8 : 6 + 7 * 8], 16) == 10  # filesize field
    assert b"init\0" in record
    gzip.compress(record)  # what the kernel unpacks


def test_a_container_image_is_not_a_vm_image(tmp_path: Path) -> None:
    from fleetvisor.images.archive import import_image

    build_busybox_image(tmp_path / "layout")
    store = ImageStore(tmp_path / "store")
    import_image(store, tmp_path / "layout", "bb:latest")
    with pytest.raises(InvalidInput, match="not a VM image"):
        resolve_vm_image(store, "bb:latest")


async def test_guest_exec_speaks_the_control_protocol(tmp_path: Path) -> None:
    """A fake guest: echoes the begin marker, prints output without a final newline."""
    socket = tmp_path / "ctl.sock"

    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode()
        begin = re.search(r"echo (\S+);", line).group(1)  # type: ignore[union-attr]
        writer.write(f"stale\n{begin}\nline one\nno newline FV-DONE 3\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(guest, path=str(socket))
    async with server:
        code, output = await guest_exec(socket, "whatever", timeout=5)
    assert (code, output) == (3, "line one\nno newline ")
    json.dumps(output)
