"""The store: migrations build exactly the ORM schema; writes are atomic; reservations
under contention never oversubscribe a host (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select

from fleetvisor.controller.placement import reserve
from fleetvisor.model.resources import Resources
from fleetvisor.store.db import Database
from fleetvisor.store.tables import Base, ClusterRow, HostRow, SiteRow


def test_migrations_match_the_orm_schema(database_url: str) -> None:
    """Upgrading to head yields the tables the ORM declares, with no drift."""
    db = Database(database_url)
    db.upgrade()
    db.upgrade()  # idempotent
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        tables = set(inspect(conn).get_table_names())
    assert diff == []
    assert {"hosts", "instances", "operations", "events", "placement_groups"} <= tables
    db.dispose()


def test_write_rolls_back_on_error(database_url: str) -> None:
    db = Database(database_url)
    db.upgrade()
    with pytest.raises(RuntimeError), db.write() as session:
        session.add(SiteRow(id="s1", name="lost", created_at=0.0))
        session.flush()
        raise RuntimeError("boom")
    with db.read() as session:
        assert session.scalar(select(SiteRow).where(SiteRow.name == "lost")) is None
    db.dispose()


def _host(capacity: Resources) -> HostRow:
    return HostRow(
        id="h1",
        name="h1",
        cluster_id="c1",
        state="ready",
        agent_url="http://x",
        token_hash="",
        agent_token="",
        driver="sim",
        capabilities=[],
        cpu_model="",
        cpu_features=[],
        labels={},
        cap_vcpus=capacity.vcpus,
        cap_memory=capacity.memory,
        cap_disk=capacity.disk,
        cap_net=capacity.net,
        alloc_vcpus=0,
        alloc_memory=0,
        alloc_disk=0,
        alloc_net=0,
        generation=0,
        metrics={},
        registered_at=0.0,
        last_heartbeat=0.0,
    )


def test_concurrent_reservations_never_oversubscribe(database_url: str) -> None:
    """8 threads race to reserve 1 CPU each on a 10-CPU host, 5 times: exactly 10 win."""
    db = Database(database_url)
    db.upgrade()
    with db.write() as session:
        session.add(SiteRow(id="s1", name="s", created_at=0.0))
        session.flush()
        session.add(ClusterRow(id="c1", name="c", site_id="s1", created_at=0.0))
        session.flush()
        session.add(_host(Resources(10_000, 10_000, 100, 1000)))
    want = Resources(1000, 100, 1, 10)
    wins: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(5):
            while True:
                with db.write() as session:
                    host = session.get(HostRow, "h1")
                    assert host is not None
                    if not want.fits_in(host.capacity - host.allocated):
                        return
                    if reserve(session, "h1", host.generation, want):
                        with lock:
                            wins.append(1)
                        break

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.read() as session:
        host = session.get(HostRow, "h1")
        assert host is not None
        assert host.allocated == want * 10
    assert len(wins) == 10
    db.dispose()
