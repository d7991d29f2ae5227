"""Creating operation rows, and which states count as in flight."""

from __future__ import annotations

from fleetvisor.controller.naming import new_id
from fleetvisor.controller.settings import ControllerSettings
from fleetvisor.model.entities import OperationKind, OperationState
from fleetvisor.store.tables import InstanceRow, OperationRow

ACTIVE_OPS = (OperationState.PENDING, OperationState.RUNNING)


class GiveUp(Exception):
    """The agent stayed unreachable past the operation's deadline, or its host is down."""


def new_operation(
    instance: InstanceRow, kind: OperationKind, now: float, settings: ControllerSettings
) -> OperationRow:
    return OperationRow(
        id=new_id(),
        kind=kind,
        state=OperationState.PENDING,
        instance_id=instance.id,
        instance_name=instance.name,
        host_id=instance.host_id,
        step="",
        attempts=0,
        error="",
        params={},
        created_at=now,
        updated_at=now,
        deadline=now + settings.operation_timeout,
    )
