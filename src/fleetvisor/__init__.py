"""fleetvisor: a control plane for fleets of virtualization hosts."""

__version__ = "0.1.0"
