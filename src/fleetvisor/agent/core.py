"""Agent: what one host does when the controller asks, through its driver.

The same object serves the agent's HTTP API and, in simulations, the controller's
in-process client. It never decides placement; it does, reports, and obeys.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fleetvisor.agent.health import HealthSupervisor
from fleetvisor.agent.image_cache import HostImageCache
from fleetvisor.agent.migration import HostMigrations, PackageSource
from fleetvisor.agent.scaling import ScalingSupervisor
from fleetvisor.clock import Clock, RealClock
from fleetvisor.drivers.base import Driver, UnknownInstance
from fleetvisor.errors import NotFound
from fleetvisor.model.health import Detection
from fleetvisor.model.resources import Resources
from fleetvisor.model.specs import InstanceReport, InstanceSpec

LOG_CHUNK = 64 * 1024


class Agent:
    def __init__(
        self,
        driver: Driver,
        clock: Clock | None = None,
        images: HostImageCache | None = None,
        state_dir: Path | None = None,
        service_host: str = "127.0.0.1",
    ) -> None:
        self.driver = driver
        self.clock = clock or RealClock()
        self.images = images  # the host's image cache, for drivers that run real images
        self.service_host = service_host  # where other hosts reach this one
        self._launching: dict[str, float] = {}  # instance -> when its create began
        # One lock per instance: the controller may retry a call while the first
        # attempt is still running; they must not interleave.
        self._locks: dict[str, asyncio.Lock] = {}
        # Local scaling managers; siblings they carve are this host's own business
        # until a report tells the controller.
        self.scaling = ScalingSupervisor(self, state_dir, service_host)
        self.migrations = HostMigrations(self, state_dir)
        if getattr(driver, "migration_address", None) == "127.0.0.1":
            # Incoming live migrations listen where other hosts reach this agent.
            driver.migration_address = service_host  # type: ignore[attr-defined]
        # Execution monitoring of instances with a health policy (agent/health/).
        self.health = HealthSupervisor(driver, self.clock, stop=self.stop, start=self.start)

    def lock(self, instance_id: str) -> asyncio.Lock:
        return self._locks.setdefault(instance_id, asyncio.Lock())

    async def create(self, spec: InstanceSpec, start: bool = False) -> InstanceReport:
        """Create the instance (idempotent); with `start`, run it too, in one call."""
        async with self.lock(spec.id):
            self._launching.setdefault(spec.id, self.clock.monotonic())
            if self.images is not None:
                await self.images.prepare(spec.id, spec.image)
            report = await self.driver.create(spec)
            await self.scaling.created(spec)
            self.watch(spec)
            if start:
                report = await self._start(spec.id)
        if start:
            self.health.expect_running(spec.id)
            self.scaling.started(spec.id)
        return self._annotated(report)

    async def start(self, instance_id: str) -> InstanceReport:
        async with self.lock(instance_id):
            report = await self._start(instance_id)
        self.health.expect_running(instance_id)
        self.scaling.started(instance_id)
        return self._annotated(report)

    async def _start(self, instance_id: str) -> InstanceReport:
        report = await _known(instance_id, self.driver.start(instance_id))
        began = self._launching.pop(instance_id, None)
        if began is not None and self.images is not None:
            self.images.record_launch(self.clock.monotonic() - began)
        return report

    async def stop(self, instance_id: str) -> InstanceReport:
        self.health.expect_stopped(instance_id)
        # Siblings fold back first: a stopped instance holds its whole size again.
        await self.scaling.quiesce(instance_id)
        async with self.lock(instance_id):
            report = await _known(instance_id, self.driver.stop(instance_id))
        return self._annotated(report)

    async def destroy(self, instance_id: str) -> None:
        if self.scaling.parent_of(instance_id) is not None:
            # A sibling the controller removes folds back: its parent gets its share.
            await self.scaling.fold_child(instance_id, "removed by the controller")
            return
        await self.health.unwatch(instance_id)
        await self.scaling.remove(instance_id)
        async with self.lock(instance_id):
            await self.driver.destroy(instance_id)
            if self.images is not None:
                await self.images.release(instance_id)
        self._locks.pop(instance_id, None)
        self._launching.pop(instance_id, None)

    # -- migration (agent/migration.py) ------------------------------------------------

    async def migrate_out(
        self, instance_id: str, migration: str, live: bool, uri: str | None = None
    ) -> dict[str, Any]:
        """Source side: stop the instance into a package (a checkpoint when `live`), or
        stream it to a target listening at `uri`."""
        return await self.migrations.send(instance_id, migration, live, uri)

    async def migration_machine(self, instance_id: str) -> dict[str, Any] | None:
        """What a target must start to receive this instance live (None: not needed)."""
        describe = getattr(self.driver, "describe", None)
        return dict(describe(instance_id)) if describe is not None else None

    async def migrate_prepare(
        self,
        spec: InstanceSpec,
        migration: str = "",
        machine: dict[str, Any] | None = None,
        checkpoint: bool = False,
    ) -> dict[str, Any]:
        """Target side, before the source stops: create the instance here, not running;
        with `machine`, listen for its state. Answers {"report", "uri"}."""
        report, uri = await self.migrations.prepare(spec, migration, machine, checkpoint)
        return {"report": self._annotated(report).model_dump(), "uri": uri}

    def migration_package(self, migration: str) -> AsyncIterator[bytes]:
        return self.migrations.package(migration)

    async def migrate_in(
        self,
        spec: InstanceSpec,
        migration: str,
        source: PackageSource,
        token: str = "",
        start: bool = True,
    ) -> InstanceReport:
        """Target side: pull the package from `source` and run the instance from it.
        (`token` is for agents over HTTP; an in-process source needs none.)"""
        report = await self.migrations.receive(spec, migration, source, start)
        if report.state == "running":
            self.scaling.started(spec.id)
        return self._annotated(report)

    async def migrate_abort(self, instance_id: str, migration: str) -> InstanceReport:
        """Source side: the migration failed; the instance runs here again."""
        report = await self.migrations.abort(instance_id, migration)
        if report.state == "running":
            self.scaling.started(instance_id)
        return self._annotated(report)

    async def migrate_forget(self, migration: str) -> None:
        await self.migrations.forget(migration)

    # -- execution monitoring (agent/health/) ------------------------------------------

    def watch(self, spec: InstanceSpec, running: bool = False) -> None:
        """Monitor an instance that has a health policy (others keep the older behaviour:
        nothing restarts them)."""
        if spec.health is not None:
            self.health.watch(spec, running=running)

    async def watch_existing(self) -> None:
        """After an agent restart: monitor again what runs here (specs from the driver)."""
        spec_of = getattr(self.driver, "spec_of", None)
        if spec_of is None:
            return
        for report in await self.driver.list():
            with contextlib.suppress(UnknownInstance):
                self.watch(await spec_of(report.id), running=report.state == "running")

    def take_detections(self) -> list[Detection]:
        """Issues detected since the last heartbeat (the heartbeat carries them)."""
        return self.health.drain()

    async def resize(self, instance_id: str, resources: Resources) -> InstanceReport:
        async with self.lock(instance_id):
            return await _known(instance_id, self.driver.resize(instance_id, resources))

    async def set_scaling(self, spec: InstanceSpec) -> dict[str, Any]:
        """Apply the instance's scaling policy (`spec.scaling`; None removes it)."""
        if spec.id not in {r.id for r in await self.driver.list()}:
            raise NotFound(f"this host has no instance {spec.id}")
        await self.scaling.set_policy(spec)
        return self.scaling.status(spec.id)

    async def scaling_status(self, instance_id: str) -> dict[str, Any]:
        return self.scaling.status(instance_id)

    async def stats(self, instance_id: str) -> dict[str, float]:
        return await _known(instance_id, self.driver.stats(instance_id))

    async def list(self) -> list[InstanceReport]:
        return self.scaling.annotate(await self.driver.list())

    def _annotated(self, report: InstanceReport) -> InstanceReport:
        return self.scaling.annotate([report])[0]

    async def logs(
        self, instance_id: str, follow: bool = False, tail: int | None = None
    ) -> AsyncIterator[bytes]:
        """The instance's output: the last `tail` lines (all when None), then, with
        `follow`, new output as it is written until the instance is destroyed."""
        path = self.driver.log_path(instance_id)
        known = {r.id for r in await self.driver.list()}
        if path is None or (instance_id not in known and not path.exists()):
            raise NotFound(f"this host has no output for instance {instance_id}")
        offset = 0
        if path.exists():
            data = path.read_bytes()
            offset = len(data)
            if tail is not None:
                data = b"".join(data.splitlines(keepends=True)[-tail:]) if tail else b""
            if data:
                yield data
        while follow:
            if path.exists() and path.stat().st_size > offset:
                with path.open("rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read(LOG_CHUNK)
                offset += len(chunk)
                yield chunk
                continue
            if instance_id not in {r.id for r in await self.driver.list()}:
                return
            await self.clock.sleep(0.2)

    async def host_metrics(self) -> dict[str, float]:
        """Host-wide usage summed over instances, for the heartbeat."""
        reports = await self.driver.list()
        totals = {"cpu_millicores": 0.0, "memory_mib": 0.0, "net_mbps": 0.0}
        for report in reports:
            for key in totals:
                totals[key] += report.usage.get(key, 0.0)
        totals["instances_running"] = float(sum(r.state == "running" for r in reports))
        return totals


async def _known(instance_id: str, call):  # type: ignore[no-untyped-def]
    try:
        return await call
    except UnknownInstance:
        raise NotFound(f"this host has no instance {instance_id}") from None
