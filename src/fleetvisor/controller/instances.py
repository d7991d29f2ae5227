"""Instances: accept a request, place it, reserve capacity, and hand the work to an operation.

    create(_many) -> validate -> placement.place: fleet snapshot -> placement engine
              (filters, scoring models, groups; a batch is all-or-nothing) -> reserve
              (optimistic: host and group generations) + instances + operations + events,
              one transaction -> OperationRunner drives the agents
    start/stop -> desired power + operation; delete -> operation

An instance has at most one operation in flight; a second request while one runs is
a 409 that names the running operation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fleetvisor.clock import Clock
from fleetvisor.controller import events
from fleetvisor.controller.naming import check_name, new_id
from fleetvisor.controller.operation_records import ACTIVE_OPS, new_operation
from fleetvisor.controller.placement import (
    Stale,
    UtilizationHistory,
    build_fleet,
    place,
    serialize_placements,
)
from fleetvisor.controller.scaling import ensure_not_sibling, fold_siblings, group_out
from fleetvisor.controller.settings import ControllerSettings
from fleetvisor.errors import AlreadyExists, Conflict, InvalidInput, NotFound
from fleetvisor.model.entities import (
    InstanceStatus,
    OperationKind,
    PowerState,
)
from fleetvisor.model.health import HealthPolicy
from fleetvisor.model.resources import Resources
from fleetvisor.model.scaling import ScalingPolicy
from fleetvisor.scheduler import (
    PlacementDecision,
    PlacementEngine,
    PlacementRequest,
    SchedulerConfig,
)
from fleetvisor.store.db import Database
from fleetvisor.store.tables import (
    HostRow,
    InstanceRow,
    OperationRow,
    PlacementGroupRow,
)

RESERVE_ATTEMPTS = 8


def _check_request(request: InstanceRequest) -> None:
    check_name("instance", request.name)
    if not request.image.strip():
        raise InvalidInput("image must not be empty; pass e.g. --image busybox")
    if request.resources.vcpus <= 0 or request.resources.memory <= 0:
        raise InvalidInput("an instance needs cpu > 0 and memory > 0, e.g. --cpu 0.5 --memory 256M")


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
    required_labels: dict[str, str] = field(default_factory=dict)  # host labels k=v
    trusted_host: bool = False  # only hosts whose attestation is `trusted`
    scaling: ScalingPolicy | None = None  # the host carves siblings by this policy
    health: HealthPolicy | None = None  # probes, detectors, remedies (None: defaults)


class InstanceService:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        settings: ControllerSettings,
        image_lookup: Callable[[str], tuple[str, int] | None] | None = None,
        scheduler: SchedulerConfig | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        # image reference -> (manifest digest, size) when the fleet's registry holds it
        self.image_lookup = image_lookup or (lambda _image: None)
        self.scheduler = scheduler or SchedulerConfig()
        self.history = UtilizationHistory(db, clock)

    def create(self, request: InstanceRequest) -> tuple[InstanceRow, OperationRow]:
        return self.create_many([request])[0]

    def create_many(
        self, requests: Sequence[InstanceRequest]
    ) -> list[tuple[InstanceRow, OperationRow]]:
        """Place and reserve every instance, or none (a placement group's members at once)."""
        if not requests:
            raise InvalidInput("give at least one instance to create")
        names = [r.name for r in requests]
        if len(set(names)) != len(names):
            raise InvalidInput("instance names in one request must differ")
        for request in requests:
            _check_request(request)
        for attempt in range(RESERVE_ATTEMPTS):
            try:
                return self._place_and_reserve(requests)
            except Stale:
                if attempt == RESERVE_ATTEMPTS - 1:
                    raise Conflict(
                        "the fleet is changing too fast to place this; retry the request"
                    ) from None
        raise AssertionError("unreachable")

    def explain(self, request: InstanceRequest) -> dict[str, Any]:
        """Where `request` would go now and why, without reserving anything."""
        _check_request(request)
        history = self.history.get()  # before the session: never two connections at once
        with self.db.read() as session:
            fleet, _ = build_fleet(session, history)
            found = self.image_lookup(request.image)
            engine = PlacementEngine(fleet, self.scheduler)
            explanation = engine.explain(self._placement_request(request, found))
            return {"text": explanation.render(), **explanation.as_dict()}

    def _placement_request(
        self, request: InstanceRequest, found: tuple[str, int] | None
    ) -> PlacementRequest:
        return PlacementRequest(
            resources=request.resources,
            driver=request.driver,
            image=request.image,
            image_available=found is not None,
            name=request.name,
            groups=(request.placement_group,) if request.placement_group else (),
            required_labels=request.required_labels,
            trusted_host=request.trusted_host,
        )

    def _place_and_reserve(
        self, requests: Sequence[InstanceRequest]
    ) -> list[tuple[InstanceRow, OperationRow]]:
        # Read before the transaction: a thread that held the placement lock while
        # waiting for a second pooled connection could wait on threads waiting for it.
        history = self.history.get()
        found = [self.image_lookup(r.image) for r in requests]
        with self.db.write() as session:
            serialize_placements(session)
            now = self.clock.now()
            taken = set(
                session.scalars(
                    select(InstanceRow.name).where(InstanceRow.name.in_([r.name for r in requests]))
                )
            )
            if taken:
                name = sorted(taken)[0]
                raise AlreadyExists(
                    f"instance {name!r} already exists; pick another name "
                    f"or remove it first (fleetvisor rm {name})"
                )
            group_ids = {
                name: group_id
                for name, group_id in session.execute(
                    select(PlacementGroupRow.name, PlacementGroupRow.id)
                ).all()
            }
            for request in requests:
                if request.placement_group and request.placement_group not in group_ids:
                    raise NotFound(
                        f"placement group {request.placement_group!r} does not exist; "
                        "create it first (fleetvisor group create)"
                    )
            decisions = place(
                session,
                [self._placement_request(r, f) for r, f in zip(requests, found, strict=True)],
                config=self.scheduler,
                history=history,
            )
            created = []
            for request, image, decision in zip(requests, found, decisions, strict=True):
                created.append(self._insert(session, request, image, decision, group_ids, now))
            return created

    def _insert(
        self,
        session: Session,
        request: InstanceRequest,
        image: tuple[str, int] | None,
        decision: PlacementDecision,
        group_ids: dict[str, str],
        now: float,
    ) -> tuple[InstanceRow, OperationRow]:
        host = decision.host
        explanation = (
            {"text": decision.explanation.render(), **decision.explanation.as_dict()}
            if decision.explanation
            else {}
        )
        instance = InstanceRow(
            id=new_id(),
            name=request.name,
            image=request.image,
            image_digest=image[0] if image else None,
            driver=host.driver,
            command=request.command,
            env=request.env,
            labels=request.labels,
            vcpus=request.resources.vcpus,
            memory=request.resources.memory,
            disk=request.resources.disk,
            net=request.resources.net,
            placement_group_id=group_ids.get(request.placement_group or ""),
            host_id=host.id,
            desired_power=PowerState.RUNNING if request.start else PowerState.STOPPED,
            status=InstanceStatus.PENDING,
            status_message="",
            usage={},
            placement=explanation,
            trusted_host=request.trusted_host,
            scaling_policy=request.scaling.model_dump(mode="json") if request.scaling else None,
            health_policy=request.health.model_dump(mode="json") if request.health else None,
            required_labels=dict(request.required_labels) or None,
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
            f"{instance.name} placed on {host.name} (score {decision.score:.1f}), "
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
            ensure_not_sibling(instance, "start or stop")
            if power == PowerState.STOPPED:
                fold_siblings(session, instance)  # the host folds them before it stops
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
            ensure_not_sibling(instance, "remove")
            fold_siblings(session, instance)  # the host removes them with it
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

    def migrate(self, name: str, to: str | None = None, mode: str = "auto") -> OperationRow:
        """Move the instance to another host with its state (controller/migrations.py)."""
        from fleetvisor.controller.migrations import request_migration

        now = self.clock.now()
        with self.db.write() as session:
            instance = self._get(session, name)
            return request_migration(
                session, instance, now=now, settings=self.settings, to=to, mode=mode,
                reason="requested by an operator",
            )  # fmt: skip

    def set_scaling_policy(self, name: str, policy: ScalingPolicy | None) -> InstanceRow:
        """Store the policy (None removes it); the host takes it up at once when it can
        be reached, else with its next heartbeat."""
        now = self.clock.now()
        with self.db.write() as session:
            instance = self._get(session, name)
            ensure_idle(session, instance)
            ensure_not_sibling(instance, "set the policy on")
            instance.scaling_policy = policy.model_dump(mode="json") if policy else None
            instance.updated_at = now
            events.record(
                session,
                now,
                "instance.scaling_policy",
                f"instance/{name}",
                f"{name}: scaling policy {'set: ' + policy.describe() if policy else 'removed'}",
                policy=instance.scaling_policy,
            )
            return instance

    def names_of(self, ids: set[str]) -> dict[str, str]:
        if not ids:
            return {}
        with self.db.read() as session:
            rows = session.execute(
                select(InstanceRow.id, InstanceRow.name).where(InstanceRow.id.in_(list(ids)))
            )
            return {k: v for k, v in rows.all()}

    def scaling(self, name: str) -> dict[str, Any]:
        with self.db.read() as session:
            instance = self._get(session, name)
            if instance.parent_id is not None:
                parent = session.get(InstanceRow, instance.parent_id)
                return {"parent": parent.name if parent else None}
            return group_out(session, instance)

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
