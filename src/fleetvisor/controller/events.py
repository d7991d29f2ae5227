"""The append-only event log: every state change writes one row in the same transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleetvisor.store.tables import EventRow


def record(
    session: Session, at: float, kind: str, subject: str, message: str, **data: Any
) -> EventRow:
    row = EventRow(at=at, kind=kind, subject=subject, message=message, data=data)
    session.add(row)
    return row


def since(
    session: Session,
    after_id: int = 0,
    limit: int = 100,
    kind: str | None = None,
    subject: str | None = None,
) -> list[EventRow]:
    query = select(EventRow).where(EventRow.id > after_id)
    if kind:
        query = query.where(EventRow.kind.startswith(kind, autoescape=True))
    if subject:
        query = query.where(EventRow.subject == subject)
    return list(session.scalars(query.order_by(EventRow.id).limit(limit)))


def latest(session: Session, limit: int = 100) -> list[EventRow]:
    rows = session.scalars(select(EventRow).order_by(EventRow.id.desc()).limit(limit))
    return list(reversed(list(rows)))
