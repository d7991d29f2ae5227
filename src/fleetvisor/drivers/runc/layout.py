"""Every name and path the runc driver uses, derived from one agent id.

Two agents on one machine (or two parallel test runs) must never touch each other's
containers, cgroups, network namespaces or links, so every one of those names starts
with a per-agent prefix. All of them are computed here, in one place, from
(state dir, agent id, instance id); nothing else in the driver invents a name.

Linux limits interface names to 15 bytes, which is why link names use a short prefix
(`fv` + agent id, at most 8 characters) and a per-host address index instead of the
instance id.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from fleetvisor.errors import InvalidInput

AGENT_ID = re.compile(r"^[a-z0-9]{1,6}$")
# runc accepts container ids matching ^[\w+-\.]+$; we are stricter so the id is also a
# safe path component, netns name and cgroup name.
INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def default_agent_id(state_dir: Path) -> str:
    """A stable 6-hex-digit id from the state dir's absolute path.

    Stable across agent restarts (same state dir, same names, so the agent finds its
    containers again) and different for two agents with different state dirs.
    """
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:6]


def check_agent_id(agent_id: str) -> str:
    if not AGENT_ID.match(agent_id):
        raise InvalidInput(
            f"runc driver agent_id {agent_id!r} must be 1-6 lowercase letters or digits "
            "(it goes into 15-byte interface names), e.g. agent_id=a1b2c3"
        )
    return agent_id


def check_instance_id(instance_id: str) -> str:
    if not INSTANCE_ID.match(instance_id):
        raise InvalidInput(
            f"instance id {instance_id!r} cannot name a container: use 1-100 letters, digits, "
            "'_', '.' or '-', starting with a letter or digit"
        )
    return instance_id


@dataclass(frozen=True)
class Layout:
    """Names and paths for one agent's runc driver."""

    state_dir: Path  # the driver's own directory (the agent's state dir / "runc-driver")
    agent_id: str

    @property
    def prefix(self) -> str:
        """Prefix of every container id, netns and link this agent creates: `fv<agent>`."""
        return f"fv{self.agent_id}"

    @property
    def runc_root(self) -> Path:
        """runc's own state (`runc --root`): one per agent, never the system default."""
        return self.state_dir / "runc"

    @property
    def instances_dir(self) -> Path:
        return self.state_dir / "instances"

    @property
    def network_state(self) -> Path:
        return self.state_dir / "network.json"

    @property
    def cgroup_parent(self) -> str:
        """The cgroup (in every v1 hierarchy) holding this agent's containers."""
        return f"/fleetvisor-{self.agent_id}"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    def instance_dir(self, instance_id: str) -> Path:
        """The OCI bundle directory (config.json + rootfs) plus the instance's own files."""
        return self.instances_dir / instance_id

    def record(self, instance_id: str) -> Path:
        return self.instance_dir(instance_id) / "instance.json"

    def config(self, instance_id: str) -> Path:
        return self.instance_dir(instance_id) / "config.json"

    def rootfs(self, instance_id: str) -> Path:
        """The overlay mount point: the container's root filesystem."""
        return self.instance_dir(instance_id) / "rootfs"

    def upper(self, instance_id: str) -> Path:
        """The overlay upper dir: everything the instance wrote. Kept across stop/start."""
        return self.instance_dir(instance_id) / "upper"

    def work(self, instance_id: str) -> Path:
        return self.instance_dir(instance_id) / "work"

    def log(self, instance_id: str) -> Path:
        """The container's stdout and stderr, appended across starts."""
        return self.instance_dir(instance_id) / "container.log"

    def pid_file(self, instance_id: str) -> Path:
        return self.instance_dir(instance_id) / "container.pid"

    def hosts_file(self, instance_id: str) -> Path:
        return self.instance_dir(instance_id) / "hosts"

    def container_id(self, instance_id: str) -> str:
        return f"{self.prefix}-{instance_id}"

    def cgroups_path(self, instance_id: str) -> str:
        return f"{self.cgroup_parent}/{instance_id}"

    def netns(self, instance_id: str) -> str:
        return f"{self.prefix}-{instance_id}"

    def netns_path(self, instance_id: str) -> Path:
        return Path("/run/netns") / self.netns(instance_id)

    def host_veth(self, index: int) -> str:
        """Host end of an instance's veth pair, on the bridge (index = address slot)."""
        return f"{self.prefix}-h{index}"

    def peer_veth(self, index: int) -> str:
        """Temporary name of the container end, before it becomes eth0 in the netns."""
        return f"{self.prefix}-c{index}"
