"""An HTTP probe of a service: the round trip of one GET, in milliseconds."""

from __future__ import annotations

import asyncio
import contextlib
import time

PROBE_TIMEOUT = 2.0


async def http_probe_ms(host: str, port: int, path: str, timeout: float = PROBE_TIMEOUT) -> float:
    """Latency of `GET path` on a new connection; a failure or timeout counts as `timeout`
    (a service that does not answer is as slow as it gets)."""
    began = time.perf_counter()  # a duration on this machine, never simulated
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                await writer.drain()
                status = await reader.readline()
                await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return timeout * 1000
    parts = status.split(b" ")
    if not status.startswith(b"HTTP/") or len(parts) < 2 or not parts[1].startswith(b"2"):
        return timeout * 1000
    return (time.perf_counter() - began) * 1000
