"""Local scaling: per-instance managers that carve siblings on this host and fold them back."""

from fleetvisor.agent.scaling.supervisor import ScalingSupervisor

__all__ = ["ScalingSupervisor"]
