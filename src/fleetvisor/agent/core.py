"""Agent: what one host does when the controller asks, through its driver.

The same object serves the agent's HTTP API and, in simulations, the controller's
in-process client. It never decides placement; it does, reports, and obeys.
"""

from __future__ import annotations

import asyncio

from fleetvisor.drivers.base import Driver, UnknownInstance
from fleetvisor.errors import NotFound
from fleetvisor.model.resources import Resources
from fleetvisor.model.specs import InstanceReport, InstanceSpec


class Agent:
    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        # One lock per instance: the controller may retry a call while the first
        # attempt is still running; they must not interleave.
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, instance_id: str) -> asyncio.Lock:
        return self._locks.setdefault(instance_id, asyncio.Lock())

    async def create(self, spec: InstanceSpec) -> InstanceReport:
        async with self._lock(spec.id):
            return await self.driver.create(spec)

    async def start(self, instance_id: str) -> InstanceReport:
        async with self._lock(instance_id):
            return await _known(instance_id, self.driver.start(instance_id))

    async def stop(self, instance_id: str) -> InstanceReport:
        async with self._lock(instance_id):
            return await _known(instance_id, self.driver.stop(instance_id))

    async def destroy(self, instance_id: str) -> None:
        async with self._lock(instance_id):
            await self.driver.destroy(instance_id)
        self._locks.pop(instance_id, None)

    async def resize(self, instance_id: str, resources: Resources) -> InstanceReport:
        async with self._lock(instance_id):
            return await _known(instance_id, self.driver.resize(instance_id, resources))

    async def stats(self, instance_id: str) -> dict[str, float]:
        return await _known(instance_id, self.driver.stats(instance_id))

    async def list(self) -> list[InstanceReport]:
        return await self.driver.list()

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
