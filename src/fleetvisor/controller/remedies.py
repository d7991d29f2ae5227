"""What the controller does about detected issues: events, migrations, drains.

    host heartbeat --detections--> on_detections: event `instance.issue` with evidence
        remedy migrate (policy)   -> rate limit + back-off -> a `migrate` operation
        remedy restart            -> done by the host already (the event says so)
        remedy alert              -> the event only
    health loop: host down      -> on_host_down: evacuate instances whose policy migrates
    operator: host draining     -> on_host_draining: migrate them, one after the other

Migrations for issues inside the instance (a failing probe, an OOM kill, a restart
loop) are cold: a live one would carry the fault along. Issues of the host (a noisy
neighbour, a drain) migrate live where both hosts can.

Only instances with a health policy are remedied: an instance without one keeps the
fleet's older behaviour (a down host's containers wait for it to come back).

Rate limit: at most `max_migrations` per `migration_window_s`; after each remedy the
instance waits `backoff_s`, doubling with each remedy in the window, so a flapping
instance is not moved in a loop. A skipped remedy is an event that says why.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleetvisor.controller import events
from fleetvisor.controller.migrations import request_migration
from fleetvisor.controller.settings import ControllerSettings
from fleetvisor.errors import FleetvisorError
from fleetvisor.model.health import Detection, HealthPolicy, Issue, Remedy
from fleetvisor.store.tables import HostRow, InstanceRow

# What is wrong inside the instance travels with a live migration (its memory, its
# files): these move cold, a fresh process on the instance's data. The others are
# about the host, and move live where both hosts can.
COLD_ISSUES = {
    Issue.PROBE_FAILED: "cold",
    Issue.OOM_KILLED: "cold",
    Issue.RESTART_LOOP: "cold",
    Issue.EXITED: "cold",
}


def on_detections(
    session: Session,
    host: HostRow,
    detections: list[Detection],
    now: float,
    settings: ControllerSettings,
) -> list[str]:
    """Record each detection and apply its remedy; returns the operations created."""
    created: list[str] = []
    for detection in detections:
        row = session.get(InstanceRow, detection.instance)
        if row is None or row.host_id != host.id:
            continue  # gone, or moved meanwhile: the detection is stale
        policy = _policy(row)
        remedy = policy.remedy(detection.issue)
        acted = f"; {host.name} restarted it in place" if detection.action == "restart" else ""
        events.record(
            session,
            now,
            "instance.issue",
            f"instance/{row.name}",
            f"{row.name} on {host.name}: {detection.issue}"
            f"{': ' + detection.message if detection.message else ''}{acted}",
            issue=detection.issue,
            remedy=remedy,
            action=detection.action,
            host=host.name,
            detected_at=detection.at,
            since=detection.since,
            evidence=detection.evidence,
        )
        if remedy == Remedy.MIGRATE and not detection.action:
            op = _migrate(session, row, detection.issue, detection.message, now, settings)
            if op is not None:
                created.append(op)
    return created


def on_host_down(
    session: Session, host: HostRow, now: float, settings: ControllerSettings
) -> list[str]:
    return _evacuate(session, host, Issue.HOST_DOWN, now, settings)


def on_host_draining(
    session: Session, host: HostRow, now: float, settings: ControllerSettings, *, every: bool
) -> list[str]:
    """`every`: an operator's drain moves every instance; else only those whose policy says so."""
    return _evacuate(session, host, Issue.HOST_DRAINING, now, settings, every=every)


def _evacuate(
    session: Session,
    host: HostRow,
    issue: Issue,
    now: float,
    settings: ControllerSettings,
    *,
    every: bool = False,
) -> list[str]:
    rows = session.scalars(
        select(InstanceRow)
        .where(InstanceRow.host_id == host.id, InstanceRow.parent_id.is_(None))
        .order_by(InstanceRow.name)
    )
    created: list[str] = []
    previous: str | None = None
    for row in rows:
        if not every and (
            row.health_policy is None or _policy(row).remedy(issue) != Remedy.MIGRATE
        ):
            continue
        reason = f"host {host.name} is {'down' if issue == Issue.HOST_DOWN else 'draining'}"
        # Down: all at once (nothing runs); draining: one after the other, gently.
        after = previous if issue == Issue.HOST_DRAINING else None
        op = _migrate(session, row, issue, reason, now, settings, after=after, limited=not every)
        if op is not None:
            created.append(op)
            previous = op
    return created


def _migrate(
    session: Session,
    row: InstanceRow,
    issue: Issue,
    message: str,
    now: float,
    settings: ControllerSettings,
    *,
    after: str | None = None,
    limited: bool = True,
) -> str | None:
    policy = _policy(row)
    state = dict(row.remedies or {})
    recent = [t for t in state.get("migrations", []) if now - t < policy.migration_window_s]
    why = ""
    if limited and len(recent) >= policy.max_migrations:
        why = (
            f"{len(recent)} migration(s) in the last {policy.migration_window_s:.0f}s "
            f"(max_migrations {policy.max_migrations})"
        )
    elif limited and recent:
        wait = policy.backoff_s * 2 ** (len(recent) - 1)
        if now - recent[-1] < wait:
            why = f"backing off {wait:.0f}s after the last migration"
    if not why:
        try:
            op = request_migration(
                session,
                row,
                now=now,
                settings=settings,
                mode=COLD_ISSUES.get(issue, "auto"),
                issue=issue,
                reason=f"{issue}: {message}" if message else str(issue),
                after=after,
            )
            session.flush()
            return op.id
        except FleetvisorError as exc:
            why = exc.detail
    events.record(
        session,
        now,
        "instance.remedy_skipped",
        f"instance/{row.name}",
        f"{row.name}: not migrating for {issue}: {why}",
        issue=issue,
    )
    return None


def _policy(row: InstanceRow) -> HealthPolicy:
    return HealthPolicy.model_validate(row.health_policy or {})
