"""Persistent state: SQLAlchemy 2 over SQLite (default) or PostgreSQL, Alembic migrations."""

from fleetvisor.store.db import Database, sqlite_url

__all__ = ["Database", "sqlite_url"]
