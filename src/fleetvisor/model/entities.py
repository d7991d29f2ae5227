"""States and kinds of the fleet's objects, and the Event record.

Rows live in the store; these enums are the vocabulary every layer shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class HostState(StrEnum):
    BOOTING = "booting"
    READY = "ready"
    DRAINING = "draining"
    HIBERNATING = "hibernating"
    DOWN = "down"


class PowerState(StrEnum):
    """What the user wants an instance to be."""

    RUNNING = "running"
    STOPPED = "stopped"


class InstanceStatus(StrEnum):
    """What the instance is, as last observed."""

    PENDING = "pending"  # accepted, host reserved, not yet created on the host
    CREATING = "creating"
    RUNNING = "running"
    STOPPED = "stopped"
    STARTING = "starting"
    STOPPING = "stopping"
    DELETING = "deleting"
    UNKNOWN = "unknown"  # its host is down: we cannot see it
    ERROR = "error"


class PlacementPolicy(StrEnum):
    AFFINITY = "affinity"
    ANTI_AFFINITY = "anti-affinity"


class PlacementStrength(StrEnum):
    HARD = "hard"
    SOFT = "soft"


class PlacementScope(StrEnum):
    HOST = "host"
    CLUSTER = "cluster"
    SITE = "site"


class OperationKind(StrEnum):
    CREATE = "create"
    START = "start"
    STOP = "stop"
    DELETE = "delete"
    RECOVER = "recover"  # recreate an instance its host lost, on the same host
    MOVE = "move"  # cold move to another host (a rebalance step)
    MIGRATE = "migrate"  # to another host with its state (live or cold)


class OperationState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"

    @property
    def terminal(self) -> bool:
        return self in (self.SUCCEEDED, self.FAILED, self.ROLLED_BACK)


@dataclass(frozen=True, slots=True)
class Event:
    """One append-only record of a state change."""

    kind: str  # e.g. "instance.running", "host.down"
    subject: str  # e.g. "instance/web-1", "host/host-2"
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    at: float | None = None
