"""Hosts: registration, heartbeats, liveness, and reconciling what an agent reports.

    agent --register(instances)--> controller: upsert host, new host token, reconcile
    agent --heartbeat(metrics, instances)--> controller: liveness, reconcile
    health loop: no heartbeat for interval x missed -> host down, its instances unknown

Reconciling a report: an instance the store places on this host but the agent lacks
gets a `recover` operation (recreated there); an instance the agent has that the
store does not know is returned in `destroy` (the agent removes it); instances with
an operation in flight are left to that operation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.orm import Session

from fleetvisor.clock import Clock
from fleetvisor.controller import events
from fleetvisor.controller.attestation import awaiting_attestation
from fleetvisor.controller.instance_specs import instance_spec
from fleetvisor.controller.naming import check_name, new_id
from fleetvisor.controller.operation_records import ACTIVE_OPS, new_operation
from fleetvisor.controller.remedies import on_detections, on_host_down, on_host_draining
from fleetvisor.controller.scaling import fold_siblings, sync_groups
from fleetvisor.controller.settings import ControllerSettings
from fleetvisor.controller.tokens import digest, new_token
from fleetvisor.errors import InvalidInput, NotFound
from fleetvisor.model.entities import HostState, InstanceStatus, OperationKind
from fleetvisor.model.health import Detection
from fleetvisor.model.scaling import ScalingNotice
from fleetvisor.model.specs import CacheReport, HostInfo, InstanceReport, InstanceSpec
from fleetvisor.scheduler.telemetry import utilization_from_metrics
from fleetvisor.store.db import Database
from fleetvisor.store.tables import ClusterRow, HostRow, HostSampleRow, InstanceRow, OperationRow

_REPORTED_STATUS = {
    "running": InstanceStatus.RUNNING,
    "stopped": InstanceStatus.STOPPED,
    "created": InstanceStatus.STOPPED,
}


@dataclass
class Registration:
    host: HostRow
    token: str
    destroy: list[str] = field(default_factory=list)


@dataclass
class ReconcileResult:
    destroy: list[str] = field(default_factory=list)  # ids the agent should remove
    recover: list[str] = field(default_factory=list)  # operation ids created
    scaling: list[InstanceSpec] = field(default_factory=list)  # policies the host lacks


class HostRegistry:
    def __init__(self, db: Database, clock: Clock, settings: ControllerSettings) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        self.evacuations: list[str] = []  # migrations the health loop created (wake the runner)

    def register(
        self,
        *,
        name: str,
        cluster: str,
        agent_url: str,
        agent_token: str,
        info: HostInfo,
        labels: dict[str, str],
        instances: list[InstanceReport],
        ready: bool = True,
        cache: CacheReport | None = None,
    ) -> Registration:
        """Upsert the host. `ready=False`: it prepares first (e.g. fills its image cache)
        and stays `booting`, taking no instances, until a heartbeat says ready."""
        check_name("host", name)
        token = new_token("fvh")
        now = self.clock.now()
        with self.db.write() as session:
            cluster_row = session.scalar(select(ClusterRow).where(ClusterRow.name == cluster))
            if cluster_row is None:
                raise NotFound(
                    f"cluster {cluster!r} does not exist; create it first "
                    "(fleetvisor cluster create) or pass an existing --cluster"
                )
            host = session.scalar(select(HostRow).where(HostRow.name == name))
            capacity = info.capacity
            fields: dict[str, Any] = dict(
                cluster_id=cluster_row.id,
                agent_url=agent_url,
                token_hash=digest(token),
                agent_token=agent_token,
                driver=info.driver,
                capabilities=info.capabilities,
                cpu_model=info.cpu_model,
                cpu_features=info.cpu_features,
                labels=labels,
                cap_vcpus=capacity.vcpus,
                cap_memory=capacity.memory,
                cap_disk=capacity.disk,
                cap_net=capacity.net,
                last_heartbeat=now,
                **awaiting_attestation(now),  # a (re-)registered host proves its boot again
            )
            if cache is not None:
                fields["cache"] = cache.model_dump()
            if host is None:
                host = HostRow(
                    id=new_id(),
                    name=name,
                    registered_at=now,
                    metrics={},
                    generation=0,
                    alloc_vcpus=0,
                    alloc_memory=0,
                    alloc_disk=0,
                    alloc_net=0,
                    state=HostState.READY if ready else HostState.BOOTING,
                    **fields,
                )
                session.add(host)
                events.record(
                    session,
                    now,
                    "host.registered",
                    f"host/{name}",
                    f"host {name} joined cluster {cluster} with "
                    f"{capacity.to_resources().describe()} ({info.driver} driver)",
                    capabilities=info.capabilities,
                )
            else:
                was = host.state
                for key, value in fields.items():
                    setattr(host, key, value)
                # An agent restart does not undo an operator's drain.
                if was != HostState.DRAINING:
                    host.state = HostState.READY if ready else HostState.BOOTING
                host.generation += 1
                events.record(
                    session,
                    now,
                    "host.up" if was == HostState.DOWN else "host.registered",
                    f"host/{name}",
                    f"host {name} registered again (was {was}) and "
                    f"reported {len(instances)} instance(s)",
                    previous_state=was,
                )
            session.flush()
            result = self._reconcile(session, host, instances, now)
        return Registration(host=host, token=token, destroy=result.destroy)

    def heartbeat(
        self,
        host_id: str,
        *,
        metrics: dict[str, Any],
        instances: list[InstanceReport],
        ready: bool | None = None,
        cache: CacheReport | None = None,
        scaling_events: list[ScalingNotice] | None = None,
        detections: list[Detection] | None = None,
    ) -> ReconcileResult:
        now = self.clock.now()
        with self.db.write() as session:
            host = session.get(HostRow, host_id)
            if host is None:
                raise NotFound("this host is not registered any more; register it again")
            previous_heartbeat = host.last_heartbeat
            host.last_heartbeat = now
            host.metrics = metrics
            sample = now - host.last_sample_at >= self.settings.sample_interval
            if sample:
                fractions = utilization_from_metrics(metrics, host.capacity)
                session.add(
                    HostSampleRow(
                        host_id=host.id,
                        at=now,
                        cpu=fractions["vcpus"],
                        memory=fractions["memory"],
                        net=fractions["net"],
                    )
                )
                host.last_sample_at = now
            if cache is not None:
                host.cache = cache.model_dump()
            if host.state == HostState.DOWN:
                host.state = HostState.BOOTING if ready is False else HostState.READY
                events.record(
                    session,
                    now,
                    "host.up",
                    f"host/{host.name}",
                    f"host {host.name} is back: heartbeats resumed",
                )
            elif host.state == HostState.BOOTING and ready:
                host.state = HostState.READY
                events.record(
                    session,
                    now,
                    "host.ready",
                    f"host/{host.name}",
                    f"host {host.name} is ready: it takes instances now",
                    cache=host.cache.get("counters", {}),
                )
            result = self._reconcile(
                session,
                host,
                instances,
                now,
                previous_heartbeat,
                record_usage=sample,
                notices=scaling_events or [],
            )
            if detections:
                result.recover.extend(on_detections(session, host, detections, now, self.settings))
            return result

    def mark_stale_hosts_down(self) -> list[str]:
        """Hosts whose last heartbeat is older than the allowed gap become `down`; the
        instances whose health policy says so are evacuated (`self.evacuations`)."""
        now = self.clock.now()
        cutoff = now - self.settings.down_after_seconds
        with self.db.write() as session:
            stale = list(
                session.scalars(
                    select(HostRow).where(
                        HostRow.state.in_([HostState.READY, HostState.DRAINING, HostState.BOOTING]),
                        HostRow.last_heartbeat < cutoff,
                    )
                )
            )
            for host in stale:
                host.state = HostState.DOWN
                gap = now - host.last_heartbeat
                affected = cast(
                    CursorResult[Any],
                    session.execute(
                        update(InstanceRow)
                        .where(InstanceRow.host_id == host.id)
                        .values(
                            status=InstanceStatus.UNKNOWN,
                            updated_at=now,
                            status_message=f"host {host.name} is down",
                        )
                    ),
                ).rowcount
                events.record(
                    session,
                    now,
                    "host.down",
                    f"host/{host.name}",
                    f"host {host.name} missed heartbeats for {gap:.1f}s "
                    f"(limit {self.settings.down_after_seconds:.1f}s); "
                    f"{affected} instance(s) now unknown",
                    last_heartbeat=host.last_heartbeat,
                    gap_seconds=round(gap, 3),
                    instances_affected=affected,
                )
                session.flush()
                self.evacuations.extend(on_host_down(session, host, now, self.settings))
            return [host.name for host in stale]

    def prune_samples(self) -> int:
        """Drop utilization samples older than the retention; returns how many."""
        cutoff = self.clock.now() - self.settings.sample_retention
        with self.db.write() as session:
            result = session.execute(delete(HostSampleRow).where(HostSampleRow.at < cutoff))
            return int(cast(CursorResult[Any], result).rowcount or 0)

    def get(self, name: str) -> HostRow:
        with self.db.read() as session:
            host = session.scalar(select(HostRow).where(HostRow.name == name))
            if host is None:
                raise NotFound(f"host {name!r} does not exist; see `fleetvisor hosts`")
            return host

    def by_id(self, host_id: str) -> HostRow | None:
        with self.db.read() as session:
            return session.get(HostRow, host_id)

    def all(self) -> list[HostRow]:
        with self.db.read() as session:
            return list(session.scalars(select(HostRow).order_by(HostRow.name)))

    def authenticate(self, token: str) -> HostRow | None:
        with self.db.read() as session:
            return session.scalar(select(HostRow).where(HostRow.token_hash == digest(token)))

    def set_state(self, name: str, state: HostState) -> HostRow:
        return self.change_state(name, state)[0]

    def drain(self, name: str) -> tuple[HostRow, list[str]]:
        """Take no new instances, and migrate every instance off, one after the other."""
        return self.change_state(name, HostState.DRAINING, evacuate=True)

    def change_state(
        self, name: str, state: HostState, *, evacuate: bool = False
    ) -> tuple[HostRow, list[str]]:
        """Set ready or draining. Draining migrates the instances whose health policy says
        so (`evacuate`: every instance); returns the migrations created."""
        if state not in (HostState.READY, HostState.DRAINING):
            raise InvalidInput(f"a host can be set to ready or draining, not {state}")
        with self.db.write() as session:
            host = session.scalar(select(HostRow).where(HostRow.name == name))
            if host is None:
                raise NotFound(f"host {name!r} does not exist; see `fleetvisor hosts`")
            if host.state == HostState.DOWN:
                raise InvalidInput(f"host {name} is down; it becomes ready when its agent returns")
            if host.state != state:
                events.record(
                    session,
                    self.clock.now(),
                    f"host.{state}",
                    f"host/{name}",
                    f"host {name} set to {state} (was {host.state})",
                )
                host.state = state
            created: list[str] = []
            if state == HostState.DRAINING:
                session.flush()
                created = on_host_draining(
                    session, host, self.clock.now(), self.settings, every=evacuate
                )
            return host, created

    def _reconcile(
        self,
        session: Session,
        host: HostRow,
        reports: list[InstanceReport],
        now: float,
        previous_heartbeat: float | None = None,
        record_usage: bool = False,
        notices: list[ScalingNotice] | None = None,
    ) -> ReconcileResult:
        result = ReconcileResult()
        reported = {report.id: report for report in reports}
        busy = set(
            session.scalars(
                select(OperationRow.instance_id).where(
                    OperationRow.state.in_(ACTIVE_OPS), OperationRow.instance_id.is_not(None)
                )
            )
        )
        placed = list(session.scalars(select(InstanceRow).where(InstanceRow.host_id == host.id)))
        # Siblings carved by local scaling: adopted, folded and accounted for first.
        groups = sync_groups(session, host, reported, placed, busy, notices or [], now)
        result.destroy.extend(groups.destroy)
        by_id = {row.id: row for row in placed}
        result.scaling.extend(instance_spec(by_id[i]) for i in groups.push_policy)
        placed = [row for row in placed if row.id not in groups.handled]
        for instance in placed:
            if instance.id in busy:
                continue
            if previous_heartbeat is not None and instance.updated_at > previous_heartbeat:
                # Changed (e.g. by an operation that just ended) since the previous
                # heartbeat: this report may predate the change; the next one settles it.
                continue
            report = reported.get(instance.id)
            if report is None:
                fold_siblings(session, instance)  # the host lost them too: recreate it whole
                op = new_operation(instance, OperationKind.RECOVER, now, self.settings)
                session.add(op)
                instance.status = InstanceStatus.PENDING
                instance.status_message = f"missing on host {host.name}; recreating it there"
                instance.updated_at = now
                events.record(
                    session,
                    now,
                    "instance.missing",
                    f"instance/{instance.name}",
                    f"host {host.name} does not have {instance.name}; recreating it",
                    operation=op.id,
                )
                result.recover.append(op.id)
                continue
            if record_usage:
                instance.usage = dict(report.usage)
            if report.address != instance.address:
                instance.address = report.address
            status = _REPORTED_STATUS.get(report.state, InstanceStatus.ERROR)
            if instance.status != status:
                events.record(
                    session,
                    now,
                    f"instance.{status}",
                    f"instance/{instance.name}",
                    f"{instance.name} is {status} on {host.name} (was {instance.status})",
                    previous=instance.status,
                )
                instance.status = status
                instance.status_message = ""
                instance.updated_at = now
        if reported:
            known = set(
                session.scalars(select(InstanceRow.id).where(InstanceRow.id.in_(list(reported))))
            )
            for instance_id, report in reported.items():
                if instance_id in groups.handled:
                    continue
                if instance_id not in known and instance_id not in busy:
                    result.destroy.append(instance_id)
                    events.record(
                        session,
                        now,
                        "instance.orphan",
                        f"host/{host.name}",
                        f"host {host.name} runs {report.name} ({instance_id}), which the "
                        "fleet does not know (deleted or rolled back); removing it",
                        instance_id=instance_id,
                    )
                elif (
                    instance_id in known
                    and instance_id not in {i.id for i in placed}
                    and instance_id not in busy
                ):
                    # The store places it elsewhere: this copy is a duplicate.
                    result.destroy.append(instance_id)
                    events.record(
                        session,
                        now,
                        "instance.duplicate",
                        f"host/{host.name}",
                        f"host {host.name} runs a copy of {report.name} that belongs "
                        "elsewhere; removing the copy",
                        instance_id=instance_id,
                    )
        return result
