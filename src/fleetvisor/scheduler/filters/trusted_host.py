"""Trusted host: attestation decides which hosts may take an instance.

- An instance that requires a trusted host (`PlacementRequest.trusted_host`, on by
  default for secure instances) goes only to hosts whose attestation is `trusted`.
- No instance goes to an `untrusted` host: its evidence failed (a changed component,
  a replayed quote, a rollback), so it is out of the fleet until it attests again.
- `unknown` hosts (not enrolled, not challenged yet, unreachable) take the rest.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.filters.base import Filter
from fleetvisor.scheduler.fleet import Mask


class TrustedHostFilter(Filter):
    name = "trusted_host"
    order = 15
    static = True

    def cache_key(self, cycle: CycleState) -> Hashable:
        return cycle.request.trusted_host

    def admits(self, cycle: CycleState, feasible: Mask) -> Mask | None:
        fleet = cycle.fleet
        if cycle.request.trusted_host:
            return fleet.trusted
        if not fleet.untrusted.any():
            return None
        return np.logical_not(fleet.untrusted)

    def reason(self, cycle: CycleState, host: int) -> str:
        candidate = cycle.fleet.hosts[host]
        why = f" ({candidate.attestation_reason})" if candidate.attestation_reason else ""
        if candidate.attestation == "untrusted":
            return f"host attestation is untrusted{why}"
        return f"host attestation is {candidate.attestation}{why}, and a trusted host is required"

    def summary(self, cycle: CycleState) -> str:
        if cycle.request.trusted_host:
            return "host attestation is not trusted (the instance requires a trusted host)"
        return "host attestation is untrusted"
