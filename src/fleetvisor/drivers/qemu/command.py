"""The QEMU command line of an instance: pure, from the spec, the image and the paths.

One function builds it for every way a VM starts (boot, restore from a file, incoming
live migration), so source and target always describe the same machine: migration
refuses to load into a machine with other devices.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from pathlib import Path

CONSOLE_PARAMS = "console=ttyS0 panic=-1 quiet"
CMDLINE_LIMIT = 2048  # x86 COMMAND_LINE_SIZE


@dataclass(frozen=True)
class MachineConfig:
    """What the command line needs; everything a path or a number, nothing looked up."""

    name: str
    kernel: Path
    initramfs: Path
    disk: Path
    console: Path
    qmp_socket: Path
    ctl_socket: Path
    pid_file: Path
    memory_mib: int
    vcpus: int
    max_vcpus: int
    accel: str = "tcg"
    cpu_model: str = "max"
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    extra_cmdline: str = ""
    tap: str | None = None
    mac: str | None = None
    address: str | None = None  # CIDR, e.g. 198.18.7.2/24
    gateway: str | None = None


def vcpus_of(millicores: int) -> int:
    """Whole vCPUs for a millicore request (a VM cannot run on part of a CPU)."""
    return max(1, math.ceil(millicores / 1000))


def mac_for(agent_id: str, index: int) -> str:
    """A stable, locally administered MAC from the agent id and the address slot."""
    digest = sum(agent_id.encode()) % 256
    return f"52:54:00:{digest:02x}:{index // 256:02x}:{index % 256:02x}"


def kernel_cmdline(config: MachineConfig) -> str:
    """The guest's command line: console, network, control channel, the command (base64)."""
    parts = [CONSOLE_PARAMS, "fv_ctl=1", f"fv_name={_label(config.name)}"]
    if config.address:
        parts.append(f"fv_ip={config.address}")
    if config.gateway:
        parts.append(f"fv_gw={config.gateway}")
    if config.command:
        script = " ".join(_quote(a) for a in config.command)
        exports = "".join(f"export {k}={_quote(v)}; " for k, v in config.env)
        parts.append("fv_cmd=" + base64.b64encode((exports + script).encode()).decode())
    if config.extra_cmdline:
        parts.append(config.extra_cmdline)
    line = " ".join(parts)
    if len(line) >= CMDLINE_LIMIT:
        raise ValueError(
            f"the kernel command line would be {len(line)} bytes (limit {CMDLINE_LIMIT}): "
            "shorten the instance's command and env"
        )
    return line


def qemu_argv(config: MachineConfig, *, qemu: str = "qemu-system-x86_64") -> list[str]:
    """`qemu-system-x86_64 ...` for `config`; daemonizes after setup (pid file)."""
    argv = [
        qemu,
        "-name", config.name,
        "-M", "q35",
        "-accel", config.accel,
        "-cpu", config.cpu_model,
        "-m", str(config.memory_mib),
        "-smp", f"{config.vcpus},maxcpus={config.max_vcpus}",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(config.kernel),
        "-initrd", str(config.initramfs),
        "-append", kernel_cmdline(config),
        "-chardev", f"file,id=console,path={config.console},append=on",
        "-serial", "chardev:console",
        # the guest's control channel: virtio-serial copes with no client connected
        # (a 16550 stalls its transmitter), also across migrations
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=ctl,path={config.ctl_socket},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=ctl,name=org.fleetvisor.ctl",
        "-qmp", f"unix:{config.qmp_socket},server=on,wait=off",
        # -drive (not -blockdev): block migration needs a named BlockBackend
        "-drive", f"file={config.disk},format=qcow2,if=none,id=disk0,node-name=disk0-fmt",
        "-device", "virtio-blk-pci,drive=disk0,id=vda",
        "-device", "virtio-balloon-pci,id=balloon0",
        "-pidfile", str(config.pid_file),
        "-daemonize",
    ]  # fmt: skip
    if config.tap:
        argv += [
            "-netdev", f"tap,id=net0,ifname={config.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net0,mac={config.mac},id=nic0",
        ]  # fmt: skip
    else:
        argv += ["-nic", "none"]
    return argv


def _label(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c == "-" else "-" for c in name.lower()).strip("-")
    return cleaned[:63] or "vm"


def _quote(word: str) -> str:
    return "'" + word.replace("'", "'\"'\"'") + "'"
