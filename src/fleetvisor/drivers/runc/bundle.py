"""InstanceSpec + image config -> OCI runtime config (the bundle's config.json). Pure.

No I/O here: the driver reads the image config and the rootfs's /etc/passwd and hands
them in, so every rule below is testable without root.

Rules (what an operator of Docker/Kubernetes would expect):
- args: the instance's `command` replaces the image's Entrypoint and Cmd (Kubernetes
  `command` semantics; the spec has no separate `args`); without one, Entrypoint + Cmd.
- env: the image's Env, then the instance's env on top (same key: instance wins).
- cwd: the image's WorkingDir, else "/". user: the image's User resolved against the
  image's /etc/passwd and /etc/group, else root (0:0).
- resources: cpu quota = millicores x 100 us per 100 000 us period (1000 m = one CPU),
  cpu shares = millicores x 1024 / 1000 (the Kubernetes mapping), memory limit =
  MiB x 2^20, pids limit from the driver. 0 means "not limited" for cpu and memory.
- no rlimits (runc would fail to raise them above the agent's own on some hosts), the
  Docker default capability set, runc's default masked and read-only paths.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from fleetvisor.errors import InvalidInput
from fleetvisor.model.specs import InstanceSpec, ResourceVector

OCI_VERSION = "1.0.2-dev"
CPU_PERIOD_US = 100_000
MIN_CPU_QUOTA_US = 1_000  # the kernel refuses smaller quotas
DEFAULT_CPU_SHARES = 1024
MIN_CPU_SHARES = 2
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MIB = 1024 * 1024

# Docker's default set: enough for ordinary services (and for ping, which needs NET_RAW).
CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

# As `runc spec` writes them.
MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
]
READONLY_PATHS = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
]


def standard_mounts(hosts_file: str | None = None) -> list[dict[str, Any]]:
    """The mounts every container gets (runc spec's defaults), plus /etc/hosts if given."""
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
    ]
    if hosts_file:
        mounts.append(
            {
                "destination": "/etc/hosts",
                "type": "bind",
                "source": hosts_file,
                "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
            }
        )
    return mounts


def process_args(command: Sequence[str], image_config: Mapping[str, Any], image: str) -> list[str]:
    """The command line: the instance's command, else the image's Entrypoint + Cmd."""
    if command:
        return list(command)
    args = list(image_config.get("Entrypoint") or []) + list(image_config.get("Cmd") or [])
    if not args:
        raise InvalidInput(
            f"image {image!r} has no Entrypoint or Cmd: give the instance a command, "
            "e.g. command=['sh', '-c', '...']"
        )
    return args


def merge_env(image_env: Sequence[str], instance_env: Mapping[str, str]) -> list[str]:
    """Image Env ("K=V" strings) overlaid with the instance's env; PATH always present."""
    merged: dict[str, str] = {}
    for item in image_env:
        key, _, value = item.partition("=")
        if key:
            merged[key] = value
    for key, value in instance_env.items():
        if not key or "=" in key or "\x00" in key or "\x00" in value:
            raise InvalidInput(f"environment variable name {key!r} is not valid: use NAME=value")
        merged[key] = value
    merged.setdefault("PATH", DEFAULT_PATH)
    return [f"{key}={value}" for key, value in merged.items()]


def _entries(table: str) -> dict[str, tuple[str, str]]:
    """An /etc/passwd or /etc/group text -> {name: (field 2, field 3)} (id, primary gid)."""
    entries = {}
    for line in table.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0]:
            entries[fields[0]] = (fields[2], fields[3])
    return entries


def resolve_user(user: str, passwd: str = "", group: str = "") -> dict[str, int]:
    """Image `User` ("", "uid", "uid:gid", "name", "name:group") -> OCI {uid, gid}.

    Names are looked up in the image's own /etc/passwd and /etc/group texts; a user
    without a group gets its primary group from passwd (0 when passwd does not know it).
    """
    if not user:
        return {"uid": 0, "gid": 0}
    name, _, group_name = user.partition(":")
    users = _entries(passwd)
    if name.isdigit():
        uid = int(name)
        primary = next((g for u, g in users.values() if u == name), "0")
    elif name in users and users[name][0].isdigit():
        uid, primary = int(users[name][0]), users[name][1]
    else:
        raise InvalidInput(
            f"image user {name!r} is not in the image's /etc/passwd: set the image's User to "
            "a numeric uid[:gid] or add the user to the image"
        )
    if not group_name:
        return {"uid": uid, "gid": int(primary) if primary.isdigit() else 0}
    if group_name.isdigit():
        return {"uid": uid, "gid": int(group_name)}
    groups = _entries(group)
    if group_name not in groups or not groups[group_name][0].isdigit():
        raise InvalidInput(
            f"image group {group_name!r} is not in the image's /etc/group: use a numeric gid"
        )
    return {"uid": uid, "gid": int(groups[group_name][0])}


def hostname_for(name: str) -> str:
    """The instance name as a valid hostname label: [a-z0-9-], at most 63 characters."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label or "instance"


def cpu_quota_us(millicores: int) -> int | None:
    """CFS quota per CPU_PERIOD_US for `millicores`; None when not limited (0)."""
    if millicores <= 0:
        return None
    return max(MIN_CPU_QUOTA_US, millicores * CPU_PERIOD_US // 1000)


def cpu_shares(millicores: int) -> int:
    """Relative weight under contention: 1024 per CPU, like Kubernetes."""
    if millicores <= 0:
        return DEFAULT_CPU_SHARES
    return max(MIN_CPU_SHARES, millicores * 1024 // 1000)


def memory_limit_bytes(mib: int) -> int | None:
    return mib * MIB if mib > 0 else None


def linux_resources(resources: ResourceVector, pids_limit: int) -> dict[str, Any]:
    """linux.resources: cpu quota/period/shares, memory limit, pids limit, no devices."""
    cpu: dict[str, Any] = {"shares": cpu_shares(resources.vcpus)}
    quota = cpu_quota_us(resources.vcpus)
    if quota is not None:
        cpu.update(quota=quota, period=CPU_PERIOD_US)
    result: dict[str, Any] = {
        "devices": [{"allow": False, "access": "rwm"}],
        "cpu": cpu,
        "pids": {"limit": pids_limit},
    }
    limit = memory_limit_bytes(resources.memory)
    if limit is not None:
        result["memory"] = {"limit": limit}
    return result


def runtime_config(
    spec: InstanceSpec,
    image_config: Mapping[str, Any],
    *,
    netns_path: str,
    cgroups_path: str,
    pids_limit: int,
    passwd: str = "",
    group: str = "",
    hosts_file: str | None = None,
) -> dict[str, Any]:
    """The complete config.json for `spec`, with the rootfs at `<bundle>/rootfs`."""
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": resolve_user(str(image_config.get("User") or ""), passwd, group),
            "args": process_args(spec.command, image_config, spec.image),
            "env": merge_env(image_config.get("Env") or [], spec.env),
            "cwd": image_config.get("WorkingDir") or "/",
            "capabilities": {
                "bounding": list(CAPABILITIES),
                "effective": list(CAPABILITIES),
                "permitted": list(CAPABILITIES),
            },
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname_for(spec.name),
        "mounts": standard_mounts(hosts_file),
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": linux_resources(spec.resources, pids_limit),
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": netns_path},
            ],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


def with_resources(config: dict[str, Any], resources: ResourceVector) -> dict[str, Any]:
    """A copy of `config` with new cpu/memory limits (kept pids limit): for a resize to
    survive the next stop/start."""
    linux = dict(config["linux"])
    pids_limit = int(linux["resources"].get("pids", {}).get("limit", 0))
    linux["resources"] = linux_resources(resources, pids_limit)
    return {**config, "linux": linux}
