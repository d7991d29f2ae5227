"""The runc driver: instances are OCI runtime bundles run by runc (see README.md)."""

from fleetvisor.drivers.runc.driver import RuncDriver
from fleetvisor.drivers.runc.prereqs import PrerequisiteMissing, check_prerequisites

__all__ = ["PrerequisiteMissing", "RuncDriver", "check_prerequisites"]
