"""`fleetvisor up`: a whole local fleet (controller + N agents) as supervised processes."""

from fleetvisor.fleet.local import LocalFleet

__all__ = ["LocalFleet"]
