"""The service endpoint of an instance and its siblings: a small TCP balancer on the host.

    client ──► host ip:port (this balancer) ──► least-active member ip:service_port
                                               (parent, or a sibling once it answers)

Why a balancer rather than SO_REUSEPORT: every instance has its own network namespace
(a sibling must not share its parent's), and a reuseport group drops the connections
queued on a listener that closes, while a balancer can drain a sibling before it is
folded: no new connections go to it, and it is stopped only when its last one ends.
Connections are spread least-active-first, which suits one-worker services best.
A member that refuses a connection is skipped for that connection, so a client sees
an error only when no member answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

log = logging.getLogger("fleetvisor.agent.scaling")

CONNECT_TIMEOUT = 2.0
CHUNK = 64 * 1024


@dataclass
class Backend:
    name: str
    host: str
    port: int
    active: int = 0
    draining: bool = False
    connections: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class ServiceBalancer:
    def __init__(self, host: str, port: int = 0) -> None:
        self.host = host
        self.port = port
        self.backends: dict[str, Backend] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, reuse_address=True, backlog=4096
            )
        except OSError:
            if not self.port:
                raise
            # The remembered port is taken (another process got it meanwhile): take any.
            self._server = await asyncio.start_server(
                self._serve, self.host, 0, reuse_address=True, backlog=4096
            )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()

    def add(self, name: str, host: str, port: int) -> Backend:
        backend = self.backends.get(name)
        if backend is None or (backend.host, backend.port) != (host, port):
            backend = Backend(name, host, port)
            backend.idle.set()
            self.backends[name] = backend
        backend.draining = False
        return backend

    async def drain(self, name: str, timeout: float = 30.0) -> bool:
        """Send nothing new to `name`, wait for its connections to end, then drop it.
        True when it drained; False when connections were still open at the timeout."""
        backend = self.backends.get(name)
        if backend is None:
            return True
        backend.draining = True
        try:
            await asyncio.wait_for(backend.idle.wait(), timeout)
            drained = True
        except TimeoutError:
            drained = False
        self.backends.pop(name, None)
        return drained

    def _choose(self, tried: set[str]) -> Backend | None:
        candidates = [b for b in self.backends.values() if not b.draining and b.name not in tried]
        return min(candidates, key=lambda b: (b.active, b.connections), default=None)

    async def _serve(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        tried: set[str] = set()
        try:
            while True:
                backend = self._choose(tried)
                if backend is None:
                    return  # no member answers: the client sees the connection close
                tried.add(backend.name)
                backend.active += 1
                backend.connections += 1
                backend.idle.clear()
                try:
                    try:
                        reader, writer = await asyncio.wait_for(
                            asyncio.open_connection(backend.host, backend.port), CONNECT_TIMEOUT
                        )
                    except (OSError, TimeoutError) as exc:
                        log.debug("member %s refused a connection: %s", backend.name, exc)
                        continue
                    await self._relay(client_reader, client, reader, writer, backend)
                    return
                finally:
                    backend.active -= 1
                    if backend.active == 0:
                        backend.idle.set()
        finally:
            with contextlib.suppress(Exception):
                client.close()
            if task is not None:
                self._tasks.discard(task)

    async def _relay(
        self,
        client_reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        backend: Backend,
    ) -> None:
        async def upstream() -> None:
            with contextlib.suppress(OSError):
                while data := await client_reader.read(CHUNK):
                    writer.write(data)
                    await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()

        async def downstream() -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(CHUNK):
                    client.write(data)
                    await client.drain()

        up = asyncio.create_task(upstream())
        try:
            await downstream()  # the member's answer ending ends the exchange
        finally:
            up.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await up
            with contextlib.suppress(Exception):
                writer.close()
