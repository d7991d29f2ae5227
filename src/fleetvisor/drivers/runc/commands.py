"""Running host tools (runc, ip) without blocking the agent's event loop.

Every call has a timeout and a failure raises DriverError carrying the tool's own
stderr, so the operator sees runc's or ip's words, not just an exit code.
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from fleetvisor.errors import DriverError

DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


def describe(args: Sequence[str]) -> str:
    return shlex.join(args)


def failure(args: Sequence[str], returncode: int, stderr: str) -> DriverError:
    detail = stderr.strip() or "(no output on stderr)"
    return DriverError(f"`{describe(args)}` failed with exit code {returncode}: {detail}")


async def run(
    args: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    stdin: bytes | None = None,
) -> CommandResult:
    """Run `args` with `stdin` (else /dev/null) and captured output; DriverError when it
    fails (exit code != 0 and `check`), cannot start, or outlives `timeout` (it is killed)."""
    try:
        process = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise DriverError(f"cannot run `{describe(args)}`: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise DriverError(
            f"`{describe(args)}` did not finish within {timeout:g} s and was killed"
        ) from None
    except asyncio.CancelledError:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    result = CommandResult(
        process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")
    )
    if check and result.returncode != 0:
        raise failure(args, result.returncode, result.stderr or result.stdout)
    return result


def run_sync(args: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT) -> CommandResult:
    """The blocking twin of `run`, for start-up checks that happen before any event loop."""
    try:
        done = subprocess.run(
            list(args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DriverError(f"`{describe(args)}` did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise DriverError(f"cannot run `{describe(args)}`: {exc}") from exc
    result = CommandResult(
        done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    )
    if result.returncode != 0:
        raise failure(args, result.returncode, result.stderr or result.stdout)
    return result
