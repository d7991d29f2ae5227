"""Drivers run instances on one host. One protocol, one subpackage per kind."""

from fleetvisor.drivers.base import Capability, Driver, load_driver

__all__ = ["Capability", "Driver", "load_driver"]
