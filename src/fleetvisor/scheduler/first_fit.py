"""First fit: the first host, by name, that passes every filter."""

from __future__ import annotations

from collections.abc import Iterable

from fleetvisor.errors import InsufficientCapacity
from fleetvisor.model.entities import HostState
from fleetvisor.model.resources import UNITS
from fleetvisor.scheduler.snapshot import HostCandidate, PlacementDecision, PlacementRequest


def rejection(host: HostCandidate, request: PlacementRequest) -> str | None:
    """Why `host` cannot take `request`, or None when it can."""
    if host.id in request.exclude_hosts:
        return "excluded by the request"
    if host.state != HostState.READY:
        return f"host is {host.state}, not ready"
    if request.driver and host.driver != request.driver:
        return f"runs driver {host.driver}, not {request.driver}"
    if not request.image_available and "oci_images" in host.capabilities:
        return (
            f"runs real images and {request.image or 'the image'} is not in the fleet's "
            "registry (fleetvisor image import)"
        )
    short = request.resources.shortfall(host.free)
    if short:
        return "not enough " + ", ".join(describe_shortfall(dim, n) for dim, n in short.items())
    return None


def describe_shortfall(dimension: str, amount: int) -> str:
    if dimension == "vcpus":
        return f"cpu (short by {amount / 1000:g})"
    return f"{dimension} (short by {amount} {UNITS[dimension]})"


def first_fit(hosts: Iterable[HostCandidate], request: PlacementRequest) -> PlacementDecision:
    rejected: dict[str, str] = {}
    for host in sorted(hosts, key=lambda h: h.name):
        reason = rejection(host, request)
        if reason is None:
            return PlacementDecision(host=host, rejected=rejected)
        rejected[host.name] = reason
    if not rejected:
        raise InsufficientCapacity(
            "no hosts are registered; start an agent (fleetvisor agent) or a local fleet "
            "(fleetvisor up)",
            rejected=rejected,
        )
    summary = "; ".join(f"{name}: {why}" for name, why in list(rejected.items())[:10])
    raise InsufficientCapacity(
        f"no host can take {request.resources.describe()}: {summary}. "
        "Ask for fewer resources, free capacity, or add hosts.",
        rejected=rejected,
    )
