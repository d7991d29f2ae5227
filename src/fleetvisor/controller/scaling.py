"""Local scaling as the controller sees it: the policies it holds, the siblings hosts carve.

The host decides and acts; the controller mirrors. Each heartbeat's reports are the
truth about a group (a parent and its siblings):

    report names a parent the store places here   -> adopt the sibling: a row with the
                                                     carved resources, the parent's row
                                                     keeps the rest (event instance.carved)
    a sibling's row is not reported any more      -> folded: its resources go back to
                                                     the parent's row (event instance.folded)
    the group's reported total differs from the   -> refused: the sibling is removed on
    parent's size                                    the host, which folds it back

The rows on a host always sum to the host's allocation, so a carve or a fold never
touches it. An operation on a parent (stop, delete, move, recover) first gives the
parent back its siblings' rows: the host folds the siblings before it acts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleetvisor.controller import events
from fleetvisor.errors import Conflict
from fleetvisor.model.entities import InstanceStatus, PowerState
from fleetvisor.model.resources import Resources
from fleetvisor.model.scaling import PARENT_LABEL, ScalingNotice, policy_digest
from fleetvisor.model.specs import InstanceReport
from fleetvisor.store.tables import HostRow, InstanceRow


@dataclass
class GroupSync:
    handled: set[str] = field(default_factory=set)  # ids the generic reconcile must skip
    destroy: list[str] = field(default_factory=list)
    push_policy: list[str] = field(default_factory=list)  # parents whose host lacks the policy


def siblings(session: Session, parent_id: str) -> list[InstanceRow]:
    return list(session.scalars(select(InstanceRow).where(InstanceRow.parent_id == parent_id)))


def fold_siblings(session: Session, parent: InstanceRow) -> list[InstanceRow]:
    """Give the parent's row its siblings' resources back and drop their rows (the host
    folds them before it stops, removes or moves the parent)."""
    rows = siblings(session, parent.id)
    total = parent.resources
    for row in rows:
        total = total + row.resources
        session.delete(row)
    _set_resources(parent, total)
    return rows


def ensure_not_sibling(instance: InstanceRow, action: str) -> None:
    if instance.parent_id is not None:
        raise Conflict(
            f"{instance.name} is a sibling its host carved out by a scaling policy and "
            f"folds back on its own; {action} its parent instead, or change the parent's "
            "policy (fleetvisor scale-policy)"
        )


def sync_groups(
    session: Session,
    host: HostRow,
    reported: dict[str, InstanceReport],
    placed: list[InstanceRow],
    busy: set[str | None],
    notices: list[ScalingNotice],
    now: float,
) -> GroupSync:
    sync = GroupSync()
    by_id = {row.id: row for row in placed}
    said = {(n.kind, n.child): n for n in notices if n.child}
    for refused in notices:
        if refused.kind == "refused" and refused.parent in by_id:
            events.record(
                session,
                now,
                "instance.scaling_refused",
                f"instance/{by_id[refused.parent].name}",
                f"{host.name} did not carve {by_id[refused.parent].name}: {refused.reason}",
            )
    # Folded: a sibling's row whose host does not report it any more.
    for row in placed:
        if row.parent_id is None:
            continue
        sync.handled.add(row.id)
        if row.id in reported or row.parent_id in busy or row.id in busy:
            continue
        owner = by_id.get(row.parent_id)
        folded = said.get(("folded", row.id))
        if owner is not None:
            _set_resources(owner, owner.resources + row.resources)
            owner.updated_at = now
        session.delete(row)
        events.record(
            session,
            now,
            "instance.folded",
            f"instance/{owner.name if owner else row.name}",
            f"{row.name} folded back into {owner.name if owner else 'its parent'} on "
            f"{host.name} ({row.resources.describe()} returned)"
            + (f": {folded.reason}" if folded else ""),
            sibling=row.name,
            resources=row.resources.as_dict(),
        )
    # Carved: siblings reported under a parent the store places on this host.
    children: dict[str, list[InstanceReport]] = {}
    for report in reported.values():
        if report.parent is not None:
            children.setdefault(report.parent, []).append(report)
            sync.handled.add(report.id)
    for parent_id, reports in children.items():
        parent = by_id.get(parent_id)
        if parent is None or parent.parent_id is not None:
            sync.destroy.extend(r.id for r in reports if r.id not in by_id)
            continue
        if parent_id in busy or parent_id not in reported:
            continue  # an operation on the parent settles the group
        new = [r for r in reports if r.id not in by_id]
        known = [by_id[r.id] for r in reports if r.id in by_id]
        if not new and reported[parent_id].resources.to_resources() == parent.resources:
            continue
        before = parent.resources + _sum(row.resources for row in siblings(session, parent_id))
        after = reported[parent_id].resources.to_resources() + _sum(
            r.resources.to_resources() for r in reports
        )
        if before != after or any(row.parent_id != parent_id for row in known):
            sync.destroy.extend(r.id for r in new)
            events.record(
                session,
                now,
                "instance.scaling_mismatch",
                f"instance/{parent.name}",
                f"{host.name} reports {parent.name}'s group with {after.describe()}, not its "
                f"{before.describe()}; removing the unaccounted sibling(s)",
            )
            continue
        _set_resources(parent, reported[parent_id].resources.to_resources())
        parent.updated_at = now
        for report in new:
            row = _adopt(session, parent, report, host, now)
            carved = said.get(("carved", report.id))
            events.record(
                session,
                now,
                "instance.carved",
                f"instance/{parent.name}",
                f"{host.name} carved {row.name} ({row.resources.describe()}) out of "
                f"{parent.name}; the host's allocation is unchanged"
                + (f": {carved.reason}" if carved else ""),
                sibling=row.name,
                resources=row.resources.as_dict(),
                reaction_s=carved.reaction_s if carved else None,
                # the host's wall clock when the trigger fired
                triggered_at=carved.at - carved.reaction_s
                if carved and carved.reaction_s is not None
                else None,
            )
    # Policies: the host runs the one the store holds.
    for row in placed:
        if row.parent_id is None and row.id in reported and row.id not in busy:
            report = reported[row.id]
            if report.scaling_digest != policy_digest(row.scaling_policy):
                sync.push_policy.append(row.id)
            if report.endpoint != row.endpoint:
                row.endpoint = report.endpoint
    return sync


def _adopt(
    session: Session, parent: InstanceRow, report: InstanceReport, host: HostRow, now: float
) -> InstanceRow:
    name = report.name[:63]
    if session.scalar(select(InstanceRow.id).where(InstanceRow.name == name)) is not None:
        name = f"{parent.name[:30]}-{report.id[:8]}"
    resources = report.resources.to_resources()
    row = InstanceRow(
        id=report.id,
        name=name,
        image=parent.image,
        image_digest=parent.image_digest,
        driver=parent.driver,
        command=list(parent.command),
        env=dict(parent.env),
        labels={**parent.labels, PARENT_LABEL: parent.id},
        vcpus=resources.vcpus,
        memory=resources.memory,
        disk=resources.disk,
        net=resources.net,
        placement_group_id=parent.placement_group_id,
        host_id=host.id,
        desired_power=PowerState.RUNNING,
        status=InstanceStatus.RUNNING if report.state == "running" else InstanceStatus.STOPPED,
        status_message=f"carved out of {parent.name} by its scaling policy",
        usage=dict(report.usage),
        address=report.address,
        placement={},
        parent_id=parent.id,
        trusted_host=parent.trusted_host,  # a sibling needs what its parent needs
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    return row


def group_out(session: Session, instance: InstanceRow) -> dict[str, Any]:
    """A parent's scaling as `fleetvisor show` prints it."""
    rows = siblings(session, instance.id)
    size = instance.resources + _sum(row.resources for row in rows)
    return {
        "policy": instance.scaling_policy,
        "size": size.as_dict(),
        "siblings": [
            {"name": row.name, "resources": row.resources.as_dict(), "address": row.address}
            for row in rows
        ],
        "endpoint": instance.endpoint,
    }


def _sum(items: Any) -> Resources:
    total = Resources()
    for item in items:
        total = total + item
    return total


def _set_resources(row: InstanceRow, resources: Resources) -> None:
    row.vcpus, row.memory, row.disk, row.net = resources.as_tuple()
