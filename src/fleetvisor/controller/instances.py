"""Instances: accept a request, place it, reserve capacity, and hand the work to an operation.

    create -> validate -> snapshot ready hosts -> first fit -> reserve (optimistic,
              host generation) + insert instance + insert operation, one transaction
           -> OperationRunner drives the agent
    start/stop -> desired power + operation; delete -> operation

An instance has at most one operation in flight; a second request while one runs is
a 409 that names the running operation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from fleetvisor.clock import Clock
from fleetvisor.controller import events
from fleetvisor.controller.naming import check_name, new_id
from fleetvisor.controller.operation_records import ACTIVE_OPS, new_operation
from fleetvisor.controller.settings import ControllerSettings
from fleetvisor.errors import AlreadyExists, Conflict, InvalidInput, NotFound
from fleetvisor.model.entities import (
    HostState,
    InstanceStatus,
    OperationKind,
    PowerState,
)
from fleetvisor.model.resources import Resources
from fleetvisor.scheduler import HostCandidate, PlacementRequest, first_fit
from fleetvisor.store.db import Database
from fleetvisor.store.tables import (
    ClusterRow,
    HostRow,
    InstanceRow,
    OperationRow,
    PlacementGroupRow,
    SiteRow,
)

RESERVE_ATTEMPTS = 8


@dataclass
class InstanceRequest:
    name: str
    image: str
    resources: Resources
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    driver: str | None = None
    placement_group: str | None = None
    start: bool = True


class _StaleSnapshot(Exception):
    """Another reservation changed the chosen host first: place again."""


class InstanceService:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        settings: ControllerSettings,
        image_lookup: Callable[[str], tuple[str, int] | None] | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        # image reference -> (manifest digest, size) when the fleet's registry holds it
        self.image_lookup = image_lookup or (lambda _image: None)

    def create(self, request: InstanceRequest) -> tuple[InstanceRow, OperationRow]:
        check_name("instance", request.name)
        if not request.image.strip():
            raise InvalidInput("image must not be empty; pass e.g. --image busybox")
        if request.resources.vcpus <= 0 or request.resources.memory <= 0:
            raise InvalidInput(
                "an instance needs cpu > 0 and memory > 0, e.g. --cpu 0.5 --memory 256M"
            )
        for attempt in range(RESERVE_ATTEMPTS):
            try:
                return self._place_and_reserve(request)
            except _StaleSnapshot:
                if attempt == RESERVE_ATTEMPTS - 1:
                    raise Conflict(
                        "the fleet is changing too fast to place this instance; retry the request"
                    ) from None
        raise AssertionError("unreachable")

    def _place_and_reserve(self, request: InstanceRequest) -> tuple[InstanceRow, OperationRow]:
        now = self.clock.now()
        with self.db.write() as session:
            if session.scalar(select(InstanceRow.id).where(InstanceRow.name == request.name)):
                raise AlreadyExists(
                    f"instance {request.name!r} already exists; pick another name "
                    f"or remove it first (fleetvisor rm {request.name})"
                )
            group_id = None
            if request.placement_group:
                group_id = session.scalar(
                    select(PlacementGroupRow.id).where(
                        PlacementGroupRow.name == request.placement_group
                    )
                )
                if group_id is None:
                    raise NotFound(
                        f"placement group {request.placement_group!r} does not exist; "
                        "create it first (fleetvisor group create)"
                    )
            found = self.image_lookup(request.image)
            decision = first_fit(
                snapshot(session),
                PlacementRequest(
                    resources=request.resources,
                    driver=request.driver,
                    image=request.image,
                    image_available=found is not None,
                ),
            )
            host = decision.host
            reserved = reserve(session, host.id, host.generation, request.resources)
            if not reserved:
                raise _StaleSnapshot()
            instance = InstanceRow(
                id=new_id(),
                name=request.name,
                image=request.image,
                image_digest=found[0] if found else None,
                driver=host.driver,
                command=request.command,
                env=request.env,
                labels=request.labels,
                vcpus=request.resources.vcpus,
                memory=request.resources.memory,
                disk=request.resources.disk,
                net=request.resources.net,
                placement_group_id=group_id,
                host_id=host.id,
                desired_power=PowerState.RUNNING if request.start else PowerState.STOPPED,
                status=InstanceStatus.PENDING,
                status_message="",
                created_at=now,
                updated_at=now,
            )
            session.add(instance)
            op = new_operation(instance, OperationKind.CREATE, now, self.settings)
            session.add(op)
            events.record(
                session,
                now,
                "instance.placed",
                f"instance/{instance.name}",
                f"{instance.name} placed on {host.name} (first fit), "
                f"{request.resources.describe()} reserved",
                host=host.name,
                operation=op.id,
                rejected=decision.rejected,
                image=request.image,
            )
            return instance, op

    def set_power(self, name: str, power: PowerState) -> OperationRow:
        now = self.clock.now()
        kind = OperationKind.START if power == PowerState.RUNNING else OperationKind.STOP
        with self.db.write() as session:
            instance = self._get(session, name)
            ensure_idle(session, instance)
            instance.desired_power = power
            instance.status = (
                InstanceStatus.STARTING if power == PowerState.RUNNING else InstanceStatus.STOPPING
            )
            instance.updated_at = now
            op = new_operation(instance, kind, now, self.settings)
            session.add(op)
            events.record(
                session,
                now,
                f"instance.{kind}_requested",
                f"instance/{name}",
                f"{kind} of {name} requested",
                operation=op.id,
            )
            return op

    def delete(self, name: str) -> OperationRow:
        now = self.clock.now()
        with self.db.write() as session:
            instance = self._get(session, name)
            ensure_idle(session, instance)
            instance.status = InstanceStatus.DELETING
            instance.updated_at = now
            op = new_operation(instance, OperationKind.DELETE, now, self.settings)
            session.add(op)
            events.record(
                session,
                now,
                "instance.delete_requested",
                f"instance/{name}",
                f"removal of {name} requested",
                operation=op.id,
            )
            return op

    def get(self, name: str) -> InstanceRow:
        with self.db.read() as session:
            return self._get(session, name)

    def all(self, host: str | None = None, status: str | None = None) -> list[InstanceRow]:
        with self.db.read() as session:
            query = select(InstanceRow).order_by(InstanceRow.name)
            if host:
                query = query.join(HostRow, InstanceRow.host_id == HostRow.id).where(
                    HostRow.name == host
                )
            if status:
                query = query.where(InstanceRow.status == status)
            return list(session.scalars(query))

    @staticmethod
    def _get(session: Session, name: str) -> InstanceRow:
        instance = session.scalar(select(InstanceRow).where(InstanceRow.name == name))
        if instance is None:
            raise NotFound(f"instance {name!r} does not exist; see `fleetvisor ls`")
        return instance


def snapshot(session: Session) -> list[HostCandidate]:
    rows = session.execute(
        select(HostRow, ClusterRow.name, SiteRow.name)
        .join(ClusterRow, HostRow.cluster_id == ClusterRow.id)
        .join(SiteRow, ClusterRow.site_id == SiteRow.id)
        .where(HostRow.state == HostState.READY)
    )
    return [
        HostCandidate(
            id=h.id,
            name=h.name,
            state=h.state,
            driver=h.driver,
            capacity=h.capacity,
            allocated=h.allocated,
            generation=h.generation,
            cluster=cluster,
            site=site,
            labels=h.labels,
            capabilities=frozenset(h.capabilities),
            cached_layers=frozenset(layer["digest"] for layer in (h.cache or {}).get("layers", [])),
        )
        for h, cluster, site in rows
    ]


def reserve(session: Session, host_id: str, generation: int, resources: Resources) -> bool:
    """Add `resources` to the host's allocation if nobody changed it since `generation`."""
    result = session.execute(
        update(HostRow)
        .where(HostRow.id == host_id, HostRow.generation == generation)
        .values(
            alloc_vcpus=HostRow.alloc_vcpus + resources.vcpus,
            alloc_memory=HostRow.alloc_memory + resources.memory,
            alloc_disk=HostRow.alloc_disk + resources.disk,
            alloc_net=HostRow.alloc_net + resources.net,
            generation=HostRow.generation + 1,
        )
        .execution_options(synchronize_session=False)
    )
    return cast(CursorResult[Any], result).rowcount == 1


def release(session: Session, host_id: str, resources: Resources) -> None:
    session.execute(
        update(HostRow)
        .where(HostRow.id == host_id)
        .values(
            alloc_vcpus=HostRow.alloc_vcpus - resources.vcpus,
            alloc_memory=HostRow.alloc_memory - resources.memory,
            alloc_disk=HostRow.alloc_disk - resources.disk,
            alloc_net=HostRow.alloc_net - resources.net,
            generation=HostRow.generation + 1,
        )
        .execution_options(synchronize_session=False)
    )


def ensure_idle(session: Session, instance: InstanceRow) -> None:
    running = session.scalar(
        select(OperationRow).where(
            OperationRow.instance_id == instance.id, OperationRow.state.in_(ACTIVE_OPS)
        )
    )
    if running is not None:
        raise Conflict(
            f"instance {instance.name} is busy with a {running.kind} operation "
            f"({running.id}); wait for it: fleetvisor op wait {running.id}",
            operation=running.id,
        )
