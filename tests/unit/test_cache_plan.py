"""The prepopulation plan: pinned images first, then the most launched, within a budget."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from fleetvisor.clock import VirtualClock
from fleetvisor.controller.image_cache import CachePlanner, choose
from fleetvisor.controller.instances import InstanceRequest
from fleetvisor.fleet.inprocess import InProcessFleet
from fleetvisor.model.resources import Resources

SIZES = {"a": 40, "b": 30, "c": 20, "d": 100, "pinned": 50}


def size_of(image: str) -> tuple[str, int] | None:
    return (f"sha256:{image}", SIZES[image]) if image in SIZES else None


def test_pins_first_then_by_uses_within_budget() -> None:
    plan = choose(["pinned"], Counter({"a": 5, "b": 9, "c": 1, "d": 7, "gone": 50}), size_of, 130)
    # pinned 50; b (9 uses) 30 -> 80; d (7) 100 does not fit; a (5) 40 -> 120; c 20 no.
    assert [(p.image, p.pinned) for p in plan] == [("pinned", True), ("b", False), ("a", False)]
    assert sum(p.size for p in plan) <= 130


def test_unknown_images_and_zero_budget() -> None:
    assert choose(["gone"], Counter({"gone": 3}), size_of, 1000) == []
    assert choose(["a"], Counter(), size_of, 0) == []


async def test_planner_counts_launches_over_the_window(tmp_path: Path) -> None:
    clock = VirtualClock()
    fleet = InProcessFleet(tmp_path, clock=clock)
    await fleet.add_host("host-1")
    for i, image in enumerate(["a", "a", "b"]):
        fleet.controller.instances.create(
            InstanceRequest(name=f"i-{i}", image=image, resources=Resources(100, 64))
        )
    planner = CachePlanner(fleet.controller.db, clock, size_of, window_seconds=3600)
    planner.pin("c")
    assert planner.uses() == Counter({"a": 2, "b": 1})
    assert [p.image for p in planner.plan(1000)] == ["c", "a", "b"]
    await clock.advance(7200)  # launches age out of the window; pins stay
    assert [p.image for p in planner.plan(1000)] == ["c"]
    planner.unpin("c")
    assert planner.plan(1000) == []
