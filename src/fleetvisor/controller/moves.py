"""Cold moves: the steps of a rebalance plan, each an operation run after the previous one.

    wait for the previous move (params.after) -> reserve the target (host generation)
    -> destroy on the source -> release the source, host_id = target (one transaction)
    -> create (and start) on the target

Every step records itself in the operation's params, so a restarted controller resumes
where it was: a reservation is never made twice and the instance is never on both hosts.
The move is cold: the instance's writable layer does not travel (migration with data
comes with checkpoint/restore).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm.attributes import flag_modified

from fleetvisor.controller import events
from fleetvisor.controller.instance_specs import instance_spec
from fleetvisor.controller.instances import InstanceService, release
from fleetvisor.controller.operation_records import ACTIVE_OPS, new_operation
from fleetvisor.controller.placement import build_fleet, reserve, serialize_placements
from fleetvisor.errors import AgentUnreachable, DriverError
from fleetvisor.model.entities import InstanceStatus, OperationKind, OperationState, PowerState
from fleetvisor.scheduler import PlacedInstance, PlacementRequest, plan_rebalance
from fleetvisor.store.tables import HostRow, InstanceRow, OperationRow, PlacementGroupRow

if TYPE_CHECKING:
    from fleetvisor.controller.operations import OperationRunner

WAIT_SECONDS = 0.2


async def move_instance(runner: OperationRunner, op_id: str) -> None:
    db, clock = runner.db, runner.clock
    with db.read() as session:
        op = session.get(OperationRow, op_id)
        assert op is not None
        after = op.params.get("after")
    while after:  # the plan's order: every prefix of the moves is a valid state
        with db.read() as session:
            previous = session.get(OperationRow, after)
            if previous is None or previous.state not in ACTIVE_OPS:
                break
        await clock.sleep(WAIT_SECONDS)
    with db.write() as session:
        op = session.get(OperationRow, op_id)
        assert op is not None
        instance = session.get(InstanceRow, op.instance_id or "")
        target = session.get(HostRow, op.params["target"])
        if instance is None or target is None:
            _end(op, OperationState.FAILED, "the instance or the target host is gone", clock.now())
            return
        source_id = op.params["source"]
        if instance.host_id != source_id and instance.host_id != target.id:
            _end(op, OperationState.FAILED, "the instance moved meanwhile", clock.now())
            return
        if not op.params.get("reserved"):
            if not reserve(session, target.id, target.generation, instance.resources):
                _end(
                    op,
                    OperationState.FAILED,
                    f"{target.name} changed since the plan; plan again",
                    clock.now(),
                )
                return
            op.params = {**op.params, "reserved": True}
            flag_modified(op, "params")
        source = session.get(HostRow, source_id)
        spec_instance = instance
        target_id, target_name = target.id, target.name
        target_url, target_token = target.agent_url, target.agent_token
    if spec_instance.host_id == source_id and source is not None:
        runner._step(op_id, "leave_source")
        agent = runner.clients.for_host(source.name, source.agent_url, source.agent_token)
        # An unreachable source removes its orphan copy when it reports again.
        with contextlib.suppress(AgentUnreachable):
            await agent.destroy(spec_instance.id)
        with db.write() as session:
            row = session.get(InstanceRow, spec_instance.id)
            if row is not None and row.host_id == source_id:
                release(session, source_id, row.resources)
                row.host_id = target_id
                row.status = InstanceStatus.CREATING
                row.updated_at = clock.now()
    runner._step(op_id, "start_on_target")

    with db.read() as session:
        row = session.get(InstanceRow, spec_instance.id)
    if row is None:
        runner._finish(op_id, OperationState.FAILED, "the instance was removed meanwhile")
        return
    agent = runner.clients.for_host(target_name, target_url, target_token)
    running = row.desired_power == PowerState.RUNNING
    try:
        report = await agent.create(instance_spec(row), start=running)
    except (AgentUnreachable, DriverError) as exc:
        with db.write() as session:
            current = session.get(InstanceRow, row.id)
            if current is not None:
                current.status = InstanceStatus.ERROR
                current.status_message = f"move to {target_name} failed: {exc}"
        runner._finish(op_id, OperationState.FAILED, f"starting on {target_name} failed: {exc}")
        return
    with db.write() as session:
        current = session.get(InstanceRow, row.id)
        op = session.get(OperationRow, op_id)
        now = clock.now()
        if current is not None:
            current.status = (
                InstanceStatus.RUNNING if report.state == "running" else InstanceStatus.STOPPED
            )
            current.updated_at = now
            events.record(
                session,
                now,
                "instance.moved",
                f"instance/{current.name}",
                f"{current.name} moved to {target_name} (cold move, rebalance)",
                target=target_name,
                operation=op_id,
            )
        if op is not None:
            _end(op, OperationState.SUCCEEDED, "", now)


def plan_rebalance_moves(
    service: InstanceService, *, max_moves: int, dry_run: bool, time_limit_s: float = 5.0
) -> dict[str, Any]:
    """A move plan over every placed instance that no operation is working on; without
    `dry_run`, one `move` operation per step, each waiting for the one before."""
    now = service.clock.now()
    history = service.history.get()  # before the transaction (see InstanceService)
    with service.db.write() as session:
        serialize_placements(session)
        fleet, _ = build_fleet(session, history)
        busy = set(
            session.scalars(
                select(OperationRow.instance_id).where(OperationRow.state.in_(ACTIVE_OPS))
            )
        )
        groups = {
            k: v
            for k, v in session.execute(select(PlacementGroupRow.id, PlacementGroupRow.name)).all()
        }
        hosts = {k: v for k, v in session.execute(select(HostRow.id, HostRow.name)).all()}
        rows = {
            row.id: row
            for row in session.scalars(select(InstanceRow).where(InstanceRow.host_id.is_not(None)))
        }
        scaled = {row.parent_id for row in rows.values() if row.parent_id}
        placed = [
            PlacedInstance(
                id=row.id,
                host_id=row.host_id or "",
                resources=row.resources,
                name=row.name,
                groups=(groups[row.placement_group_id],) if row.placement_group_id else (),
                request=_trusted_request(row, groups) if row.trusted_host else None,
                movable=row.id not in busy
                and row.status in (InstanceStatus.RUNNING, InstanceStatus.STOPPED)
                # A scaled group stays on its host: its siblings exist only there.
                and row.parent_id is None
                and row.id not in scaled,
            )
            for row in rows.values()
        ]
        plan = plan_rebalance(fleet, placed, max_moves=max_moves, time_limit_s=time_limit_s)
        moves = [
            {"instance": m.name, "from": hosts[m.source], "to": hosts[m.target]} for m in plan.moves
        ]
        operations: list[str] = []
        if not dry_run:
            previous: str | None = None
            for move in plan.moves:
                op = new_operation(rows[move.instance], OperationKind.MOVE, now, service.settings)
                op.params = {"source": move.source, "target": move.target, "after": previous}
                session.add(op)
                previous = op.id
                operations.append(op.id)
            if plan.moves:
                events.record(
                    session,
                    now,
                    "fleet.rebalance",
                    "fleet",
                    f"rebalance: {len(plan.moves)} move(s), hosts used "
                    f"{plan.hosts_used_before} -> {plan.hosts_used_after}",
                    moves=moves,
                )
    return {
        "dry_run": dry_run,
        "max_moves": max_moves,
        "status": plan.status,
        "hosts_used_before": plan.hosts_used_before,
        "hosts_used_after": plan.hosts_used_after,
        "moves": moves,
        "operations": operations,
        "dropped": plan.dropped,
    }


def _trusted_request(row: InstanceRow, groups: dict[str, str]) -> PlacementRequest:
    """What a new host must offer an instance that requires a trusted host."""
    return PlacementRequest(
        row.resources,
        driver=row.driver,
        groups=(groups[row.placement_group_id],) if row.placement_group_id else (),
        trusted_host=True,
    )


def _end(op: OperationRow, state: OperationState, error: str, now: float) -> None:
    op.state = state
    op.error = error
    op.step = "done" if state == OperationState.SUCCEEDED else op.step
    op.updated_at = now
