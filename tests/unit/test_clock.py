"""The virtual clock wakes sleepers in deadline order and only when time is advanced."""

import asyncio

from fleetvisor.clock import RealClock, VirtualClock


async def test_virtual_clock_orders_wakeups() -> None:
    clock = VirtualClock(start=1000.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.now()))

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("c", 30), ("a", 10), ("b", 20))]
    await clock.advance(15)
    assert woke == [("a", 1010.0)]
    assert clock.now() == 1015.0
    await clock.advance(100)
    assert woke == [("a", 1010.0), ("b", 1020.0), ("c", 1030.0)]
    assert clock.monotonic() == 115.0
    await asyncio.gather(*tasks)


async def test_virtual_loop_ticks_at_its_interval() -> None:
    """A loop that sleeps on the clock runs once per interval of virtual time."""
    clock = VirtualClock()
    ticks: list[float] = []

    async def loop() -> None:
        while True:
            ticks.append(clock.monotonic())
            await clock.sleep(2.0)

    task = asyncio.create_task(loop())
    await clock.advance(9.0)
    task.cancel()
    assert ticks == [0.0, 2.0, 4.0, 6.0, 8.0]


async def test_real_clock_sleeps() -> None:
    clock = RealClock()
    before = clock.monotonic()
    await clock.sleep(0.01)
    assert clock.monotonic() >= before + 0.009
