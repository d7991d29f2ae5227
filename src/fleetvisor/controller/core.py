"""The controller: the services over one store and clock, and its background loops.

Controller.start(): migrate schema -> defaults -> admin token -> loops
    health loop:   mark hosts down after missed heartbeats
    runner loop:   drive operations (resumes what a previous run left in flight)
    attestation:   challenge enrolled hosts after they register, then periodically
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from fleetvisor.clock import Clock, RealClock
from fleetvisor.controller.agent_client import AgentClient, AgentClients
from fleetvisor.controller.attestation import AttestationService
from fleetvisor.controller.hosts import HostRegistry
from fleetvisor.controller.image_cache import CachePlanner
from fleetvisor.controller.instances import InstanceService
from fleetvisor.controller.inventory import Inventory
from fleetvisor.controller.operations import OperationRunner
from fleetvisor.controller.settings import ControllerSettings
from fleetvisor.controller.tokens import load_or_create_admin_token
from fleetvisor.errors import Conflict, FleetvisorError, NotFound
from fleetvisor.images.store import ImageStore
from fleetvisor.model.entities import HostState
from fleetvisor.scheduler import SchedulerConfig
from fleetvisor.store.db import Database, sqlite_url
from fleetvisor.store.tables import (
    ClusterRow,
    HostRow,
    InstanceRow,
    OperationRow,
    PlacementGroupRow,
)

log = logging.getLogger(__name__)


class Controller:
    def __init__(
        self,
        *,
        state_dir: Path,
        db_url: str | None = None,
        clock: Clock | None = None,
        settings: ControllerSettings | None = None,
        agent_clients: AgentClients | None = None,
        scheduler: SchedulerConfig | None = None,
    ) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(db_url or sqlite_url(state_dir / "fleetvisor.db"))
        self.clock = clock or RealClock()
        self.settings = settings or ControllerSettings()
        self.clients = agent_clients or AgentClients()
        self.inventory = Inventory(self.db, self.clock)
        self.hosts = HostRegistry(self.db, self.clock, self.settings)
        self.runner = OperationRunner(self.db, self.clock, self.clients, self.settings)
        self.runner.scheduler = scheduler
        self.attestation = AttestationService(self.db, self.clock, self.settings, self.clients)
        self.admin_token = ""
        self.images = ImageStore(state_dir / "images")
        self.cache = CachePlanner(self.db, self.clock, self.image_size)
        self.instances = InstanceService(
            self.db, self.clock, self.settings, self.image_size, scheduler
        )
        self._tasks: list[asyncio.Task[None]] = []

    def prepare(self) -> None:
        """Schema, defaults and the admin token: everything before serving."""
        self.db.upgrade()
        self.inventory.ensure_defaults()
        self.admin_token = load_or_create_admin_token(self.state_dir)

    async def start_loops(self) -> None:
        self._tasks = [
            asyncio.create_task(self._health_loop(), name="health"),
            asyncio.create_task(self.runner.run_forever(), name="operations"),
            asyncio.create_task(self.attestation.run_forever(), name="attestation"),
        ]

    async def stop_loops(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.runner.stop()
        await self.clients.aclose()
        self._tasks = []

    async def _health_loop(self) -> None:
        ticks = 0
        while True:
            ticks += 1
            try:
                self.hosts.mark_stale_hosts_down()
                if self.hosts.evacuations:
                    self.hosts.evacuations.clear()
                    self.runner.wake()
                if ticks % 600 == 0:  # every few minutes: samples past the retention go
                    self.hosts.prune_samples()
            except Exception:  # keep watching: one bad tick must not end liveness checks
                log.exception("health check failed")
            await self.clock.sleep(self.settings.health_check_interval)

    # -- read helpers shared by the API and the simulator ----------------------------------

    def operations(
        self, state: str | None = None, instance: str | None = None, limit: int = 100
    ) -> list[OperationRow]:
        with self.db.read() as session:
            query = select(OperationRow).order_by(OperationRow.created_at.desc()).limit(limit)
            if state:
                query = query.where(OperationRow.state == state)
            if instance:
                query = query.where(OperationRow.instance_name == instance)
            return list(session.scalars(query))

    def operation(self, op_id: str) -> OperationRow:
        with self.db.read() as session:
            row = session.get(OperationRow, op_id)
            if row is None:
                raise NotFound(f"operation {op_id!r} does not exist; see `fleetvisor op ls`")
            return row

    def image_size(self, image: str) -> tuple[str, int] | None:
        """(manifest digest, bytes) of an image the registry holds, else None."""
        try:
            info = self.images.info(image)
        except FleetvisorError:
            return None
        return info.digest, info.size

    def agent_for(self, instance_name: str) -> tuple[InstanceRow, HostRow, AgentClient]:
        """The instance and a client of the agent running it; 409 when it cannot be reached."""
        instance = self.instances.get(instance_name)
        with self.db.read() as session:
            host = session.get(HostRow, instance.host_id) if instance.host_id else None
        if host is None:
            raise Conflict(f"{instance_name} is not on a host yet; wait for its create operation")
        if host.state == HostState.DOWN:
            raise Conflict(
                f"host {host.name} of {instance_name} is down; try again when it returns"
            )
        return instance, host, self.clients.for_host(host.name, host.agent_url, host.agent_token)

    def names(self) -> Names:
        """id -> name maps for hosts, clusters and placement groups, for display."""
        with self.db.read() as session:

            def pairs(query: Any) -> dict[Any, Any]:
                return {key: value for key, value in session.execute(query).all()}

            return Names(
                hosts=pairs(select(HostRow.id, HostRow.name)),
                clusters=pairs(select(ClusterRow.id, ClusterRow.name)),
                groups=pairs(select(PlacementGroupRow.id, PlacementGroupRow.name)),
                instances_per_host=pairs(
                    select(InstanceRow.host_id, func.count()).group_by(InstanceRow.host_id)
                ),
            )


@dataclass
class Names:
    hosts: dict[str, str]
    clusters: dict[str, str]
    groups: dict[str, str]
    instances_per_host: dict[str | None, int]
