"""The agent process: serve the agent API, register, heartbeat, obey reconciliation.

start driver -> bind API socket -> register (retry with back-off)
  -> every heartbeat interval: send metrics + instance report
     <- `destroy`: instances the fleet does not know any more (removed here)
     <- 401/404: the controller forgot us (new database?) -> register again
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
from pathlib import Path
from typing import Any

import uvicorn

from fleetvisor.agent.api import create_agent_app
from fleetvisor.agent.boot import BootOptions, MeasuredBoot, boot_or_exit
from fleetvisor.agent.core import Agent
from fleetvisor.agent.image_cache import HostImageCache
from fleetvisor.client import ApiError, FleetClient
from fleetvisor.clock import Clock, RealClock
from fleetvisor.drivers.base import Driver, load_driver
from fleetvisor.errors import DriverError
from fleetvisor.model.specs import InstanceSpec

log = logging.getLogger("fleetvisor.agent")


class AgentRuntime:
    def __init__(
        self,
        *,
        name: str,
        controller_url: str,
        token: str,
        driver: Driver,
        state_dir: Path,
        cluster: str = "default",
        labels: dict[str, str] | None = None,
        listen: str = "127.0.0.1",
        port: int = 0,
        advertise: str | None = None,
        clock: Clock | None = None,
        images: HostImageCache | None = None,
        destroy_on_exit: bool = False,
        measured_boot: MeasuredBoot | None = None,
    ) -> None:
        self.name = name
        self.measured_boot = measured_boot  # answers attestation challenges (agent/boot.py)
        # A throwaway local fleet removes its instances when it stops; a real host's
        # instances outlive its agent.
        self.destroy_on_exit = destroy_on_exit
        self.images = images
        # A host that runs real images fills its cache before it takes instances.
        self.ready = images is None
        self.cluster = cluster
        self.labels = labels or {}
        self.clock = clock or RealClock()
        self.agent = Agent(
            driver, self.clock, images, state_dir=state_dir, service_host=advertise or listen
        )
        # A carve or fold is told to the controller at once, not at the next heartbeat.
        self._heartbeat_now = asyncio.Event()
        self.agent.scaling.on_notice = self._heartbeat_now.set
        self.agent.health.on_detection = self._heartbeat_now.set
        self.state_dir = state_dir
        self.controller = FleetClient(controller_url, token)
        self.host_client: FleetClient | None = None
        self.agent_token = _load_or_create_secret(state_dir / "agent.token")
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP;
        # without it a response written as headers + body waits ~40 ms for a delayed ACK.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((listen, port))
        self.url = f"http://{advertise or listen}:{self.sock.getsockname()[1]}"
        self.heartbeat_interval = 2.0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        await self.agent.scaling.restore()
        await self.agent.watch_existing()
        app = create_agent_app(self.agent, self.agent_token)
        app.state.measured_boot = self.measured_boot
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        serving = asyncio.create_task(server.serve(sockets=[self.sock]))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        work = asyncio.create_task(self._register_then_heartbeat())
        # uvicorn handles SIGTERM/SIGINT itself while serving, then ends `serving`.
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({serving, stopping, work}, return_when=asyncio.FIRST_COMPLETED)
            if work.done() and work.exception():
                raise work.exception()  # type: ignore[misc]
        finally:
            work.cancel()
            stopping.cancel()
            server.should_exit = True
            await serving
            await self.agent.scaling.close()
            await self.agent.health.close()
            if self.destroy_on_exit:
                for report in await self.agent.list():
                    log.info("removing %s as this agent exits", report.name)
                    await self.agent.destroy(report.id)
            await self.agent.driver.close()
            if self.images is not None:
                self.images.close()
            self.controller.close()
            if self.host_client:
                self.host_client.close()
            if self.measured_boot is not None:
                self.measured_boot.close()
            log.info("agent %s stopped", self.name)

    async def _register_then_heartbeat(self) -> None:
        await self._register_until_done()
        heartbeats = asyncio.create_task(self._heartbeat_loop())  # alive while preparing
        try:
            if not self.ready:
                await self.prepopulate()
                self.ready = True
                await self.heartbeat()
            await heartbeats
        finally:
            heartbeats.cancel()

    async def prepopulate(self) -> None:
        """Fill the image cache with the controller's plan, then count as ready."""
        assert self.images is not None and self.host_client is not None
        plan = await asyncio.to_thread(self.host_client.cache_plan, self.images.budget_bytes)
        result = await self.images.prepopulate(plan)
        log.info(
            "image cache prepopulated: %d image(s), %d layer(s), %d bytes pulled in %.2fs%s",
            result.images,
            result.layers,
            result.bytes_pulled,
            result.seconds,
            f"; failed: {', '.join(result.failed)}" if result.failed else "",
        )

    async def _register_until_done(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                await self.register()
                return
            except ApiError as exc:
                if 400 <= exc.status < 500:
                    raise SystemExit(f"registration refused: {exc.detail}") from exc
                log.warning("registration failed (%s); retrying in %.1fs", exc, delay)
            await self.clock.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def register(self) -> None:
        info = self.agent.driver.host_info()
        reports = await self.agent.list()
        body: dict[str, Any] = {
            "name": self.name,
            "cluster": self.cluster,
            "agent_url": self.url,
            "agent_token": self.agent_token,
            "info": info.model_dump(),
            "labels": self.labels,
            "instances": [r.model_dump() for r in reports],
            "ready": self.ready,
        }
        if self.images is not None:
            body["cache"] = self.images.report().model_dump()
        answer = await asyncio.to_thread(self.controller.register_host, body)
        if self.host_client:
            self.host_client.close()
        self.host_client = FleetClient(self.controller.url, answer["token"])
        if self.images is not None:
            self.images.connect(self.controller.url, answer["token"])
        self.heartbeat_interval = float(answer["heartbeat_interval"])
        await self._destroy(answer.get("destroy", []))
        log.info("registered as %s at %s (%d instances)", self.name, self.url, len(reports))

    async def heartbeat(self) -> None:
        assert self.host_client is not None
        # Notices first: a sibling they announce is then in the reports too.
        notices = self.agent.scaling.take_notices()
        detections = self.agent.take_detections()
        reports = await self.agent.list()
        body = {
            "metrics": await self.agent.host_metrics(),
            "instances": [r.model_dump() for r in reports],
            "ready": self.ready,
            "scaling_events": [n.model_dump() for n in notices],
            "detections": [d.model_dump() for d in detections],
        }
        if self.images is not None:
            body["cache"] = (await asyncio.to_thread(self.images.report)).model_dump()
        try:
            answer = await asyncio.to_thread(self.host_client.heartbeat, self.name, body)
        except BaseException:
            self.agent.scaling.give_back(notices)
            self.agent.health.requeue(detections)
            raise
        self.heartbeat_interval = float(answer["heartbeat_interval"])
        await self._destroy(answer.get("destroy", []))
        for item in answer.get("scaling", []):  # policies the controller holds and we lack
            await self.agent.scaling.set_policy(InstanceSpec.model_validate(item))

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._sleep_or_wake(self.heartbeat_interval)
            try:
                await self.heartbeat()
            except ApiError as exc:
                if exc.status in (401, 403, 404):
                    log.warning("controller no longer knows this host (%s); registering again", exc)
                    await self._register_until_done()
                else:
                    log.warning("heartbeat failed: %s", exc)

    async def _sleep_or_wake(self, seconds: float) -> None:
        """Sleep for `seconds`, or less when there is news for the controller."""
        sleeping = asyncio.ensure_future(self.clock.sleep(seconds))
        woken = asyncio.ensure_future(self._heartbeat_now.wait())
        try:
            await asyncio.wait({sleeping, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            woken.cancel()
        self._heartbeat_now.clear()

    async def _destroy(self, instance_ids: list[str]) -> None:
        for instance_id in instance_ids:
            log.info("removing %s: the fleet does not know it", instance_id)
            await self.agent.destroy(instance_id)


def remove_instances(driver: Driver, images: HostImageCache | None) -> int:
    """Destroy every instance the driver has (a throwaway fleet's host whose agent died)."""

    async def remove() -> int:
        agent = Agent(driver, images=images)
        reports = await agent.list()
        for report in reports:
            log.info("removing %s", report.name)
            await agent.destroy(report.id)
        await driver.close()
        return len(reports)

    return asyncio.run(remove())


def _load_or_create_secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = "fvg_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return secret


def run_agent(
    *,
    name: str,
    controller_url: str,
    token: str,
    driver_kind: str,
    state_dir: Path,
    driver_options: dict[str, str],
    cluster: str,
    labels: dict[str, str],
    listen: str,
    port: int,
    cache_dir: Path,
    cache_budget: int,
    destroy_on_exit: bool = False,
    remove_and_exit: bool = False,
    measured_boot: BootOptions | None = None,
) -> None:
    clock = RealClock()
    measured = None  # before the driver starts: its binaries are measured first
    if measured_boot is not None and not remove_and_exit:
        measured = boot_or_exit(
            measured_boot,
            name=name,
            controller_url=controller_url,
            token=token,
            state_dir=state_dir,
        )
    images = None
    if driver_kind != "sim":  # real drivers run real images from the host's cache
        images = HostImageCache(cache_dir, clock, budget_bytes=cache_budget)
    try:
        driver = load_driver(
            driver_kind, clock=clock, state_dir=state_dir, options=driver_options, rootfs=images
        )
    except DriverError as exc:  # e.g. a prerequisite is missing: say what to install
        raise SystemExit(f"agent {name}: cannot start the {driver_kind} driver: {exc}") from None
    if remove_and_exit:
        log.info("agent %s removed %d instance(s)", name, remove_instances(driver, images))
        return
    runtime = AgentRuntime(
        name=name,
        controller_url=controller_url,
        token=token,
        driver=driver,
        state_dir=state_dir,
        cluster=cluster,
        labels=labels,
        listen=listen,
        port=port,
        clock=clock,
        images=images,
        destroy_on_exit=destroy_on_exit,
        measured_boot=measured,
    )
    asyncio.run(runtime.run())
