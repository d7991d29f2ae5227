"""Migration: move an instance to another host with its state, as one resumable operation.

    request (API, a remedy, a drain) -> operation `migrate` {source, to?, mode, issue, reason}
    place    the engine picks the target: same driver, source excluded, every constraint
             kept, and never a host worse than the source for the detected issue;
             the target's capacity is reserved in the same transaction
    pack     source: CRIU checkpoint (live) or stop (cold); writable layer -> package
    run      target: pull the package from the source, create, restore (live) or start
    commit   one transaction: release the source, host_id = target, new address
    clean    source: destroy the stopped copy; both: drop the package

Each step records itself in the operation's params before the next begins, so a
controller that dies anywhere resumes at its next start. Agents make every call
idempotent (agent/migration.py). The outcome is always one running copy:
  - fails before `pack` ended: nothing changed on the source; the reservation goes back
  - fails after `pack`: the source runs it again (restore its checkpoint, or start),
    the target's partial copy is removed, the reservation goes back
  - a target that got it running but whose answer was lost: `run` again returns the
    running copy; a copy left on a host the store does not place it on is removed by
    reconciliation when that host reports (`instance.duplicate`)
  - a source that is down (host_down evacuation): the instance is rebuilt on the target
    from its image; its writable layer is lost with the host, and the event says so
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import flag_modified

from fleetvisor.controller import events
from fleetvisor.controller.agent_client import AgentClient
from fleetvisor.controller.instance_specs import instance_spec
from fleetvisor.controller.instances import release
from fleetvisor.controller.operation_records import ACTIVE_OPS, GiveUp, new_operation
from fleetvisor.controller.placement import Stale, build_fleet, place, serialize_placements
from fleetvisor.controller.settings import ControllerSettings
from fleetvisor.errors import (
    AgentUnreachable,
    Conflict,
    DriverError,
    InsufficientCapacity,
    NotFound,
)
from fleetvisor.model.entities import (
    HostState,
    InstanceStatus,
    OperationKind,
    OperationState,
    PowerState,
)
from fleetvisor.model.health import Issue
from fleetvisor.model.specs import InstanceReport
from fleetvisor.scheduler import PlacementRequest
from fleetvisor.scheduler.config import SchedulerConfig
from fleetvisor.scheduler.fleet import FleetSnapshot
from fleetvisor.scheduler.snapshot import HostCandidate
from fleetvisor.store.tables import HostRow, InstanceRow, OperationRow, PlacementGroupRow

if TYPE_CHECKING:
    from fleetvisor.controller.operations import OperationRunner

MODES = ("auto", "live", "cold")
# Issues a host causes: the target must not be busier than the source in that respect.
# (Throttling, memory pressure and OOM kills come from the instance's own limits.)
CPU_ISSUES = (Issue.NOISY_NEIGHBOUR,)


# -- requests ------------------------------------------------------------------------------


def request_migration(
    session: Session,
    instance: InstanceRow,
    *,
    now: float,
    settings: ControllerSettings,
    to: str | None = None,
    mode: str = "auto",
    issue: str = "",
    reason: str = "",
    after: str | None = None,
) -> OperationRow:
    """Check that `instance` can migrate now and add its `migrate` operation."""
    if mode not in MODES:
        raise Conflict(f"migration mode {mode!r} is not one of {', '.join(MODES)}")
    if instance.host_id is None:
        raise Conflict(f"{instance.name} is not placed on a host yet")
    if instance.parent_id is not None:
        raise Conflict(
            f"{instance.name} is a sibling carved by local scaling; migrate its parent instead"
        )
    siblings = session.scalar(select(InstanceRow.id).where(InstanceRow.parent_id == instance.id))
    if siblings is not None:
        raise Conflict(
            f"{instance.name} has siblings carved by local scaling; wait until they fold back "
            f"or remove its policy (fleetvisor scale-policy rm {instance.name})"
        )
    busy = session.scalar(
        select(OperationRow.id).where(
            OperationRow.instance_id == instance.id, OperationRow.state.in_(ACTIVE_OPS)
        )
    )
    if busy is not None:
        raise Conflict(f"{instance.name} has an operation in flight ({busy}); wait for it")
    source = session.get(HostRow, instance.host_id)
    assert source is not None
    target = None
    if to is not None:
        target = session.scalar(select(HostRow).where(HostRow.name == to))
        if target is None:
            raise NotFound(f"host {to!r} does not exist; see `fleetvisor hosts`")
        if target.id == source.id:
            raise Conflict(f"{instance.name} already runs on {to}; name another host")
    if mode == "live":
        lacking = [
            h.name for h in (source, target) if h is not None and "checkpoint" not in h.capabilities
        ]
        if lacking:
            raise Conflict(
                f"live migration needs checkpoint/restore (CRIU) on both hosts; "
                f"{', '.join(lacking)} lack it: use --cold, or install CRIU >= 4.1 there"
            )
    op = new_operation(instance, OperationKind.MIGRATE, now, settings)
    op.params = {
        "source": source.id,
        "to": target.id if target is not None else None,
        "mode": mode,
        "issue": issue,
        "reason": reason or "requested",
        "after": after,
    }
    session.add(op)
    instance.status_message = f"migrating off {source.name}"
    return op


# -- the operation -------------------------------------------------------------------------


class _Failed(Exception):
    """End the migration as failed with this message (the caller has cleaned up)."""


async def migrate_instance(runner: OperationRunner, op_id: str) -> None:
    try:
        await _migrate(runner, op_id)
    except _Failed as exc:
        runner._finish(op_id, OperationState.FAILED, str(exc))


async def _migrate(runner: OperationRunner, op_id: str) -> None:
    clock = runner.clock
    await _wait_for_previous(runner, op_id)
    params, instance = _load(runner, op_id)
    source = _host(runner, params["source"])
    if params.get("committed"):
        await _clean(runner, op_id, params, instance)
        return
    if not params.get("target"):
        params = _place(runner, op_id, params, instance)
    target = _host(runner, params["target"])
    if source is None or target is None:
        _release_target(runner, op_id, params, instance)
        raise _Failed("the source or the target host was removed")
    spec = instance_spec(instance)

    # Looked up at every call: an agent that restarts may come back at another address.
    def src() -> AgentClient:
        return _client(runner, source)

    def dst() -> AgentClient:
        return _client(runner, target)

    running = instance.desired_power == PowerState.RUNNING
    both = set(source.capabilities) & set(target.capabilities)
    # Drivers that migrate live themselves (QEMU) stream the state host to host while
    # the instance runs; the others (runc + CRIU) stop it into a checkpoint package.
    streams = params["mode"] != "cold" and running and "live_migrate" in both

    if not params.get("prepared"):
        # The target makes everything but the process while the source still runs.
        runner._step(op_id, "prepare_target")
        try:
            machine = None
            if streams:
                machine = await runner._reach(
                    op_id, source.id, lambda: src().migration_machine(spec.id)
                )
            dumps = params["mode"] != "cold" and running and "checkpoint" in both
            answer = await runner._reach(
                op_id,
                target.id,
                lambda: dst().migrate_prepare(spec, op_id, machine, dumps and not streams),
            )
        except Exception as exc:
            if not (isinstance(exc, DriverError) or _is_give_up(exc)):
                raise
            await _quietly(dst().destroy(spec.id))
            _release_target(runner, op_id, params, instance, str(exc))
            raise _Failed(f"preparing {target.name} failed: {exc}") from exc
        params = _save(runner, op_id, prepared=True, uri=answer.get("uri"))

    if not params.get("packed"):
        runner._step(op_id, "pack", InstanceStatus.STOPPING)
        uri = params.get("uri")
        live = params["mode"] != "cold" and ("checkpoint" in both or bool(uri))
        try:
            meta = await runner._reach(
                op_id, source.id, lambda: src().migrate_out(spec.id, op_id, live, uri)
            )
        except DriverError as exc:
            await _quietly(dst().destroy(spec.id))
            _release_target(runner, op_id, params, instance, str(exc))
            await _quietly(src().migrate_abort(spec.id, op_id))
            raise _Failed(f"packing on {source.name} failed: {exc}") from exc
        except Exception as exc:  # unreachable past the deadline, or the host is down
            if not _is_give_up(exc):
                raise
            if source.state != HostState.DOWN and _host_state(runner, source.id) != HostState.DOWN:
                await _quietly(dst().destroy(spec.id))
                _release_target(runner, op_id, params, instance, str(exc))
                raise _Failed(f"{source.name} could not be reached to pack: {exc}") from exc
            meta = {"rebuilt": True, "live": False}
        params = _save(runner, op_id, packed=meta)

    packed = params["packed"]
    runner._step(op_id, "run_on_target", InstanceStatus.STARTING)
    began = clock.monotonic()
    try:
        if packed.get("rebuilt"):
            report = await runner._reach(
                op_id, target.id, lambda: dst().create(spec, start=running)
            )
        else:
            report = await runner._reach(
                op_id,
                target.id,
                lambda: dst().migrate_in(spec, op_id, src(), packed.get("token", ""), running),
            )
    except Exception as exc:
        if not (isinstance(exc, DriverError) or _is_give_up(exc)):
            raise
        # The target could not run it: the source takes it back, the target's copy goes.
        await _quietly(dst().destroy(spec.id))
        await _quietly(dst().migrate_forget(op_id))
        note = ""
        if not packed.get("rebuilt"):
            try:
                await runner._reach(op_id, source.id, lambda: src().migrate_abort(spec.id, op_id))
            except Exception as back:  # noqa: BLE001 - reported, the instance is unknown
                note = f"; running it on {source.name} again failed too: {back}"
        _release_target(runner, op_id, params, instance, f"{exc}{note}")
        raise _Failed(f"running on {target.name} failed: {exc}{note}") from exc
    # From the dump (the process freezes) to running on the target, as the controller
    # sees it: the whole pack, then the whole run call.
    downtime = clock.monotonic() - began + float(packed.get("pack_s", packed.get("dump_s", 0.0)))
    if packed.get("streamed"):  # the guest paused only for the last pass (QEMU's count)
        downtime = float(packed.get("driver_downtime_ms", 0.0)) / 1000
    _commit(runner, op_id, params, instance, source, target, report, downtime)
    params, instance = _load(runner, op_id)
    await _clean(runner, op_id, params, instance)


def _place(
    runner: OperationRunner, op_id: str, params: dict[str, Any], instance: InstanceRow
) -> dict[str, Any]:
    """Choose and reserve the target (one transaction), or fail the operation."""
    runner._step(op_id, "place")
    config = runner.scheduler or SchedulerConfig()
    history: dict[str, dict[str, tuple[float, ...]]] = {}
    for _ in range(5):
        try:
            with runner.db.write() as session:
                serialize_placements(session)
                fleet, _ = build_fleet(session, history)
                row = session.get(InstanceRow, instance.id)
                if row is None or row.host_id != params["source"]:
                    raise _Failed("the instance was removed or moved meanwhile")
                request = placement_request(session, row, fleet, params)
                try:
                    decision = place(session, [request], config=config, history=history)[0]
                except InsufficientCapacity as exc:
                    raise _Failed(f"no host can take {row.name}: {exc.detail}") from exc
                op = session.get(OperationRow, op_id)
                assert op is not None
                op.params = {**op.params, "target": decision.host.id}
                flag_modified(op, "params")
                return dict(op.params)
        except Stale:
            continue
    raise _Failed("the fleet changed too fast to place the instance; retry the migration")


def placement_request(
    session: Session, row: InstanceRow, fleet: FleetSnapshot, params: dict[str, Any]
) -> PlacementRequest:
    """The instance's own constraints, the source excluded, and no host worse than the
    source for the detected issue (or only the host the operator named)."""
    excluded = {h.id for h in fleet.hosts if h.id == params["source"]}
    if params.get("to"):
        excluded |= {h.id for h in fleet.hosts if h.id != params["to"]}
    source = next((h for h in fleet.hosts if h.id == params["source"]), None)
    issue = params.get("issue", "")
    if source is not None and issue in CPU_ISSUES:
        limit = _cpu_use(source)
        excluded |= {h.id for h in fleet.hosts if _cpu_use(h) > limit}
    group = None
    if row.placement_group_id:
        group = session.get(PlacementGroupRow, row.placement_group_id)
    return PlacementRequest(
        resources=row.resources,
        driver=row.driver,
        image=row.image,
        name=row.name,
        exclude_hosts=frozenset(excluded),
        groups=(group.name,) if group is not None else (),
        required_labels=dict(row.required_labels or {}),
        trusted_host=row.trusted_host,
    )


def _cpu_use(host: HostCandidate) -> float:
    used = sum(n.cpu_millicores for n in host.neighbours)
    return used / host.capacity.vcpus if host.capacity.vcpus else 1.0


def _commit(
    runner: OperationRunner,
    op_id: str,
    params: dict[str, Any],
    instance: InstanceRow,
    source: HostRow,
    target: HostRow,
    report: InstanceReport,
    downtime: float,
) -> None:
    now = runner.clock.now()
    packed = params["packed"]
    with runner.db.write() as session:
        row = session.get(InstanceRow, instance.id)
        op = session.get(OperationRow, op_id)
        if row is None or op is None:
            return
        if row.host_id == source.id:
            release(session, source.id, row.resources)
            row.host_id = target.id
        row.address = report.address
        row.status = InstanceStatus.RUNNING if report.state == "running" else InstanceStatus.STOPPED
        row.status_message = ""
        row.updated_at = now
        how = (
            "rebuilt from its image (source down: data lost)"
            if packed.get("rebuilt")
            else (
                "live (checkpoint/restore)" if packed.get("live") else "cold (stop, files, start)"
            )
        )
        result = {
            "mode": "rebuilt"
            if packed.get("rebuilt")
            else "live"
            if packed.get("live")
            else "cold",
            "downtime_ms": round(downtime * 1000, 1),
            "package_bytes": int(packed.get("bytes", 0)),
            "dump_s": packed.get("dump_s"),
        }
        op.params = {**op.params, "committed": True, "result": result}
        flag_modified(op, "params")
        remedies = dict(row.remedies or {})
        remedies["migrations"] = [*remedies.get("migrations", []), now][-20:]
        row.remedies = remedies
        why = params.get("reason", "")
        events.record(
            session,
            now,
            "instance.migrated",
            f"instance/{row.name}",
            f"{row.name} migrated {source.name} -> {target.name}, {how}, "
            f"downtime {result['downtime_ms']:.0f} ms ({why})",
            source=source.name,
            target=target.name,
            operation=op_id,
            issue=params.get("issue", ""),
            **result,
        )


async def _clean(
    runner: OperationRunner, op_id: str, params: dict[str, Any], instance: InstanceRow
) -> None:
    runner._step(op_id, "clean_source")
    source = _host(runner, params["source"])
    target = _host(runner, params["target"])
    if source is not None:
        agent = runner.clients.for_host(source.name, source.agent_url, source.agent_token)
        # Unreachable: its stopped copy is removed when it reports again (a duplicate).
        await _quietly(agent.destroy(instance.id))
        await _quietly(agent.migrate_forget(op_id))
    if target is not None:
        agent = runner.clients.for_host(target.name, target.agent_url, target.agent_token)
        await _quietly(agent.migrate_forget(op_id))
    with runner.db.write() as session:
        op = session.get(OperationRow, op_id)
        if op is not None:
            op.state = OperationState.SUCCEEDED
            op.step = "done"
            op.error = ""
            op.updated_at = runner.clock.now()


def _release_target(
    runner: OperationRunner,
    op_id: str,
    params: dict[str, Any],
    instance: InstanceRow,
    why: str = "",
) -> None:
    """Give the target's reservation back (once) and say the instance stays."""
    now = runner.clock.now()
    with runner.db.write() as session:
        op = session.get(OperationRow, op_id)
        row = session.get(InstanceRow, instance.id)
        if op is None:
            return
        if op.params.get("target") and not op.params.get("released") and row is not None:
            release(session, op.params["target"], row.resources)
            op.params = {**op.params, "released": True}
            flag_modified(op, "params")
        if row is not None:
            row.status_message = f"migration failed: {why}" if why else ""
            row.updated_at = now
            if why:
                events.record(
                    session,
                    now,
                    "instance.migration_failed",
                    f"instance/{row.name}",
                    f"migrating {row.name} failed; it stays where it was: {why}",
                    operation=op_id,
                )


# -- helpers -------------------------------------------------------------------------------


async def _wait_for_previous(runner: OperationRunner, op_id: str) -> None:
    """A drain migrates one instance after the other (params.after)."""
    with runner.db.read() as session:
        op = session.get(OperationRow, op_id)
        after = op.params.get("after") if op else None
    while after:
        with runner.db.read() as session:
            previous = session.get(OperationRow, after)
            if previous is None or previous.state not in ACTIVE_OPS:
                return
        await runner.clock.sleep(0.2)


def _load(runner: OperationRunner, op_id: str) -> tuple[dict[str, Any], InstanceRow]:
    with runner.db.read() as session:
        op = session.get(OperationRow, op_id)
        instance = session.get(InstanceRow, op.instance_id or "") if op else None
        params = dict(op.params) if op else {}
    if instance is None:
        raise _Failed("the instance was removed meanwhile")
    return params, instance


def _host(runner: OperationRunner, host_id: str | None) -> HostRow | None:
    if not host_id:
        return None
    with runner.db.read() as session:
        return session.get(HostRow, host_id)


def _client(runner: OperationRunner, host: HostRow) -> AgentClient:
    current = _host(runner, host.id) or host
    return runner.clients.for_host(current.name, current.agent_url, current.agent_token)


def _host_state(runner: OperationRunner, host_id: str) -> str | None:
    host = _host(runner, host_id)
    return host.state if host else None


def _save(runner: OperationRunner, op_id: str, **values: Any) -> dict[str, Any]:
    with runner.db.write() as session:
        op = session.get(OperationRow, op_id)
        assert op is not None
        op.params = {**op.params, **values}
        flag_modified(op, "params")
        return dict(op.params)


def _is_give_up(exc: Exception) -> bool:
    return isinstance(exc, GiveUp)


async def _quietly(call: Any) -> None:
    with contextlib.suppress(AgentUnreachable, DriverError):
        await call
