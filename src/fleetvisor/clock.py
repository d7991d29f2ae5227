"""Time for every loop: a real clock, and a virtual discrete-event clock.

Loops never call time.time() or asyncio.sleep() directly; they take a Clock, so the
same controller and agent code runs in real time or in simulated time.

VirtualClock is driven by the simulation: `await clock.advance(seconds)` moves time
forward, waking every sleeper whose deadline falls inside the span, in order.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (wall time, for records)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals and timeouts)."""

    async def sleep(self, seconds: float) -> None:
        """Wait this long on this clock."""


class RealClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class VirtualClock:
    """Discrete-event time: sleeping costs nothing; advance() decides what happens next."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._start = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now - self._start

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(0.0, seconds), next(self._seq), future))
        await future

    def next_deadline(self) -> float | None:
        return self._sleepers[0][0] if self._sleepers else None

    async def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`, running every wake-up inside the span in order."""
        end = self._now + seconds
        await _settle()
        while self._sleepers and self._sleepers[0][0] <= end:
            deadline, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not future.done():
                future.set_result(None)
            await _settle()
        self._now = end


async def _settle(rounds: int = 5) -> None:
    """Let woken tasks run until they block again on the clock."""
    for _ in range(rounds):
        await asyncio.sleep(0)
