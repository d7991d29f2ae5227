"""Every name and path the QEMU driver uses, from (state dir, agent id, instance id).

Names share the runc driver's rules (`fv<agent>` prefix, 15-byte interface names) so
two agents, or an agent of each kind, never collide on one machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    state_dir: Path  # the driver's own directory (the agent's state dir / "qemu-driver")
    agent_id: str
    base_dir: Path  # shared read-only base disks, one per image disk digest
    # Unix sockets live apart from the state dir: their paths must fit in 108 bytes,
    # which a deep state dir would not leave room for.
    run_dir: Path = Path("/run/fleetvisor")

    @property
    def prefix(self) -> str:
        return f"fv{self.agent_id}"

    @property
    def instances_dir(self) -> Path:
        return self.state_dir / "instances"

    @property
    def network_state(self) -> Path:
        return self.state_dir / "network.json"

    @property
    def accel_cache(self) -> Path:
        return self.state_dir / "accel.json"

    @property
    def bridge(self) -> str:
        # `q`: its own bridge, apart from a runc driver of the same agent id
        return f"{self.prefix}-qbr"

    def base_disk(self, digest: str) -> Path:
        return self.base_dir / f"{digest.partition(':')[2]}.qcow2"

    def instance_dir(self, instance_id: str) -> Path:
        return self.instances_dir / instance_id

    def record(self, instance_id: str) -> Path:
        return self.instance_dir(instance_id) / "instance.json"

    def disk(self, instance_id: str) -> Path:
        """The instance's qcow2 overlay on the shared base: everything it wrote."""
        return self.instance_dir(instance_id) / "disk.qcow2"

    def console(self, instance_id: str) -> Path:
        """The guest's serial console (ttyS0), appended across boots."""
        return self.instance_dir(instance_id) / "console.log"

    def sockets_dir(self, instance_id: str) -> Path:
        return self.run_dir / self.prefix / instance_id

    def qmp_socket(self, instance_id: str) -> Path:
        return self.sockets_dir(instance_id) / "qmp.sock"

    def ctl_socket(self, instance_id: str) -> Path:
        """The guest's control channel (virtio-serial): one shell command per line."""
        return self.sockets_dir(instance_id) / "ctl.sock"

    def pid_file(self, instance_id: str) -> Path:
        return self.instance_dir(instance_id) / "qemu.pid"

    def qemu_log(self, instance_id: str) -> Path:
        """QEMU's own stderr (errors before it daemonizes)."""
        return self.instance_dir(instance_id) / "qemu.log"

    def tap(self, index: int) -> str:
        return f"{self.prefix}-t{index}"
