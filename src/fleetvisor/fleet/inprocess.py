"""InProcessFleet: a controller and simulated agents in one process and one event loop.

The controller reaches agents through the in-process AgentClient, agents report by
calling the controller's services directly; with a VirtualClock, hours of fleet
time pass in milliseconds. Tests use it, and it is the core of the simulator.
"""

from __future__ import annotations

from pathlib import Path

from fleetvisor.agent.core import Agent
from fleetvisor.agent.migration import HostMigrations
from fleetvisor.clock import Clock, VirtualClock
from fleetvisor.controller.agent_client import AgentClient, AgentClients
from fleetvisor.controller.core import Controller
from fleetvisor.controller.settings import ControllerSettings
from fleetvisor.drivers.sim import SimDriver
from fleetvisor.drivers.sim.driver import DEFAULT_CAPACITY
from fleetvisor.errors import AgentUnreachable
from fleetvisor.model.resources import Resources


class _Unreachable:
    """Stands for an agent that is down or cut off: every call fails to connect."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, _call: str):  # type: ignore[no-untyped-def]
        async def fail(*_args: object, **_kwargs: object) -> None:
            raise AgentUnreachable(f"agent {self.name} is unreachable")

        return fail


class InProcessFleet:
    def __init__(
        self,
        state_dir: Path,
        *,
        db_url: str | None = None,
        clock: Clock | None = None,
        settings: ControllerSettings | None = None,
    ) -> None:
        self.clock = clock or VirtualClock()
        self.state_dir = state_dir
        self.agents: dict[str, Agent] = {}
        self.unreachable: set[str] = set()
        self.controller = Controller(
            state_dir=state_dir,
            db_url=db_url,
            clock=self.clock,
            settings=settings or ControllerSettings(),
            agent_clients=AgentClients(in_process=self._client_for),
        )
        self.controller.prepare()

    def _client_for(self, name: str) -> AgentClient | None:
        if name in self.unreachable or name not in self.agents:
            return _Unreachable(name)  # type: ignore[return-value]
        return self.agents[name]  # type: ignore[return-value]

    async def add_host(
        self,
        name: str,
        capacity: Resources = DEFAULT_CAPACITY,
        cluster: str = "default",
        seed: int = 0,
    ) -> Agent:
        driver = SimDriver(
            clock=self.clock,
            state_dir=Path("/nonexistent"),
            capacity=capacity,
            seed=seed,
            persist=False,
        )
        agent = Agent(driver, self.clock)
        # Only the migration staging area is on disk; everything else is in memory.
        agent.migrations = HostMigrations(agent, self.state_dir / "hosts" / name)
        self.agents[name] = agent
        await self.register(name, cluster)
        return agent

    async def register(self, name: str, cluster: str = "default") -> list[str]:
        """(Re-)register a host with what its agent has; returns what the agent removed."""
        agent = self.agents[name]
        registration = self.controller.hosts.register(
            name=name,
            cluster=cluster,
            agent_url=f"inprocess://{name}",
            agent_token=f"inprocess-{name}-token",
            info=agent.driver.host_info(),
            labels={},
            instances=await agent.list(),
        )
        for instance_id in registration.destroy:
            await agent.destroy(instance_id)
        return registration.destroy

    async def heartbeat(self, name: str) -> list[str]:
        agent = self.agents[name]
        host = self.controller.hosts.get(name)
        notices = agent.scaling.take_notices()  # first: what they announce is listed
        result = self.controller.hosts.heartbeat(
            host.id,
            metrics=await agent.host_metrics(),
            instances=await agent.list(),
            scaling_events=notices,
            detections=agent.take_detections(),
        )
        for instance_id in result.destroy:
            await agent.destroy(instance_id)
        for spec in result.scaling:
            await agent.scaling.set_policy(spec)
        return result.destroy

    async def settle(self, max_virtual_seconds: float = 3600.0) -> None:
        """Run every pending operation to its end, moving virtual time when they wait."""
        runner = self.controller.runner
        start = self.clock.monotonic()
        while True:
            runner.dispatch()
            if not runner.busy:
                return
            await runner.drain(timeout=0.01)
            if isinstance(self.clock, VirtualClock) and runner.busy:
                deadline = self.clock.next_deadline()
                if deadline is not None:
                    await self.clock.advance(max(0.0, deadline - self.clock.now()))
            if self.clock.monotonic() - start > max_virtual_seconds:
                raise TimeoutError(f"operations still running after {max_virtual_seconds}s")
