"""Controller tunables. Defaults suit a small real fleet; tests shorten the intervals."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ControllerSettings:
    heartbeat_interval: float = 2.0  # seconds between agent heartbeats (told to agents)
    down_after_missed: int = 3  # heartbeats missed before a host is marked down
    operation_timeout: float = 120.0  # an operation that cannot reach its agent by then ends
    retry_initial: float = 0.5  # first back-off between attempts to reach an agent
    retry_max: float = 5.0
    health_check_interval: float = 0.5
    sample_interval: float = 60.0  # seconds between stored utilization samples per host
    sample_retention: float = 48 * 3600.0  # history kept for forecasts (hourly means)
    attestation_interval: float = 300.0  # seconds between challenges of an enrolled host
    attestation_poll_interval: float = 1.0  # how soon a newly registered host is challenged
    attestation_nonce_ttl: float = 60.0  # a host-fetched nonce must be answered by then

    @property
    def down_after_seconds(self) -> float:
        return self.heartbeat_interval * self.down_after_missed
