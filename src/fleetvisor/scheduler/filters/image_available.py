"""Image availability: hosts that run real images need the image in the fleet's registry.

Hosts whose driver has the `oci_images` capability pull real images; when the registry
lacks the image only hosts without that capability (the sim driver) can take it.
"""

from __future__ import annotations

from collections.abc import Hashable

from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.filters.base import Filter, mask_of
from fleetvisor.scheduler.fleet import Mask

REAL_IMAGES = "oci_images"


class ImageAvailableFilter(Filter):
    name = "image_available"
    order = 40
    static = True

    def cache_key(self, cycle: CycleState) -> Hashable:
        return cycle.request.image_available

    def admits(self, cycle: CycleState, feasible: Mask) -> Mask | None:
        if cycle.request.image_available:
            return None
        real = cycle.fleet.trait_index.get(REAL_IMAGES)
        if real is None:
            return None
        return mask_of(len(cycle.fleet), real, value=False)

    def reason(self, cycle: CycleState, host: int) -> str:
        return (
            f"runs real images and {cycle.request.image or 'the image'} is not in the fleet's "
            "registry (fleetvisor image import)"
        )

    def summary(self, cycle: CycleState) -> str:
        return "runs real images and the image is not in the fleet's registry"
