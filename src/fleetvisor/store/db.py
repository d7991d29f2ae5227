"""Engine, sessions and schema upgrades for SQLite (default) or any SQLAlchemy URL.

SQLite serialises writers: write transactions start with BEGIN IMMEDIATE so two
writers queue on the busy timeout instead of failing on a stale snapshot. Reads use
plain deferred transactions and, in WAL mode, never wait for writers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self._writer = _sqlite_engine(url, begin="BEGIN IMMEDIATE")
            self._reader = _sqlite_engine(url, begin="BEGIN")
        else:
            # As many connections as the API's worker threads (40) may want at once.
            self._writer = self._reader = create_engine(
                url, pool_pre_ping=True, pool_size=20, max_overflow=30
            )
        self._write_sessions = sessionmaker(self._writer, expire_on_commit=False)
        self._read_sessions = sessionmaker(self._reader, expire_on_commit=False)

    @property
    def engine(self) -> Engine:
        return self._writer

    def upgrade(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""
        config = alembic_config(self.url)
        with self._writer.connect() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            connection.commit()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on any exception."""
        with self._write_sessions() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read_sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self._writer.dispose()
        if self._reader is not self._writer:
            self._reader.dispose()


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _sqlite_engine(url: str, *, begin: str) -> Engine:
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        pool_size=20,
        max_overflow=30,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):  # type: ignore[no-untyped-def]
        connection.exec_driver_sql(begin)

    return engine
