"""Sites, clusters and placement groups: the fleet's static structure."""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleetvisor.clock import Clock
from fleetvisor.controller import events
from fleetvisor.controller.naming import check_name, new_id
from fleetvisor.errors import AlreadyExists, Conflict, InvalidInput, NotFound
from fleetvisor.model.entities import PlacementPolicy, PlacementScope, PlacementStrength
from fleetvisor.store.db import Database
from fleetvisor.store.tables import ClusterRow, HostRow, InstanceRow, PlacementGroupRow, SiteRow

DEFAULT_SITE = "default"
DEFAULT_CLUSTER = "default"


class Inventory:
    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    def ensure_defaults(self) -> None:
        """A fresh fleet has one site and one cluster, both named `default`."""
        with self.db.write() as session:
            site = session.scalar(select(SiteRow).where(SiteRow.name == DEFAULT_SITE))
            if site is None:
                site = SiteRow(id=new_id(), name=DEFAULT_SITE, created_at=self.clock.now())
                session.add(site)
                session.flush()
            if session.scalar(select(func.count()).select_from(ClusterRow)) == 0:
                session.add(
                    ClusterRow(
                        id=new_id(),
                        name=DEFAULT_CLUSTER,
                        site_id=site.id,
                        created_at=self.clock.now(),
                    )
                )

    # -- sites ---------------------------------------------------------------------------

    def create_site(self, name: str) -> SiteRow:
        check_name("site", name)
        with self.db.write() as session:
            if session.scalar(select(SiteRow).where(SiteRow.name == name)):
                raise AlreadyExists(f"site {name!r} already exists; pick another name")
            row = SiteRow(id=new_id(), name=name, created_at=self.clock.now())
            session.add(row)
            events.record(
                session, self.clock.now(), "site.created", f"site/{name}", f"site {name} created"
            )
            return row

    def sites(self) -> list[tuple[SiteRow, int]]:
        with self.db.read() as session:
            counts = dict(
                session.execute(
                    select(ClusterRow.site_id, func.count()).group_by(ClusterRow.site_id)
                ).all()
            )
            rows = session.scalars(select(SiteRow).order_by(SiteRow.name))
            return [(row, counts.get(row.id, 0)) for row in rows]

    def delete_site(self, name: str) -> None:
        with self.db.write() as session:
            site = _site(session, name)
            if session.scalar(
                select(func.count()).select_from(ClusterRow).where(ClusterRow.site_id == site.id)
            ):
                raise Conflict(f"site {name} still has clusters; remove them first")
            session.delete(site)
            events.record(
                session, self.clock.now(), "site.deleted", f"site/{name}", f"site {name} removed"
            )

    # -- clusters ------------------------------------------------------------------------

    def create_cluster(self, name: str, site: str) -> ClusterRow:
        check_name("cluster", name)
        with self.db.write() as session:
            site_row = _site(session, site)
            if session.scalar(select(ClusterRow).where(ClusterRow.name == name)):
                raise AlreadyExists(f"cluster {name!r} already exists; pick another name")
            row = ClusterRow(
                id=new_id(), name=name, site_id=site_row.id, created_at=self.clock.now()
            )
            session.add(row)
            events.record(
                session,
                self.clock.now(),
                "cluster.created",
                f"cluster/{name}",
                f"cluster {name} created in site {site}",
            )
            return row

    def clusters(self) -> list[tuple[ClusterRow, str, int]]:
        with self.db.read() as session:
            counts = dict(
                session.execute(
                    select(HostRow.cluster_id, func.count()).group_by(HostRow.cluster_id)
                ).all()
            )
            rows = session.execute(
                select(ClusterRow, SiteRow.name)
                .join(SiteRow, ClusterRow.site_id == SiteRow.id)
                .order_by(ClusterRow.name)
            )
            return [(row, site, counts.get(row.id, 0)) for row, site in rows]

    def delete_cluster(self, name: str) -> None:
        with self.db.write() as session:
            cluster = session.scalar(select(ClusterRow).where(ClusterRow.name == name))
            if cluster is None:
                raise NotFound(f"cluster {name!r} does not exist; see `fleetvisor clusters`")
            if session.scalar(
                select(func.count()).select_from(HostRow).where(HostRow.cluster_id == cluster.id)
            ):
                raise Conflict(f"cluster {name} still has hosts; move or remove them first")
            session.delete(cluster)
            events.record(
                session,
                self.clock.now(),
                "cluster.deleted",
                f"cluster/{name}",
                f"cluster {name} removed",
            )

    # -- placement groups ----------------------------------------------------------------

    def create_group(
        self, name: str, policy: str, strength: str, scope: str, max_per_scope: int | None
    ) -> PlacementGroupRow:
        check_name("placement group", name)
        policy_v = _choice("policy", policy, PlacementPolicy)
        strength_v = _choice("strength", strength, PlacementStrength)
        scope_v = _choice("scope", scope, PlacementScope)
        if max_per_scope is not None and max_per_scope < 1:
            raise InvalidInput("max-per-scope must be at least 1 (or omitted for no limit)")
        with self.db.write() as session:
            if session.scalar(select(PlacementGroupRow).where(PlacementGroupRow.name == name)):
                raise AlreadyExists(f"placement group {name!r} already exists; pick another name")
            row = PlacementGroupRow(
                id=new_id(),
                name=name,
                policy=policy_v,
                strength=strength_v,
                scope=scope_v,
                max_per_scope=max_per_scope,
                created_at=self.clock.now(),
            )
            session.add(row)
            events.record(
                session,
                self.clock.now(),
                "group.created",
                f"group/{name}",
                f"placement group {name} created: {strength_v} {policy_v} per {scope_v}",
            )
            return row

    def groups(self) -> list[tuple[PlacementGroupRow, int]]:
        with self.db.read() as session:
            counts = dict(
                session.execute(
                    select(InstanceRow.placement_group_id, func.count()).group_by(
                        InstanceRow.placement_group_id
                    )
                ).all()
            )
            rows = session.scalars(select(PlacementGroupRow).order_by(PlacementGroupRow.name))
            return [(row, counts.get(row.id, 0)) for row in rows]

    def group(self, name: str) -> tuple[PlacementGroupRow, list[str]]:
        with self.db.read() as session:
            row = _group(session, name)
            members = list(
                session.scalars(
                    select(InstanceRow.name)
                    .where(InstanceRow.placement_group_id == row.id)
                    .order_by(InstanceRow.name)
                )
            )
            return row, members

    def delete_group(self, name: str) -> None:
        with self.db.write() as session:
            row = _group(session, name)
            if session.scalar(
                select(func.count())
                .select_from(InstanceRow)
                .where(InstanceRow.placement_group_id == row.id)
            ):
                raise Conflict(f"placement group {name} still has members; remove them first")
            session.delete(row)
            events.record(
                session,
                self.clock.now(),
                "group.deleted",
                f"group/{name}",
                f"placement group {name} removed",
            )


def _site(session: Session, name: str) -> SiteRow:
    row = session.scalar(select(SiteRow).where(SiteRow.name == name))
    if row is None:
        raise NotFound(f"site {name!r} does not exist; see `fleetvisor sites`")
    return row


def _group(session: Session, name: str) -> PlacementGroupRow:
    row = session.scalar(select(PlacementGroupRow).where(PlacementGroupRow.name == name))
    if row is None:
        raise NotFound(f"placement group {name!r} does not exist; see `fleetvisor group ls`")
    return row


def _choice(what: str, value: str, enum: type[StrEnum]) -> str:
    try:
        return str(enum(value))
    except ValueError:
        allowed = ", ".join(e.value for e in enum)
        raise InvalidInput(f"{what} {value!r} is not one of: {allowed}") from None
