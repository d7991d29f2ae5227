"""Probes: checks the host runs against an instance, like Kubernetes probes.

    exec   driver.exec(instance, argv, timeout) -> (exit code, output); 0 = success
    http   GET http://<address>:<port><path> on a new connection; 2xx/3xx = success
    tcp    a TCP connection to <address>:<port> is accepted = success

`address` is the instance's own IP (`InstanceReport.address`: inside its network
namespace, reachable from the host over the agent's bridge).

`ProbeStatus` applies a probe's thresholds to its results: "unknown" until decided,
"failed" after `failure_threshold` failures in a row, "ok" again after
`success_threshold` successes in a row.

Timeouts of HTTP and TCP probes are real time (network I/O cannot run on a simulated
clock); an exec probe passes its timeout to the driver, which waits on its own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fleetvisor.model.health import Probe

ExecFn = Callable[[str, list[str], float], Awaitable[tuple[int, str]]]
OUTPUT_SHOWN = 200  # characters of an exec probe's output kept in a message
MAX_HEADER = 8192


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    message: str  # why it failed ("" on success, or a short note)
    duration_s: float  # real seconds the probe took


def describe(probe: Probe, address: str | None = None) -> str:
    """The probe's target, for messages and evidence: `exec cat /tmp/ok`, `tcp 10.0.0.2:80`."""
    where = address or "<no address>"
    if probe.kind == "exec":
        return f"exec {shlex.join(probe.command)}"[:200]
    if probe.kind == "http":
        return f"http://{where}:{probe.port}{probe.path}"[:200]
    return f"tcp {where}:{probe.port}"


async def exec_probe(
    exec_fn: ExecFn, instance_id: str, command: list[str], timeout: float
) -> ProbeResult:
    began = time.perf_counter()  # a duration on this machine, never simulated
    try:
        code, output = await exec_fn(instance_id, list(command), timeout)
    except Exception as exc:  # the driver could not run it (timeout, not running, ...)
        return ProbeResult(False, f"exec failed: {exc}"[:500], time.perf_counter() - began)
    took = time.perf_counter() - began
    if code == 0:
        return ProbeResult(True, "", took)
    shown = " ".join(output.split())[-OUTPUT_SHOWN:]
    return ProbeResult(False, f"exit code {code}" + (f": {shown}" if shown else ""), took)


async def http_probe(address: str, port: int, path: str, timeout: float) -> ProbeResult:
    began = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address, port)
            try:
                writer.write(
                    f"GET {path} HTTP/1.0\r\nHost: {address}:{port}\r\n"
                    "User-Agent: fleetvisor-probe\r\nConnection: close\r\n\r\n".encode()
                )
                await writer.drain()
                status = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except TimeoutError:
        return ProbeResult(False, f"no answer within {timeout:g} s", time.perf_counter() - began)
    except OSError as exc:
        return ProbeResult(False, _os_error(exc), time.perf_counter() - began)
    took = time.perf_counter() - began
    parts = status[:MAX_HEADER].decode("latin-1").split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return ProbeResult(False, f"not an HTTP answer: {status[:80]!r}", took)
    code = int(parts[1])
    if 200 <= code < 400:
        return ProbeResult(True, "", took)
    return ProbeResult(False, f"HTTP {code}", took)


async def tcp_probe(address: str, port: int, timeout: float) -> ProbeResult:
    began = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(address, port)
    except TimeoutError:
        return ProbeResult(
            False, f"no connection within {timeout:g} s", time.perf_counter() - began
        )
    except OSError as exc:
        return ProbeResult(False, _os_error(exc), time.perf_counter() - began)
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return ProbeResult(True, "", time.perf_counter() - began)


def _os_error(exc: OSError) -> str:
    """ "connection refused", "no route to host", ... (asyncio's own text names no cause)."""
    text = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
    return text.lower()[:200]


async def run_probe(
    probe: Probe, instance_id: str, address: str | None, driver: Any
) -> ProbeResult | None:
    """Run the probe once; None when it cannot run here (no exec in the driver, no address)."""
    if probe.kind == "exec":
        exec_fn = getattr(driver, "exec", None)
        if exec_fn is None:
            return None
        return await exec_probe(exec_fn, instance_id, probe.command, probe.timeout_s)
    if address is None or probe.port is None:
        return None
    if probe.kind == "http":
        return await http_probe(address, probe.port, probe.path, probe.timeout_s)
    return await tcp_probe(address, probe.port, probe.timeout_s)


Status = Literal["unknown", "ok", "failed"]


@dataclass
class ProbeStatus:
    """A probe's thresholds over its results."""

    probe: Probe
    status: Status = "unknown"
    failures: int = 0  # in a row
    successes: int = 0  # in a row
    last_message: str = ""
    runs: int = 0

    def record(self, result: ProbeResult) -> Status | None:
        """Count one result; the new status when it changed, else None."""
        self.runs += 1
        if result.ok:
            self.successes += 1
            self.failures = 0
            if self.status != "ok" and self.successes >= self.probe.success_threshold:
                self.status = "ok"
                return "ok"
            return None
        self.last_message = result.message
        self.failures += 1
        self.successes = 0
        if self.status != "failed" and self.failures >= self.probe.failure_threshold:
            self.status = "failed"
            return "failed"
        return None

    def reset(self) -> None:
        """The instance restarted: its probes start over (initial delay, thresholds)."""
        self.status = "unknown"
        self.failures = self.successes = 0
        self.last_message = ""
