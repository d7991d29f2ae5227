"""Plain typed data shared by every layer. No I/O here."""

from fleetvisor.model.entities import (
    Event,
    HostState,
    InstanceStatus,
    OperationKind,
    OperationState,
    PlacementPolicy,
    PlacementScope,
    PlacementStrength,
    PowerState,
)
from fleetvisor.model.resources import Resources, parse_cpu, parse_size_gib, parse_size_mib

__all__ = [
    "Event",
    "HostState",
    "InstanceStatus",
    "OperationKind",
    "OperationState",
    "PlacementPolicy",
    "PlacementScope",
    "PlacementStrength",
    "PowerState",
    "Resources",
    "parse_cpu",
    "parse_size_gib",
    "parse_size_mib",
]
