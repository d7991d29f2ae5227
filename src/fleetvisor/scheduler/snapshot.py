"""What the scheduler sees: immutable host candidates, a placement request, a decision.

The controller builds one `HostCandidate` per host row and one `PlacementRequest` per
instance to place. Every field added after `first_fit` has a default, so callers that
only know capacity and state keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fleetvisor.model.resources import Resources

if TYPE_CHECKING:
    from fleetvisor.scheduler.explain import Explanation


@dataclass(frozen=True, slots=True)
class InstanceUsage:
    """One co-located instance's recent usage (a mean over the last minutes), absolute units.

    The interference model reads these: neighbours that use a lot of what a new
    instance needs, or run at their limit, slow it down.
    """

    allocated: Resources
    cpu_millicores: float = 0.0
    memory_mib: float = 0.0
    net_mbps: float = 0.0


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
    cpu_features: frozenset[str] = frozenset()
    # Utilization history per metric ("vcpus", "memory", "net"), each sample a fraction
    # of capacity, oldest first, one sample per ForecastConfig.sample_interval_s.
    utilization_history: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    # Recent usage of the instances already on the host (noisy-neighbour input).
    neighbours: tuple[InstanceUsage, ...] = ()
    # Remote attestation: "trusted", "untrusted" or "unknown", and the verdict's reason.
    attestation: str = "unknown"
    attestation_reason: str = ""

    @property
    def free(self) -> Resources:
        return self.capacity - self.allocated

    @property
    def traits(self) -> frozenset[str]:
        """What a request can require by name: driver capabilities and CPU features."""
        return self.capabilities | self.cpu_features


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    resources: Resources
    driver: str | None = None
    exclude_hosts: frozenset[str] = frozenset()
    image: str = ""
    # False when the fleet's registry lacks the image: only hosts whose driver needs no
    # real image (the sim driver) can take the instance then.
    image_available: bool = True
    name: str = ""  # the instance's name, for explanations and batch results
    groups: tuple[str, ...] = ()  # placement group names (see FleetSnapshot.groups)
    required_labels: Mapping[str, str] = field(default_factory=dict)  # host label k=v
    required_traits: frozenset[str] = frozenset()  # capabilities / CPU features
    image_layers: Mapping[str, int] = field(default_factory=dict)  # layer digest -> bytes
    trusted_host: bool = False  # only hosts whose attestation is "trusted"

    def describe(self) -> str:
        who = self.name or "the instance"
        return f"{who} ({self.resources.describe()})"


@dataclass(frozen=True, slots=True)
class PlacementDecision:
    host: HostCandidate
    # host name -> why it was filtered out. first_fit lists every host; the engine lists
    # a few examples per reason (explanation.filtered has the counts for all hosts).
    rejected: dict[str, str]
    score: float = 0.0  # the winner's weighted total, 0..100 (engine only)
    explanation: Explanation | None = None
    request: PlacementRequest | None = None
