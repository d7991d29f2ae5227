"""The QEMU driver: each instance a QEMU process driven over QMP (see README.md)."""

from fleetvisor.drivers.qemu.driver import QemuDriver

__all__ = ["QemuDriver"]
