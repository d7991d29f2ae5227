"""Open-loop HTTP load generator: Poisson arrivals at a fixed rate per phase, one new TCP
connection per request, over raw asyncio sockets.

```
 phases [low: 10 s at 25/s, high: 10 s at 100/s] + seed
    │ arrival_times(): exponential gaps drawn from random.Random(seed), all before the
    │ run, so the same seed gives the same schedule whatever the server does
    v
 scheduler ── sleep until start + t_i (time.monotonic) ──> start request i ──> next i
    │   never waits for a response (open loop); in flight >= max_in_flight:
    │   no request, an "overload" record instead
    v
 request i (a task): connect ─> "GET path HTTP/1.0" ─> read to EOF ─> status, X-Served-By
    │   RequestRecord(sent_at = start + t_i, latency = end - sent_at)
    v
 run_load returns once every request ended (answer, error or timeout)
 summarize(): per phase: requests, ok, errors, throughput, p50/p95/p99, served_by
```

Why open loop: a closed-loop client (send, wait, send) slows down with the server and so
hides its queue. Here arrivals keep coming; a slow server builds a queue, and latency,
measured from the *scheduled* send time, includes the time spent in it (and any lateness
of this process's scheduler, so no late send is left out of the figure).

Errors (`RequestRecord.error`): "overload", "refused", "reset", "timeout",
"short response", "garbled response", "status NNN" (not 2xx), "oserror: ..." (e.g. no
local port or file descriptor left). Times are `time.monotonic()` seconds, so they can be
compared with events the caller timed on the same clock.

    python -m fleetvisor.bench.loadgen --target HOST:PORT --phase low:10:25 \\
        --phase high:10:100 [--path /] [--seed N] [--timeout S] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_RESPONSE = 1 << 20  # a bigger answer is not what a benchmark endpoint sends
DEFAULT_MAX_IN_FLIGHT = 2000


@dataclass(frozen=True)
class Phase:
    """`seconds` of Poisson arrivals at `rate` requests/second (0: an idle phase)."""

    name: str
    seconds: float
    rate: float

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a phase needs a name")
        if not self.seconds > 0:
            raise ValueError(f"phase {self.name!r}: seconds must be > 0, not {self.seconds}")
        if not self.rate >= 0:
            raise ValueError(f"phase {self.name!r}: rate must be >= 0, not {self.rate}")


@dataclass
class RequestRecord:
    """One request: `sent_at` is its scheduled time, `latency_s` until the response ended
    (None when it never started: overload); `error` None means a complete 2xx answer."""

    phase: str
    sent_at: float
    latency_s: float | None
    status: int | None
    served_by: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


class _ResponseTooLarge(Exception):
    pass


def arrival_times(phases: Sequence[Phase], seed: int = 1) -> list[tuple[str, float]]:
    """(phase name, seconds after the run's start) of every request, in order. Phases
    follow each other; a phase's arrivals stop at its end (memoryless, so restarting the
    draw at each phase boundary changes nothing)."""
    rng = random.Random(seed)
    schedule: list[tuple[str, float]] = []
    start = 0.0
    for phase in phases:
        end = start + phase.seconds
        if phase.rate > 0:
            at = start + rng.expovariate(phase.rate)
            while at < end:
                schedule.append((phase.name, at))
                at += rng.expovariate(phase.rate)
        start = end
    return schedule


def _parse_response(data: bytes) -> tuple[int | None, str | None, str | None]:
    """(status, X-Served-By, error) of a whole HTTP/1.x response read to EOF."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")  # a lenient server's bare LFs
    if not sep:  # cut before the end of the head, or not HTTP at all
        truncated = not data or b"HTTP/".startswith(data[:5]) or data.startswith(b"HTTP/")
        return None, None, "short response" if truncated else "garbled response"
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    match = re.fullmatch(rb"HTTP/\d\.\d (\d{3})(?: .*)?", lines[0])
    if match is None:
        return None, None, "garbled response"
    status = int(match.group(1))
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            return status, None, "garbled response"
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    served_by = headers.get("x-served-by")
    if "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            return status, served_by, "garbled response"
        if len(body) < length:
            return status, served_by, "short response"
    if not 200 <= status < 300:
        return status, served_by, f"status {status}"
    return status, served_by, None


async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await reader.read(65536):
        size += len(chunk)
        if size > MAX_RESPONSE:
            raise _ResponseTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def _fetch(
    host: str, port: int, request: bytes, phase: str, sent_at: float, timeout: float
) -> RequestRecord:
    writer: asyncio.StreamWriter | None = None
    status: int | None = None
    served_by: str | None = None
    clean = False
    try:
        # one deadline for connect + send + the whole answer: a queued request counts
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            await writer.drain()
            data = await _read_to_eof(reader)
        status, served_by, error = _parse_response(data)
        clean = True
    except TimeoutError:
        error = "timeout"
    except ConnectionRefusedError:
        error = "refused"
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        error = "reset"
    except _ResponseTooLarge:
        error = "garbled response"
    except OSError as exc:  # no local port, no file descriptor, no route...
        error = f"oserror: {exc.strerror or exc}"
    finally:
        if writer is not None:
            if clean:
                writer.close()  # the server closed first: a plain FIN back
            else:
                writer.transport.abort()  # do not linger on a broken or late connection
    return RequestRecord(phase, sent_at, time.monotonic() - sent_at, status, served_by, error)


def _check_request(phases: Sequence[Phase], path: str) -> None:
    names = [phase.name for phase in phases]
    if len(set(names)) != len(names):
        raise ValueError(f"phase names must be unique: {names}")
    if not path.startswith("/") or re.search(r"\s", path):
        raise ValueError(f"path {path!r} must start with / and hold no whitespace")


async def run_load(
    host: str,
    port: int,
    phases: Sequence[Phase],
    *,
    path: str = "/",
    timeout: float = 10.0,
    seed: int = 1,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
) -> list[RequestRecord]:
    """Send GET `path` to host:port on the Poisson schedule of `phases` and return one
    record per scheduled request, in sent_at order, once every request has ended."""
    _check_request(phases, path)
    request = (
        f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: fleetvisor-loadgen\r\n\r\n"
    ).encode()
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task[None]] = set()
    in_flight = 0

    async def one(phase: str, sent_at: float) -> None:
        nonlocal in_flight
        try:
            records.append(await _fetch(host, port, request, phase, sent_at, timeout))
        finally:
            in_flight -= 1

    start = time.monotonic()
    for phase, offset in arrival_times(phases, seed):
        sent_at = start + offset
        delay = sent_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        # behind schedule (a busy loop): send at once; the latency keeps the lateness
        if in_flight >= max_in_flight:
            records.append(RequestRecord(phase, sent_at, None, None, None, "overload"))
            continue
        in_flight += 1
        task = asyncio.create_task(one(phase, sent_at))
        tasks.add(task)  # a reference, so the task is not garbage collected mid-flight
        task.add_done_callback(tasks.discard)
    if tasks:  # the schedule is done: wait for the stragglers (each ends by its timeout)
        await asyncio.gather(*tasks)
    records.sort(key=lambda record: record.sent_at)
    return records


def summarize(
    records: Sequence[RequestRecord], phases: Sequence[Phase]
) -> dict[str, dict[str, Any]]:
    """Per phase (in order): requests, ok, errors, throughput_rps (ok / phase seconds),
    p50/p95/p99_ms of ok requests (None without any), served_by {name: ok count} and
    error_kinds {error: count}."""
    summary: dict[str, dict[str, Any]] = {}
    for phase in phases:
        mine = [r for r in records if r.phase == phase.name]
        ok = [r for r in mine if r.error is None]
        latencies_ms = np.array([r.latency_s for r in ok if r.latency_s is not None]) * 1000.0
        percentiles: list[float | None] = [None, None, None]
        if latencies_ms.size:
            percentiles = [
                round(float(v), 3) for v in np.percentile(latencies_ms, [50.0, 95.0, 99.0])
            ]
        p50, p95, p99 = percentiles
        served = Counter(r.served_by or "?" for r in ok)
        errors = Counter(r.error for r in mine if r.error is not None)
        summary[phase.name] = {
            "requests": len(mine),
            "ok": len(ok),
            "errors": len(mine) - len(ok),
            "throughput_rps": round(len(ok) / phase.seconds, 3),
            "p50_ms": p50,
            "p95_ms": p95,
            "p99_ms": p99,
            "served_by": dict(sorted(served.items())),
            "error_kinds": dict(errors.most_common()),
        }
    return summary


def first_response_from(
    records: Sequence[RequestRecord], predicate: Callable[[str], bool]
) -> float | None:
    """The earliest completion time (sent_at + latency) of an ok response whose
    X-Served-By satisfies `predicate`, e.g. the first answer of a new sibling; or None."""
    return min(
        (
            r.sent_at + r.latency_s
            for r in records
            if r.error is None
            and r.latency_s is not None
            and r.served_by is not None
            and predicate(r.served_by)
        ),
        default=None,
    )


# --------------------------------------------------------------------------- command line


def _parse_target(text: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\s]+):(\d+)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give HOST:PORT, e.g. 127.0.0.1:8080")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: port {port} is out of range")
    return host, port


def _parse_phase(text: str) -> Phase:
    name, _, rest = text.partition(":")
    seconds, _, rate = rest.partition(":")
    try:
        return Phase(name, float(seconds), float(rate))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give NAME:SECONDS:RATE, e.g. low:10:25 ({exc})"
        ) from None


def _raise_fd_limit(wanted: int) -> None:
    """Each request in flight holds a socket: lift the soft descriptor limit if needed."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _table(summary: dict[str, dict[str, Any]]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    rows = [("PHASE", "REQ", "OK", "ERR", "OK/S", "P50MS", "P95MS", "P99MS", "SERVED_BY")]
    for name, s in summary.items():
        served = " ".join(f"{k}={v}" for k, v in s["served_by"].items()) or "-"
        rows.append(
            (
                name,
                str(s["requests"]),
                str(s["ok"]),
                str(s["errors"]),
                f"{s['throughput_rps']:.1f}",
                ms(s["p50_ms"]),
                ms(s["p95_ms"]),
                ms(s["p99_ms"]),
                served,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) for row in rows]
    lines = [f"{line}  {row[-1]}" for line, row in zip(lines, rows, strict=True)]
    for name, s in summary.items():
        if s["error_kinds"]:
            kinds = ", ".join(f"{k}: {v}" for k, v in s["error_kinds"].items())
            lines.append(f"{name} errors: {kinds}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleetvisor.bench.loadgen",
        description="Open-loop HTTP load: Poisson arrivals per phase, one connection each.",
    )
    parser.add_argument("--target", required=True, type=_parse_target, help="HOST:PORT")
    parser.add_argument(
        "--phase",
        dest="phases",
        action="append",
        required=True,
        type=_parse_phase,
        help="NAME:SECONDS:RATE (requests/s), repeatable, run in order",
    )
    parser.add_argument("--path", default="/", help="request path [/]")
    parser.add_argument("--seed", type=int, default=1, help="arrival schedule seed [1]")
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, s [10]")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=DEFAULT_MAX_IN_FLIGHT,
        help=f"requests open at once; beyond: an 'overload' error [{DEFAULT_MAX_IN_FLIGHT}]",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    host, port = args.target
    try:
        _check_request(args.phases, args.path)
    except ValueError as exc:
        parser.error(str(exc))
    _raise_fd_limit(args.max_in_flight + 256)
    records = asyncio.run(
        run_load(
            host,
            port,
            args.phases,
            path=args.path,
            timeout=args.timeout,
            seed=args.seed,
            max_in_flight=args.max_in_flight,
        )
    )
    summary = summarize(records, args.phases)
    print(json.dumps(summary, indent=2) if args.json else _table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
