"""What every host's shared image cache should hold before the host takes work.

    pinned images (operator: `fleetvisor cache pin`)            always first
  + images by instance launches over a window (most used first)
  -> keep while the total size fits the host's cache budget     = the prepopulation plan

An agent fetches its plan right after registering, pulls and unpacks it, and only
then reports `ready`. Images the controller's registry does not hold are skipped
(their size is unknown and nothing could be pulled).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import select

from fleetvisor.clock import Clock
from fleetvisor.controller import events
from fleetvisor.errors import InvalidInput, NotFound
from fleetvisor.store.db import Database
from fleetvisor.store.tables import CachePinRow, EventRow

DEFAULT_WINDOW = 7 * 86_400.0


@dataclass(frozen=True)
class PlannedImage:
    image: str
    digest: str
    size: int  # bytes of its blobs
    pinned: bool
    uses: int  # launches over the window


# image reference -> (manifest digest, total bytes), or None when the registry lacks it
ImageSizer = Callable[[str], tuple[str, int] | None]


def choose(
    pinned: Iterable[str], uses: Counter[str], size_of: ImageSizer, budget_bytes: int
) -> list[PlannedImage]:
    """Pinned first (in pin order), then by uses (ties by name), while the budget lasts.

    An image that does not fit is skipped and smaller ones after it may still fit:
    filling the budget matters more than strict order past the first miss.
    """
    plan: list[PlannedImage] = []
    spent = 0
    seen: set[str] = set()
    pinned_list = list(pinned)
    ranked = sorted(uses.items(), key=lambda item: (-item[1], item[0]))
    candidates = [(image, True) for image in pinned_list] + [
        (image, False) for image, _ in ranked if image not in pinned_list
    ]
    for image, is_pinned in candidates:
        if image in seen:
            continue
        seen.add(image)
        found = size_of(image)
        if found is None:
            continue
        digest, size = found
        if spent + size > budget_bytes:
            continue
        spent += size
        plan.append(PlannedImage(image, digest, size, is_pinned, uses.get(image, 0)))
    return plan


class CachePlanner:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        size_of: ImageSizer,
        window_seconds: float = DEFAULT_WINDOW,
    ) -> None:
        self.db = db
        self.clock = clock
        self.size_of = size_of
        self.window_seconds = window_seconds

    def pin(self, image: str) -> CachePinRow:
        image = image.strip()
        if not image or len(image) > 255:
            raise InvalidInput("give the image as NAME[:TAG], e.g. busybox:latest")
        with self.db.write() as session:
            row = session.get(CachePinRow, image)
            if row is None:
                row = CachePinRow(image=image, created_at=self.clock.now())
                session.add(row)
                events.record(
                    session,
                    self.clock.now(),
                    "cache.pinned",
                    f"image/{image}",
                    f"{image} pinned: every host's cache will hold it",
                )
            return row

    def unpin(self, image: str) -> None:
        with self.db.write() as session:
            row = session.get(CachePinRow, image)
            if row is None:
                raise NotFound(f"{image} is not pinned; see `fleetvisor cache pins`")
            session.delete(row)
            events.record(
                session, self.clock.now(), "cache.unpinned", f"image/{image}", f"{image} unpinned"
            )

    def pins(self) -> list[CachePinRow]:
        with self.db.read() as session:
            return list(session.scalars(select(CachePinRow).order_by(CachePinRow.created_at)))

    def uses(self) -> Counter[str]:
        """Instance launches per image over the window (from the event log)."""
        since = self.clock.now() - self.window_seconds
        with self.db.read() as session:
            rows = session.scalars(
                select(EventRow.data).where(
                    EventRow.kind == "instance.placed", EventRow.at >= since
                )
            )
            return Counter(str(data["image"]) for data in rows if data.get("image"))

    def plan(self, budget_bytes: int) -> list[PlannedImage]:
        return choose((p.image for p in self.pins()), self.uses(), self.size_of, budget_bytes)
