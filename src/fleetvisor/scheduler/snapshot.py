"""What the scheduler sees: immutable host candidates and a placement request."""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetvisor.model.resources import Resources


@dataclass(frozen=True, slots=True)
class HostCandidate:
    id: str
    name: str
    state: str
    driver: str
    capacity: Resources
    allocated: Resources
    generation: int  # the reservation must see the same generation, or retry
    cluster: str = ""
    site: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    capabilities: frozenset[str] = frozenset()
    cached_layers: frozenset[str] = frozenset()  # digests in the host's image cache

    @property
    def free(self) -> Resources:
        return self.capacity - self.allocated


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    resources: Resources
    driver: str | None = None
    exclude_hosts: frozenset[str] = frozenset()
    image: str = ""
    # False when the fleet's registry lacks the image: only hosts whose driver needs no
    # real image (the sim driver) can take the instance then.
    image_available: bool = True


@dataclass(frozen=True, slots=True)
class PlacementDecision:
    host: HostCandidate
    rejected: dict[str, str]  # host name -> why it was filtered out
