"""From the store to the placement engine and back, inside one write transaction.

    host rows + cluster/site names + group rows + instances (members, neighbours' usage)
    + hourly utilization history  ──> FleetSnapshot ──> PlacementEngine.place / place_batch
    ──> reserve every host (UPDATE … WHERE generation = seen) and bump every group used
        (same rule), or raise Stale and place again from a fresh snapshot

Placements are serialised: SQLite's writers queue (BEGIN IMMEDIATE), and on PostgreSQL
each placement transaction first takes one advisory lock, so concurrent creates do
not race into retries. The generation checks stay as the safety net (another
controller, a manual edit): two creates in one anti-affinity group landing on
different hosts of one cluster would each pass a host check, but not the group's.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import CursorResult, select, text, update
from sqlalchemy.orm import Session

from fleetvisor.clock import Clock
from fleetvisor.model.entities import PlacementPolicy, PlacementScope, PlacementStrength
from fleetvisor.model.resources import Resources
from fleetvisor.scheduler import (
    FleetSnapshot,
    GroupMember,
    HostCandidate,
    InstanceUsage,
    PlacementDecision,
    PlacementEngine,
    PlacementGroupSpec,
    PlacementRequest,
    SchedulerConfig,
    place_batch,
)
from fleetvisor.scheduler.telemetry import METRICS
from fleetvisor.store.db import Database
from fleetvisor.store.tables import (
    ClusterRow,
    HostRow,
    HostSampleRow,
    InstanceRow,
    PlacementGroupRow,
    SiteRow,
)

HOUR = 3600.0


class Stale(Exception):
    """A host or group changed since the snapshot: place again."""


class UtilizationHistory:
    """Hourly mean utilization per host, from the stored samples; reloaded at most once a
    minute (placements in between reuse it: the forecast looks hours ahead)."""

    def __init__(
        self, db: Database, clock: Clock, window_hours: int = 48, refresh_seconds: float = 60.0
    ) -> None:
        self.db = db
        self.clock = clock
        self.window_hours = window_hours
        self.refresh_seconds = refresh_seconds
        self._loaded_at = float("-inf")
        self._history: dict[str, dict[str, tuple[float, ...]]] = {}
        self._lock = threading.Lock()

    def get(self) -> dict[str, dict[str, tuple[float, ...]]]:
        now = self.clock.now()
        with self._lock:
            if now - self._loaded_at >= self.refresh_seconds:
                self._history = self._load(now)
                self._loaded_at = now
            return self._history

    def _load(self, now: float) -> dict[str, dict[str, tuple[float, ...]]]:
        since = now - self.window_hours * HOUR
        sums: dict[str, dict[int, list[float]]] = defaultdict(dict)
        with self.db.read() as session:
            rows = session.execute(
                select(
                    HostSampleRow.host_id,
                    HostSampleRow.at,
                    HostSampleRow.cpu,
                    HostSampleRow.memory,
                    HostSampleRow.net,
                ).where(HostSampleRow.at >= since)
            )
            for host_id, at, cpu, memory, net in rows:
                bucket = sums[host_id].setdefault(int(at // HOUR), [0.0, 0.0, 0.0, 0.0])
                bucket[0] += cpu
                bucket[1] += memory
                bucket[2] += net
                bucket[3] += 1
        history: dict[str, dict[str, tuple[float, ...]]] = {}
        for host_id, buckets in sums.items():
            ordered = [buckets[key] for key in sorted(buckets)]
            history[host_id] = {
                metric: tuple(b[i] / b[3] for b in ordered) for i, metric in enumerate(METRICS)
            }
        return history


def build_fleet(
    session: Session, history: dict[str, dict[str, tuple[float, ...]]]
) -> tuple[FleetSnapshot, dict[str, tuple[str, int]]]:
    """The snapshot of every host, and group name -> (id, generation) as read."""
    groups = list(session.scalars(select(PlacementGroupRow)))
    group_names = {g.id: g.name for g in groups}
    neighbours: dict[str, list[InstanceUsage]] = defaultdict(list)
    members: list[GroupMember] = []
    for host_id, group_id, vcpus, memory, disk, net, usage in session.execute(
        select(
            InstanceRow.host_id,
            InstanceRow.placement_group_id,
            InstanceRow.vcpus,
            InstanceRow.memory,
            InstanceRow.disk,
            InstanceRow.net,
            InstanceRow.usage,
        )
    ):
        if host_id is None:
            continue
        usage = usage or {}
        neighbours[host_id].append(
            InstanceUsage(
                allocated=Resources(vcpus, memory, disk, net),
                cpu_millicores=float(usage.get("cpu_millicores", 0.0)),
                memory_mib=float(usage.get("memory_mib", 0.0)),
                net_mbps=float(usage.get("net_mbps", 0.0)),
            )
        )
        if group_id in group_names:
            members.append(GroupMember(group=group_names[group_id], host_id=host_id))
    hosts = [
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
            cpu_features=frozenset(h.cpu_features),
            utilization_history=history.get(h.id, {}),
            neighbours=tuple(neighbours.get(h.id, ())),
            attestation=h.attestation_state,
            attestation_reason=str((h.attestation or {}).get("reason", "")),
        )
        for h, cluster, site in session.execute(
            select(HostRow, ClusterRow.name, SiteRow.name)
            .join(ClusterRow, HostRow.cluster_id == ClusterRow.id)
            .join(SiteRow, ClusterRow.site_id == SiteRow.id)
        )
    ]
    specs = [
        PlacementGroupSpec(
            name=g.name,
            policy=PlacementPolicy(g.policy),
            strength=PlacementStrength(g.strength),
            scope=PlacementScope(g.scope),
            max_per_scope=g.max_per_scope,
        )
        for g in groups
    ]
    fleet = FleetSnapshot(hosts, specs, members)
    return fleet, {g.name: (g.id, g.generation) for g in groups}


PLACEMENT_LOCK = 0x66_76_70_6C  # "fvpl": the advisory lock id of placement


def serialize_placements(session: Session) -> None:
    """Wait for other placements to commit (PostgreSQL; SQLite already serialises)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": PLACEMENT_LOCK})


def place(
    session: Session,
    requests: Sequence[PlacementRequest],
    *,
    config: SchedulerConfig,
    history: dict[str, dict[str, tuple[float, ...]]],
) -> list[PlacementDecision]:
    """Place every request or none, and reserve the result in this transaction."""
    fleet, group_rows = build_fleet(session, history)
    engine = PlacementEngine(fleet, config)
    if len(requests) == 1:
        decisions = [engine.place(requests[0], explain=True)]
    else:
        decisions = list(place_batch(engine, requests, explain=True).decisions)
    totals: dict[str, tuple[HostCandidate, Resources]] = {}
    for decision in decisions:
        assert decision.request is not None
        host = decision.host
        _, sofar = totals.get(host.id, (host, Resources()))
        totals[host.id] = (host, sofar + decision.request.resources)
    for host, resources in totals.values():
        if not reserve(session, host.id, host.generation, resources):
            raise Stale()
    for name in {g for r in requests for g in r.groups}:
        group_id, generation = group_rows[name]
        bumped = session.execute(
            update(PlacementGroupRow)
            .where(PlacementGroupRow.id == group_id, PlacementGroupRow.generation == generation)
            .values(generation=PlacementGroupRow.generation + 1)
            .execution_options(synchronize_session=False)
        )
        if cast(CursorResult[Any], bumped).rowcount != 1:
            raise Stale()
    return decisions


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
