"""The operation runner: drives every pending or interrupted operation to an end.

    pending/running row --> claim (state running, attempts+1) --> handler --> end state
        create/start/stop/recover: converge (create on host if missing, apply power)
        delete: destroy on host, release capacity, remove the row

Handlers are idempotent: a controller that died mid-operation finds the row still
`running` at its next start and runs the handler again from the top. An agent that
cannot be reached is retried with back-off until the operation's deadline; a create
that cannot finish is rolled back (capacity released, row removed), so no
half-created instance survives. Whatever an agent did that the store forgot is
removed later by host reconciliation (orphans).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import delete, select

from fleetvisor.clock import Clock
from fleetvisor.controller import events
from fleetvisor.controller.agent_client import AgentClient, AgentClients
from fleetvisor.controller.instance_specs import instance_spec
from fleetvisor.controller.instances import release
from fleetvisor.controller.migrations import migrate_instance
from fleetvisor.controller.moves import move_instance
from fleetvisor.controller.operation_records import ACTIVE_OPS
from fleetvisor.controller.operation_records import GiveUp as _GiveUp
from fleetvisor.controller.settings import ControllerSettings
from fleetvisor.errors import AgentUnreachable, DriverError
from fleetvisor.model.entities import (
    HostState,
    InstanceStatus,
    OperationKind,
    OperationState,
    PowerState,
)
from fleetvisor.model.specs import InstanceReport
from fleetvisor.scheduler.config import SchedulerConfig
from fleetvisor.store.db import Database
from fleetvisor.store.tables import HostRow, InstanceRow, OperationRow

log = logging.getLogger(__name__)


class OperationRunner:
    def __init__(
        self, db: Database, clock: Clock, clients: AgentClients, settings: ControllerSettings
    ) -> None:
        self.db = db
        self.clock = clock
        self.clients = clients
        self.settings = settings
        self.scheduler: SchedulerConfig | None = None  # placement of migrations (Controller)
        self._active: dict[str, asyncio.Task[None]] = {}
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """Look for new work now. Safe to call from any thread."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run_forever(self, poll_interval: float = 1.0) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while True:
            self.dispatch()
            sleeper = asyncio.ensure_future(self.clock.sleep(poll_interval))
            waker = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            sleeper.cancel()
            waker.cancel()
            self._wake.clear()

    def dispatch(self) -> None:
        """Start a task for every runnable operation not already running here."""
        with self.db.read() as session:
            ids = list(
                session.scalars(
                    select(OperationRow.id)
                    .where(OperationRow.state.in_(ACTIVE_OPS))
                    .order_by(OperationRow.created_at)
                )
            )
        for op_id in ids:
            if op_id not in self._active:
                task = asyncio.create_task(self.execute(op_id), name=f"operation-{op_id}")
                self._active[op_id] = task
                task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._active.pop(task.get_name().removeprefix("operation-"), None)

    @property
    def busy(self) -> bool:
        return bool(self._active)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for the operation tasks started so far (all of them, or until timeout)."""
        if timeout is not None:
            if self._active:
                await asyncio.wait(list(self._active.values()), timeout=timeout)
            return
        while self._active:
            await asyncio.gather(*list(self._active.values()), return_exceptions=True)

    async def stop(self) -> None:
        for task in list(self._active.values()):
            task.cancel()
        await asyncio.gather(*list(self._active.values()), return_exceptions=True)

    async def execute(self, op_id: str) -> None:
        with self.db.write() as session:
            op = session.get(OperationRow, op_id)
            if op is None or op.state not in ACTIVE_OPS:
                return
            op.state = OperationState.RUNNING
            op.attempts += 1
            op.updated_at = self.clock.now()
            kind = OperationKind(op.kind)
        handlers: dict[OperationKind, Callable[[str], Awaitable[None]]] = {
            OperationKind.DELETE: self._delete,
            OperationKind.MOVE: self._move,
            OperationKind.MIGRATE: self._migrate,
        }
        handler = handlers.get(kind, self._converge)
        try:
            await handler(op_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: end the operation visibly instead of looping
            log.exception("operation %s crashed", op_id)
            self._finish(op_id, OperationState.FAILED, f"internal error: {exc!r}")

    # -- converge: create / start / stop / recover --------------------------------------

    async def _converge(self, op_id: str) -> None:
        loaded = self._load(op_id)
        if loaded is None:
            return
        op, instance, host = loaded
        kind = OperationKind(op.kind)
        agent = self.clients.for_host(host.name, host.agent_url, host.agent_token)
        spec = instance_spec(instance)
        try:
            self._step(
                op_id,
                "create_on_host",
                InstanceStatus.CREATING
                if kind in (OperationKind.CREATE, OperationKind.RECOVER)
                else None,
            )
            running = instance.desired_power == PowerState.RUNNING
            # Create and start travel in one call; both are idempotent, so a retry after
            # a lost answer is harmless.
            report = await self._reach(op_id, host.id, lambda: agent.create(spec, start=running))
            if not running:
                self._step(op_id, "apply_power")
                report = await self._reach(op_id, host.id, lambda: agent.stop(spec.id))
        except (_GiveUp, DriverError) as exc:
            await self._converge_failed(op_id, kind, instance, host, agent, exc)
            return
        self._converge_done(op_id, instance, host, report)

    def _converge_done(
        self, op_id: str, instance: InstanceRow, host: HostRow, report: InstanceReport
    ) -> None:
        now = self.clock.now()
        status = InstanceStatus.RUNNING if report.state == "running" else InstanceStatus.STOPPED
        with self.db.write() as session:
            row = session.get(InstanceRow, instance.id)
            op = session.get(OperationRow, op_id)
            if row is None or op is None:
                return
            row.status = status
            row.status_message = ""
            row.address = report.address
            row.updated_at = now
            op.state = OperationState.SUCCEEDED
            op.step = "done"
            op.updated_at = now
            events.record(
                session,
                now,
                f"instance.{status}",
                f"instance/{row.name}",
                f"{row.name} is {status} on {host.name} ({op.kind} done)",
                host=host.name,
                operation=op_id,
            )

    async def _converge_failed(
        self,
        op_id: str,
        kind: OperationKind,
        instance: InstanceRow,
        host: HostRow,
        agent: AgentClient,
        exc: Exception,
    ) -> None:
        if kind == OperationKind.CREATE:
            await self._roll_back_create(op_id, instance, host, agent, str(exc))
            return
        now = self.clock.now()
        unreachable = isinstance(exc, _GiveUp)
        with self.db.write() as session:
            row = session.get(InstanceRow, instance.id)
            if row is not None:
                row.status = InstanceStatus.UNKNOWN if unreachable else InstanceStatus.ERROR
                row.status_message = str(exc)
                row.updated_at = now
                events.record(
                    session,
                    now,
                    f"instance.{kind}_failed",
                    f"instance/{row.name}",
                    f"{kind} of {row.name} on {host.name} failed: {exc}",
                    operation=op_id,
                )
        self._finish(op_id, OperationState.FAILED, str(exc))

    async def _roll_back_create(
        self, op_id: str, instance: InstanceRow, host: HostRow, agent: AgentClient, reason: str
    ) -> None:
        # Best effort on the host; if it is unreachable, reconciliation removes the
        # orphan when the agent next reports.
        await _quietly(agent.destroy(instance.id))
        now = self.clock.now()
        with self.db.write() as session:
            row = session.get(InstanceRow, instance.id)
            if row is not None:
                if row.host_id:
                    release(session, row.host_id, row.resources)
                session.delete(row)
            op = session.get(OperationRow, op_id)
            if op is not None:
                op.state = OperationState.ROLLED_BACK
                op.error = reason
                op.step = "rolled_back"
                op.updated_at = now
            events.record(
                session,
                now,
                "instance.create_failed",
                f"instance/{instance.name}",
                f"creating {instance.name} on {host.name} failed and was rolled back: {reason}",
                operation=op_id,
                host=host.name,
            )

    # -- delete ----------------------------------------------------------------------------

    async def _delete(self, op_id: str) -> None:
        loaded = self._load(op_id)
        if loaded is None:
            return
        op, instance, host = loaded
        self._step(op_id, "destroy_on_host")
        note = ""
        agent = self.clients.for_host(host.name, host.agent_url, host.agent_token)
        try:
            await self._reach(op_id, host.id, lambda: agent.destroy(instance.id))
        except _GiveUp as exc:
            note = f" (host unreachable: {exc}; it will be removed there when the host returns)"
        except DriverError as exc:
            self._finish(op_id, OperationState.FAILED, f"destroy failed on {host.name}: {exc}")
            with self.db.write() as session:
                row = session.get(InstanceRow, instance.id)
                if row is not None:
                    row.status = InstanceStatus.ERROR
                    row.status_message = str(exc)
            return
        now = self.clock.now()
        with self.db.write() as session:
            row = session.get(InstanceRow, instance.id)
            if row is not None:
                if row.host_id:
                    release(session, row.host_id, row.resources)
                session.delete(row)
            current = session.get(OperationRow, op_id)
            if current is not None:
                current.state = OperationState.SUCCEEDED
                current.step = "done"
                current.error = note.strip()
                current.updated_at = now
            events.record(
                session,
                now,
                "instance.deleted",
                f"instance/{instance.name}",
                f"{instance.name} removed from {host.name}{note}",
                operation=op_id,
            )

    # -- move (cold): leave the source, start on the target ---------------------------------

    async def _move(self, op_id: str) -> None:
        await move_instance(self, op_id)

    # -- migrate: with the instance's state (controller/migrations.py) ------------------

    async def _migrate(self, op_id: str) -> None:
        await migrate_instance(self, op_id)

    # -- shared --------------------------------------------------------------------------

    def _load(self, op_id: str) -> tuple[OperationRow, InstanceRow, HostRow] | None:
        with self.db.read() as session:
            op = session.get(OperationRow, op_id)
            instance = session.get(InstanceRow, op.instance_id) if op and op.instance_id else None
            host = session.get(HostRow, instance.host_id) if instance and instance.host_id else None
        if op is None:
            return None
        if instance is None or host is None:
            if op.kind == OperationKind.DELETE and instance is not None:
                with self.db.write() as session:
                    session.execute(delete(InstanceRow).where(InstanceRow.id == instance.id))
            self._finish(
                op_id,
                OperationState.SUCCEEDED
                if op.kind == OperationKind.DELETE
                else OperationState.FAILED,
                "instance or its host no longer exists",
            )
            return None
        return op, instance, host

    async def _reach(self, op_id: str, host_id: str, call: Callable[[], Awaitable[Any]]):  # type: ignore[no-untyped-def]
        """Call the agent, retrying while it is unreachable, until the deadline or host down."""
        delay = self.settings.retry_initial
        while True:
            try:
                return await call()
            except AgentUnreachable as exc:
                with self.db.read() as session:
                    op = session.get(OperationRow, op_id)
                    host = session.get(HostRow, host_id)
                deadline = op.deadline if op else 0.0
                if host is None or host.state == HostState.DOWN:
                    raise _GiveUp(f"host is down ({exc})") from exc
                if self.clock.now() + delay > deadline:
                    raise _GiveUp(f"agent unreachable until the deadline ({exc})") from exc
                await self.clock.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max)

    def _step(self, op_id: str, step: str, status: InstanceStatus | None = None) -> None:
        with self.db.write() as session:
            op = session.get(OperationRow, op_id)
            if op is None:
                return
            op.step = step
            op.updated_at = self.clock.now()
            if status is not None and op.instance_id:
                row = session.get(InstanceRow, op.instance_id)
                if row is not None:
                    row.status = status

    def _finish(self, op_id: str, state: OperationState, error: str = "") -> None:
        with self.db.write() as session:
            op = session.get(OperationRow, op_id)
            if op is not None and op.state in ACTIVE_OPS:
                op.state = state
                op.error = error
                op.updated_at = self.clock.now()


async def _quietly(call: Awaitable[None]) -> None:
    with contextlib.suppress(AgentUnreachable, DriverError):
        await call
