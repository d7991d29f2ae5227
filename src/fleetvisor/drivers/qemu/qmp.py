"""QMP sessions over the instance's unix socket (`qemu.qmp`, asyncio).

A session per operation: nothing to keep alive across agent restarts, and QEMU takes
one QMP client at a time, so the driver holds a per-instance lock around each session.
After `quit` the connection drops (EOFError inside qemu.qmp): `quit()` expects that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient

from fleetvisor.clock import Clock
from fleetvisor.errors import DriverError

# qemu.qmp logs a dropped connection at error level; the driver reports its own errors.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
POLL_SECONDS = 0.02


class Session:
    """One connected QMP client; `run` raises DriverError with QEMU's own message."""

    def __init__(self, client: QMPClient, where: str) -> None:
        self.client = client
        self.where = where

    async def run(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        try:
            return await self.client.execute(command, arguments)
        except ExecuteError as exc:
            raise DriverError(f"QMP {command} on {self.where} failed: {exc}") from exc

    async def quit(self) -> None:
        """`quit`: QEMU exits at once and the socket closes under us (expected)."""
        with contextlib.suppress(EOFError, ConnectionError, ExecuteError):
            await self.client.execute("quit")

    async def wait_status(
        self, clock: Clock, wanted: set[str], timeout: float, what: str
    ) -> dict[str, Any]:
        """Poll `query-migrate` until its status is in `wanted`; DriverError on failure."""
        deadline = clock.monotonic() + timeout
        while True:
            info: dict[str, Any] = await self.run("query-migrate")
            status = info.get("status", "none")
            if status in wanted:
                return info
            if status in ("failed", "cancelled"):
                raise DriverError(
                    f"{what} on {self.where} {status}: {info.get('error-desc', 'no reason given')}"
                )
            if clock.monotonic() > deadline:
                with contextlib.suppress(DriverError):
                    await self.run("migrate_cancel")
                raise DriverError(f"{what} on {self.where} did not finish in {timeout:g} s")
            await clock.sleep(POLL_SECONDS)

    async def wait_job(self, clock: Clock, job: str, timeout: float) -> None:
        """Poll until block job `job` is gone; DriverError if it ended with an error."""
        deadline = clock.monotonic() + timeout
        while True:
            jobs: list[dict[str, Any]] = await self.run("query-jobs")
            mine = next((j for j in jobs if j.get("id") == job), None)
            if mine is None or mine.get("status") in ("concluded", "null"):
                if mine and mine.get("error"):
                    raise DriverError(f"block job {job} on {self.where} failed: {mine['error']}")
                if mine:
                    await self.run("job-dismiss", {"id": job})
                return
            if clock.monotonic() > deadline:
                raise DriverError(
                    f"block job {job} on {self.where} did not finish in {timeout:g} s"
                )
            await clock.sleep(POLL_SECONDS)


@contextlib.asynccontextmanager
async def session(socket: Path, clock: Clock, *, timeout: float = 10.0) -> AsyncIterator[Session]:
    """Connect to `socket` (retrying while QEMU creates it, up to `timeout`)."""
    client = QMPClient(socket.parent.name)
    deadline = clock.monotonic() + timeout
    while True:
        try:
            await client.connect(str(socket))
            break
        except (ConnectError, OSError) as exc:
            if clock.monotonic() > deadline:
                raise DriverError(f"no QMP on {socket} after {timeout:g} s: {exc}") from None
            await clock.sleep(POLL_SECONDS)
    try:
        yield Session(client, socket.parent.name)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 5)
