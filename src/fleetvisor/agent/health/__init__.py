"""Execution monitoring on the host: probes and detectors per instance, restarts in place,
detections queued for the controller."""

from fleetvisor.agent.health.monitor import HealthSupervisor

__all__ = ["HealthSupervisor"]
