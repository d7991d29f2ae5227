"""The Python client of the controller API; the CLI and the agent are built on it."""

from fleetvisor.client.client import ApiError, FleetClient, connect_local

__all__ = ["ApiError", "FleetClient", "connect_local"]
