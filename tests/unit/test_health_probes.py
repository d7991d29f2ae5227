"""Probes against real sockets on 127.0.0.1 (HTTP and TCP), exec through a stand-in
driver, and the thresholds that turn results into a status."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from fleetvisor.agent.health.probes import (
    ProbeResult,
    ProbeStatus,
    describe,
    exec_probe,
    http_probe,
    run_probe,
    tcp_probe,
)
from fleetvisor.errors import DriverError
from fleetvisor.model.health import Probe

HOST = "127.0.0.1"


@contextlib.asynccontextmanager
async def http_server(status_by_path: dict[str, int]) -> AsyncIterator[int]:
    """A tiny HTTP/1.0 server; answers `status_by_path[path]` (404 elsewhere); /hang never
    answers."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readline()
            if not request:  # a TCP probe: connected and closed
                return
            path = request.split()[1].decode()
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            if path == "/hang":
                await reader.read()  # until the client gives up
                return
            code = status_by_path.get(path, 404)
            writer.write(f"HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def test_http_probe_counts_2xx_and_3xx_as_success() -> None:
    async with http_server({"/ok": 200, "/moved": 302, "/broken": 503}) as port:
        assert (await http_probe(HOST, port, "/ok", 1.0)).ok
        assert (await http_probe(HOST, port, "/moved", 1.0)).ok
        broken = await http_probe(HOST, port, "/broken", 1.0)
        assert not broken.ok and broken.message == "HTTP 503"
        missing = await http_probe(HOST, port, "/nothing", 1.0)
        assert not missing.ok and missing.message == "HTTP 404"
        hung = await http_probe(HOST, port, "/hang", 0.3)
        assert not hung.ok and "no answer within 0.3 s" in hung.message
        assert hung.duration_s == pytest.approx(0.3, abs=0.2)
    refused = await http_probe(HOST, closed_port(), "/", 1.0)
    assert not refused.ok and "refused" in refused.message


async def test_tcp_probe_connects_or_says_why_not() -> None:
    async with http_server({}) as port:
        assert (await tcp_probe(HOST, port, 1.0)).ok
    refused = await tcp_probe(HOST, closed_port(), 1.0)
    assert not refused.ok and "refused" in refused.message


async def test_exec_probe_uses_the_exit_code_and_survives_driver_errors() -> None:
    async def exec_fn(instance: str, argv: list[str], timeout: float) -> tuple[int, str]:
        if argv[0] == "boom":
            raise DriverError("instance i is not running: nothing to exec in")
        return (0, "") if argv[0] == "true" else (1, "no such file\n/tmp/healthy\n")

    assert (await exec_probe(exec_fn, "i", ["true"], 1.0)).ok
    failed = await exec_probe(exec_fn, "i", ["cat", "/tmp/healthy"], 1.0)
    assert not failed.ok and failed.message == "exit code 1: no such file /tmp/healthy"
    broken = await exec_probe(exec_fn, "i", ["boom"], 1.0)
    assert not broken.ok and "not running" in broken.message


async def test_run_probe_says_when_a_probe_cannot_run_here() -> None:
    class NoExec:
        pass

    exec_probe_spec = Probe(kind="exec", command=["true"])
    assert await run_probe(exec_probe_spec, "i", "10.0.0.2", NoExec()) is None
    assert await run_probe(Probe(kind="tcp", port=80), "i", None, NoExec()) is None
    async with http_server({"/": 200}) as port:
        result = await run_probe(Probe(kind="http", port=port), "i", HOST, NoExec())
        assert result is not None and result.ok


def test_describe_names_the_target() -> None:
    assert describe(Probe(kind="exec", command=["cat", "/tmp/a b"])) == "exec cat '/tmp/a b'"
    assert describe(Probe(kind="http", port=8080, path="/healthz"), "198.18.0.5") == (
        "http://198.18.0.5:8080/healthz"
    )
    assert describe(Probe(kind="tcp", port=22), "198.18.0.5") == "tcp 198.18.0.5:22"


def test_thresholds_turn_results_into_a_status() -> None:
    status = ProbeStatus(Probe(kind="tcp", port=1, failure_threshold=3, success_threshold=2))
    ok, bad = ProbeResult(True, "", 0.0), ProbeResult(False, "refused", 0.0)
    assert status.record(bad) is None and status.record(bad) is None
    assert status.record(ok) is None  # a success breaks the run of failures
    assert [status.record(bad) for _ in range(3)] == [None, None, "failed"]
    assert status.record(bad) is None  # already failed: no new change
    assert status.last_message == "refused" and status.failures == 4
    assert status.record(ok) is None
    assert status.record(ok) == "ok"
    status.reset()
    assert (status.status, status.failures, status.successes) == ("unknown", 0, 0)
