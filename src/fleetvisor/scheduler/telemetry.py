"""Turning what agents report into what the scoring models read.

Agents heartbeat absolute figures (`cpu_millicores`, `memory_mib`, `net_mbps`, see
`Agent.host_metrics`); the models want fractions of the host's capacity. These helpers
are pure so the store can call them when it records a sample.
"""

from __future__ import annotations

from collections.abc import Mapping

from fleetvisor.model.resources import Resources
from fleetvisor.scheduler.snapshot import InstanceUsage

# The metrics with a history, in the order of the snapshot's metric arrays.
METRICS: tuple[str, ...] = ("vcpus", "memory", "net")
METRIC_DIMENSION_INDEX: tuple[int, ...] = (0, 1, 3)  # their index in Resources.as_tuple()
AGENT_KEYS: dict[str, str] = {"vcpus": "cpu_millicores", "memory": "memory_mib", "net": "net_mbps"}

# A neighbour running at or above this fraction of its allocation is "at its limit":
# its demand is probably capped, so it presses on the host harder than it shows.
SATURATED = 0.9


def utilization_from_metrics(metrics: Mapping[str, float], capacity: Resources) -> dict[str, float]:
    """One heartbeat's metrics -> {"vcpus": f, "memory": f, "net": f}, fractions of capacity."""
    result: dict[str, float] = {}
    caps = capacity.as_tuple()
    for metric, index in zip(METRICS, METRIC_DIMENSION_INDEX, strict=True):
        cap = caps[index]
        value = float(metrics.get(AGENT_KEYS[metric], 0.0))
        result[metric] = value / cap if cap > 0 else 0.0
    return result


def neighbour_pressure(
    neighbours: tuple[InstanceUsage, ...], capacity: Resources
) -> tuple[float, float, float]:
    """Pressure per metric (cpu, memory, net) the co-located instances put on the host.

    pressure_d = Σ usage_d / capacity_d, where an instance at its limit in d counts twice
    (throttled demand is higher than measured usage, and saturating tenants are the
    noisy ones).
    """
    caps = capacity.as_tuple()
    totals = [0.0, 0.0, 0.0]
    for usage in neighbours:
        alloc = usage.allocated.as_tuple()
        values = (usage.cpu_millicores, usage.memory_mib, usage.net_mbps)
        for k, (value, index) in enumerate(zip(values, METRIC_DIMENSION_INDEX, strict=True)):
            weight = 2.0 if alloc[index] > 0 and value >= SATURATED * alloc[index] else 1.0
            totals[k] += weight * max(value, 0.0)
    return (
        totals[0] / caps[0] if caps[0] > 0 else 0.0,
        totals[1] / caps[1] if caps[1] > 0 else 0.0,
        totals[2] / caps[3] if caps[3] > 0 else 0.0,
    )
