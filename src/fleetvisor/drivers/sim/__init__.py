"""The simulated driver: instances without processes, usage from a seeded workload model."""

from fleetvisor.drivers.sim.driver import SimDriver
from fleetvisor.drivers.sim.workload import WorkloadModel

__all__ = ["SimDriver", "WorkloadModel"]
