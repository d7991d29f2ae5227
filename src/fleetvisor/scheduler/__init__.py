"""Placement: pure functions over a snapshot of hosts and a request. No database, no HTTP."""

from fleetvisor.scheduler.first_fit import first_fit
from fleetvisor.scheduler.snapshot import HostCandidate, PlacementDecision, PlacementRequest

__all__ = ["HostCandidate", "PlacementDecision", "PlacementRequest", "first_fit"]
