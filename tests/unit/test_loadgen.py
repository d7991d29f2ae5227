"""The open-loop load generator: its schedule, its summary, and run_load against tiny
in-process asyncio HTTP servers (answering, refusing, dropping, failing, hanging)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import numpy as np
import pytest

from fleetvisor.bench.loadgen import (
    Phase,
    RequestRecord,
    _parse_response,
    arrival_times,
    first_response_from,
    main,
    run_load,
    summarize,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    """An asyncio server on a free loopback port running `handler` per connection."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: not the server's failure
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def answering(name: str, seen: list[bytes] | None = None, status: str = "200 OK") -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if seen is not None:
            seen.append(head.split(b"\r\n", 1)[0])
        body = b"hello\n"
        writer.write(
            f"HTTP/1.0 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
            f"X-Served-By: {name}\r\n\r\n".encode()
            + body
        )
        await writer.drain()

    return handle


def raw(response: bytes) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()

    return handle


def free_closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- schedule


def test_arrival_times_are_seeded_poisson_within_their_phases() -> None:
    phases = [Phase("a", 10.0, 500.0), Phase("idle", 2.0, 0.0), Phase("b", 10.0, 100.0)]
    schedule = arrival_times(phases, seed=3)
    assert schedule == arrival_times(phases, seed=3)
    assert schedule != arrival_times(phases, seed=4)
    times = [t for _, t in schedule]
    assert times == sorted(times)
    a = [t for name, t in schedule if name == "a"]
    b = [t for name, t in schedule if name == "b"]
    assert all(0 <= t < 10 for t in a) and all(12 <= t < 22 for t in b)
    assert not [name for name, _ in schedule if name == "idle"]
    assert 4700 < len(a) < 5300 and 900 < len(b) < 1100  # ~5 sigma
    gaps = np.diff(a)
    assert 0.0018 < gaps.mean() < 0.0022 and abs(gaps.std() / gaps.mean() - 1) < 0.1


def test_phase_rejects_nonsense() -> None:
    for bad in [("x", 0.0, 1.0), ("x", 1.0, -1.0), ("", 1.0, 1.0)]:
        with pytest.raises(ValueError):
            Phase(*bad)


# --------------------------------------------------------------------------- summary


def record(
    phase: str, at: float, latency: float, who: str | None = "a", error: str | None = None
) -> RequestRecord:
    status = None if error in ("refused", "timeout") else 200
    return RequestRecord(phase, at, latency, status, who, error)


def test_summarize_hand_made_records() -> None:
    latencies = [0.010 * i for i in range(1, 11)]  # 10..100 ms
    records = [record("low", float(i), lat) for i, lat in enumerate(latencies)]
    records[9].served_by = "b"
    records += [
        record("low", 20.0, 5.0, "a", "status 503"),
        record("low", 21.0, 10.0, None, "timeout"),
        RequestRecord("low", 22.0, None, None, None, "overload"),
        record("high", 30.0, 2.0, None, "refused"),
    ]
    phases = [Phase("low", 5.0, 2.0), Phase("high", 4.0, 1.0), Phase("empty", 1.0, 0.0)]
    summary = summarize(records, phases)
    assert list(summary) == ["low", "high", "empty"]
    low = summary["low"]
    expected = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    assert low["requests"] == 13 and low["ok"] == 10 and low["errors"] == 3
    assert low["throughput_rps"] == pytest.approx(2.0)
    assert [low["p50_ms"], low["p95_ms"], low["p99_ms"]] == pytest.approx(list(expected))
    assert low["p50_ms"] == pytest.approx(55.0)
    assert low["served_by"] == {"a": 9, "b": 1}  # errors are not "served"
    assert low["error_kinds"] == {"status 503": 1, "timeout": 1, "overload": 1}
    high = summary["high"]
    assert (high["requests"], high["ok"], high["errors"], high["throughput_rps"]) == (1, 0, 1, 0)
    assert high["p50_ms"] is None and high["p95_ms"] is None and high["p99_ms"] is None
    assert summary["empty"]["requests"] == 0 and summary["empty"]["served_by"] == {}
    json.dumps(summary)  # plain JSON types only (no numpy scalars)


def test_first_response_from() -> None:
    records = [
        record("p", 1.0, 0.5, "parent"),  # done 1.5
        record("p", 2.0, 3.0, "sibling-1"),  # done 5.0
        record("p", 3.0, 1.0, "sibling-1"),  # done 4.0: the earliest sibling answer
        record("p", 0.5, 0.1, "sibling-1", "status 500"),  # not ok
        RequestRecord("p", 0.1, None, None, None, "overload"),
    ]
    assert first_response_from(records, lambda who: who.startswith("sibling")) == 4.0
    assert first_response_from(records, lambda who: who == "parent") == 1.5
    assert first_response_from(records, lambda who: who == "nobody") is None
    assert first_response_from([], lambda who: True) is None


def test_parse_response() -> None:
    ok = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nX-Served-By: w\r\n\r\nhi"
    assert _parse_response(ok) == (200, "w", None)
    assert _parse_response(b"HTTP/1.1 204 No Content\n\n") == (204, None, None)
    assert _parse_response(b"HTTP/1.0 404 Not Found\r\nx-served-by: w\r\n\r\n") == (
        404,
        "w",
        "status 404",
    )
    assert _parse_response(b"")[2] == "short response"
    assert _parse_response(b"HTTP/1.0 200 OK\r\nContent-Le")[2] == "short response"
    assert _parse_response(ok[:-1])[2] == "short response"  # body under Content-Length
    assert _parse_response(b"SSH-2.0-OpenSSH\r\n")[2] == "garbled response"
    assert _parse_response(b"HTTP/1.0 2xx OK\r\n\r\n")[2] == "garbled response"
    assert _parse_response(b"HTTP/1.0 200 OK\r\nno colon\r\n\r\n")[2] == "garbled response"


# --------------------------------------------------------------------------- run_load


async def test_run_load_counts_every_scheduled_request() -> None:
    phases = [Phase("warm", 0.5, 40.0), Phase("hot", 0.5, 80.0)]
    seen: list[bytes] = []
    async with serving(answering("alpha", seen)) as port:
        records = await run_load("127.0.0.1", port, phases, path="/work?x=1", seed=7)
    schedule = arrival_times(phases, seed=7)
    assert len(records) == len(schedule) > 20
    assert [r.phase for r in records] == [name for name, _ in schedule]
    assert all(r.error is None and r.status == 200 and r.served_by == "alpha" for r in records)
    assert all(r.latency_s is not None and r.latency_s > 0 for r in records)
    assert set(seen) == {b"GET /work?x=1 HTTP/1.0"} and len(seen) == len(records)
    summary = summarize(records, phases)
    for name in ("warm", "hot"):
        count = sum(1 for phase, _ in schedule if phase == name)
        assert summary[name]["requests"] == summary[name]["ok"] == count
        assert summary[name]["served_by"] == {"alpha": count}
        assert summary[name]["p50_ms"] is not None


async def test_run_load_refused() -> None:
    port = free_closed_port()
    records = await run_load("127.0.0.1", port, [Phase("p", 0.3, 30.0)], timeout=2.0)
    assert records and {r.error for r in records} == {"refused"}
    assert all(r.status is None and r.served_by is None for r in records)


async def test_run_load_server_that_drops_connections() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()  # RST, or EOF before any answer

    async with serving(drop) as port:
        records = await run_load("127.0.0.1", port, [Phase("p", 0.3, 30.0)], timeout=2.0)
    assert records and {r.error for r in records} <= {"reset", "short response"}
    assert all(r.status is None for r in records)


@pytest.mark.parametrize(
    ("handler", "error", "status", "served_by"),
    [
        (answering("beta", status="503 Service Unavailable"), "status 503", 503, "beta"),
        (raw(b"HELLO THERE\r\n\r\n"), "garbled response", None, None),
        (
            raw(b"HTTP/1.0 200 OK\r\nContent-Length: 100\r\nX-Served-By: c\r\n\r\nshort"),
            "short response",
            200,
            "c",
        ),
    ],
)
async def test_run_load_bad_answers(
    handler: Handler, error: str, status: int | None, served_by: str | None
) -> None:
    async with serving(handler) as port:
        records = await run_load("127.0.0.1", port, [Phase("p", 0.3, 20.0)], timeout=2.0)
    assert records
    assert {(r.error, r.status, r.served_by) for r in records} == {(error, status, served_by)}
    assert summarize(records, [Phase("p", 0.3, 20.0)])["p"]["ok"] == 0


async def test_run_load_timeout_and_in_flight_cap() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up

    phases = [Phase("p", 0.5, 100.0)]
    async with serving(hang) as port:
        records = await run_load("127.0.0.1", port, phases, timeout=0.3, max_in_flight=3)
    assert len(records) == len(arrival_times(phases))
    errors = [r.error for r in records]
    assert set(errors) == {"timeout", "overload"}
    assert errors.count("timeout") >= 3
    for r in records:
        if r.error == "overload":
            assert r.latency_s is None and r.status is None
        else:
            assert r.latency_s is not None and r.latency_s >= 0.3


def test_main_json_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_closed_port()
    assert main(["--target", f"127.0.0.1:{port}", "--phase", "a:0.2:30", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["a"]["ok"] == 0 and summary["a"]["errors"] == summary["a"]["requests"]
    assert main(["--target", f"localhost:{port}", "--phase", "a:0.1:10"]) == 0
    assert capsys.readouterr().out.startswith("PHASE")
    for bad in (
        ["--target", "nohost", "--phase", "a:1:1"],
        ["--target", "h:1", "--phase", "a:1"],
        ["--target", "h:1", "--phase", "a:1:1", "--phase", "a:1:2"],
        ["--target", "h:1", "--phase", "a:1:1", "--path", "x"],
    ):
        with pytest.raises(SystemExit):
            main(bad)
