"""Shared fixtures: a database URL per backend (SQLite always; PostgreSQL when
FLEETVISOR_TEST_DB names one), and an in-process fleet harness."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

BACKENDS = ["sqlite"] + (["postgresql"] if os.environ.get("FLEETVISOR_TEST_DB") else [])


def _reset_postgres(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on each backend under test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    url = os.environ["FLEETVISOR_TEST_DB"]
    _reset_postgres(url)
    yield url
