"""The floor of live migration: plain CRIU dump + restore of a bare host process.

`raw_criu_roundtrip` runs the memcounter workload (workloads/memcounter.c) directly on
the host, in its own session, holding `mem_mb` MiB of random data; dumps it with
`criu dump` (which kills it), restores it detached with `criu restore -d` and checks
that its in-memory counter continues. No runc, no container, no network, no copy to
another host: what the product's checkpoint/restore and live migration cost beyond
these figures is overhead a benchmark can attribute.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from fleetvisor.drivers.runc import criu as criu_tools
from fleetvisor.drivers.runc.criu import CriuInfo
from fleetvisor.errors import DriverError

POLL_SECONDS = 0.02
_COUNTER = re.compile(rb"^counter (\d+)$", re.MULTILINE)


async def raw_criu_roundtrip(
    criu: CriuInfo,
    mem_mb: int,
    workdir: Path,
    *,
    binary: Path | None = None,
    tick_ms: int = 50,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Dump and restore a `mem_mb` memcounter process with bare CRIU; returns
    {"dump_s", "restore_s", "total_ms", "image_bytes", "counter_at_dump",
    "counter_after_restore"}. `binary`: the static memcounter (default: compiled and
    cached by fleetvisor.images.build). Everything lives in a fresh directory under
    `workdir`, removed afterwards; the processes are killed by PID whatever happens.
    Raises DriverError when a step fails or the counter does not continue."""
    if binary is None:
        from fleetvisor.images.build import compile_memcounter

        binary = await asyncio.to_thread(compile_memcounter)
    # the restored process is re-parented to us, so we can reap it when we kill it
    criu_tools.set_child_subreaper()
    run_dir = Path(workdir) / f"fv-criu-floor-{secrets.token_hex(4)}"
    images, data = run_dir / "images", run_dir / "data"
    output = run_dir / "memcounter.out"
    pids: set[int] = set()
    try:
        for directory in (images, data):
            directory.mkdir(parents=True)
        with open(output, "wb") as out:
            process = subprocess.Popen(
                [str(binary)],
                env={"MEM_MB": str(mem_mb), "TICK_MS": str(tick_ms), "DATA_DIR": str(data)},
                cwd=run_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session: no --shell-job needed
            )
        pids.add(process.pid)
        await _until(
            "memcounter to fill its memory and count",
            lambda: _last_counter(output) >= 2,
            timeout,
        )

        began = time.monotonic()
        dump = [criu.path, "dump", "-t", str(process.pid), "-D", str(images), "-o", "dump.log"]
        await _criu(dump, images / "dump.log", timeout)
        dump_s = time.monotonic() - began
        await asyncio.to_thread(process.wait, timeout)  # criu killed it; free its PID
        pids.discard(process.pid)
        at_dump = _last_counter(output)
        image_bytes = sum(f.stat().st_size for f in images.iterdir() if f.is_file())

        pid_file = run_dir / "restored.pid"
        restore = [
            criu.path,
            "restore",
            "-D",
            str(images),
            "-o",
            "restore.log",
            "-d",
            "--pidfile",
            str(pid_file),
        ]
        began = time.monotonic()
        await _criu(restore, images / "restore.log", timeout)
        restore_s = time.monotonic() - began
        restored = int(pid_file.read_text().strip())
        pids.add(restored)

        after = await _until(
            "the restored counter to continue",
            lambda: (value := _last_counter(output)) > at_dump and value,
            timeout,
        )
        if after > at_dump + max(50, 10_000 // max(tick_ms, 1)):
            raise DriverError(f"counter jumped from {at_dump} to {after} across the restore")
        counters = [int(n) for n in _COUNTER.findall(output.read_bytes())]
        if counters[counters.index(at_dump) + 1] != at_dump + 1:
            raise DriverError(f"after {at_dump} the restored process printed {counters[-5:]}")
        return {
            "dump_s": dump_s,
            "restore_s": restore_s,
            "total_ms": (dump_s + restore_s) * 1000,
            "image_bytes": image_bytes,
            "counter_at_dump": at_dump,
            "counter_after_restore": after,
        }
    finally:
        for pid in pids:
            await _kill(pid)
        await asyncio.to_thread(shutil.rmtree, run_dir, True)


async def _criu(argv: list[str], log: Path, timeout: float) -> None:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise DriverError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from None
    if process.returncode != 0:
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:])
        raise DriverError(
            f"`{' '.join(argv)}` failed with exit code {process.returncode}: "
            f"{out.decode(errors='replace').strip()}\n{tail}"
        )


def _last_counter(output: Path) -> int:
    try:
        found = _COUNTER.findall(output.read_bytes())
    except OSError:
        return 0
    return int(found[-1]) if found else 0


async def _until(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise DriverError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(POLL_SECONDS)
    return value


async def _kill(pid: int) -> None:
    """SIGKILL `pid` (a process this module started or restored) and reap it if it is
    our child; else wait until it is gone or a zombie of someone else."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if criu_tools.reap_child(pid):
            return
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return
        if state in ("Z", "X") and not _is_our_child(pid):
            return
        await asyncio.sleep(POLL_SECONDS)


def _is_our_child(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return int(fields[1]) == os.getpid()
