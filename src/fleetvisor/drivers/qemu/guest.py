"""The guest's control channel: a virtio-serial port, a unix socket on the host (`ctl.sock`).

The initramfs guest runs one shell command per line it reads there and answers with the
output and `FV-DONE <exit code>`. The driver uses it for a graceful power-off; tests use
it to make the guest write to its disk or count its CPUs. Guests without it (any other
image) simply never answer: callers time out and fall back.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from fleetvisor.errors import DriverError
from fleetvisor.images.vm_image import CTL_DONE

_DONE = re.compile(rf"(.*){CTL_DONE} (-?\d+)")
RESEND_AFTER = 2.0  # seconds without the marker before the line goes again


async def guest_exec(socket: Path, command: str, *, timeout: float = 30.0) -> tuple[int, str]:
    """Run `command` (one line of sh) in the guest; (exit code, output)."""
    if "\n" in command:
        raise ValueError("one line of shell per call")
    begin = f"FV-BEGIN-{secrets.token_hex(4)}"
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket))
    except OSError as exc:
        raise DriverError(f"no control channel at {socket}: {exc}") from exc
    # Sent again while unanswered (below); the guard dir makes a line that arrives twice
    # run once: the second copy finds the dir and does nothing.
    line_out = f"if mkdir /tmp/.{begin} 2>/dev/null; then echo {begin}; {command}; fi\n".encode()
    try:
        writer.write(line_out)
        await writer.drain()
        output: list[str] = []
        started = False
        async with asyncio.timeout(timeout):
            while True:
                if started:
                    raw = await reader.readline()
                else:
                    # Right after the previous client left, the guest may not be reading
                    # the port yet and QEMU drops what arrives: until the guest echoes the
                    # marker (so it has read the line), send the line again.
                    try:
                        raw = await asyncio.wait_for(reader.readline(), RESEND_AFTER)
                    except TimeoutError:
                        writer.write(line_out)
                        await writer.drain()
                        continue
                if not raw:
                    raise DriverError(f"the guest closed its control channel during {command!r}")
                line = raw.decode(errors="replace").rstrip("\r\n")
                if line == begin:
                    started = True
                elif started and (done := _DONE.fullmatch(line)):
                    if done.group(1):  # output without a final newline
                        output.append(done.group(1))
                    return int(done.group(2)), "\n".join(output)
                elif started:
                    output.append(line)
    except TimeoutError:
        raise DriverError(f"the guest did not answer {command!r} within {timeout:g} s") from None
    finally:
        writer.close()
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def guest_send(socket: Path, command: str) -> AsyncIterator[bool]:
    """Send `command` and keep the channel open for the block (e.g. while waiting for a
    `poweroff -f` to take effect): QEMU drops bytes the guest has not read yet when the
    client goes away. Yields False when the guest has no channel."""
    try:
        _, writer = await asyncio.open_unix_connection(str(socket))
    except OSError:
        yield False
        return
    try:
        writer.write(f"{command}\n".encode())
        await writer.drain()
        yield True
    finally:
        writer.close()
