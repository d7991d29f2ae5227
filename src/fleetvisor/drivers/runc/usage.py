"""Cumulative counters (cgroup CPU time, veth bytes) -> the usage figures reports carry.

Counters only grow, so a rate needs two readings. The sampler keeps a baseline per
instance and measures against it; the baseline moves forward only once it is at least
`min_interval` old, so a list() right after a stats() does not measure over a few
milliseconds of noise.

Keys (counters are cumulative since the container started; `forget` restarts them):
  cpu_millicores, net_mbps           rates since the baseline
  cpu_usage_seconds                  CPU time used (cpuacct.usage)
  cpu_periods, throttled_periods     CFS periods elapsed / throttled (cpu.stat): the
                                     throttled share is Δthrottled_periods / Δcpu_periods
  throttled_seconds                  time the quota held the tasks back
  cpu_wait_seconds                   run-queue wait summed over the tasks (schedstat):
                                     runnable, but another task held the CPU
  memory_mib, memory_max_mib         in use (page cache included) and its peak
  memory_working_set_mib             in use minus inactive page cache (what an OOM
                                     kill would have to free; kubelet's working set)
  memory_limit_mib                   the cgroup's limit; 0 when not limited
  oom_kills, pids                    processes killed by the OOM killer; tasks now
  net_rx_bytes, net_tx_bytes         the instance's veth counters
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetvisor.drivers.runc.cgroups import CgroupStats
from fleetvisor.drivers.runc.schedstat import WaitCounter

MIB = 1024 * 1024


@dataclass(frozen=True)
class Reading:
    at: float  # monotonic seconds
    cpu_ns: int
    net_bytes: int  # received + sent


class UsageSampler:
    def __init__(self, min_interval: float = 1.0) -> None:
        self.min_interval = min_interval
        self._baseline: dict[str, Reading] = {}
        self._waits: dict[str, WaitCounter] = {}

    def forget(self, instance_id: str) -> None:
        """Drop the baseline: the counters restart (new container) or the instance is gone."""
        self._baseline.pop(instance_id, None)
        self._waits.pop(instance_id, None)

    def usage(
        self,
        instance_id: str,
        now: float,
        cgroup: CgroupStats | None,
        net_rx_bytes: int,
        net_tx_bytes: int,
        uptime: float | None,
    ) -> dict[str, float]:
        """Usage figures for a report; rates since the baseline (first time: CPU since start)."""
        cpu_ns = cgroup.cpu_usage_ns if cgroup else 0
        reading = Reading(now, cpu_ns, net_rx_bytes + net_tx_bytes)
        baseline = self._baseline.get(instance_id)
        cpu_millicores = net_mbps = 0.0
        if cgroup is None:
            self.forget(instance_id)
        elif baseline is None or reading.cpu_ns < baseline.cpu_ns:
            if uptime and uptime > 0:
                cpu_millicores = cpu_ns / 1e9 / uptime * 1000
            self._baseline[instance_id] = reading
        else:
            elapsed = reading.at - baseline.at
            if elapsed > 0:
                cpu_millicores = (reading.cpu_ns - baseline.cpu_ns) / 1e9 / elapsed * 1000
                sent = max(0, reading.net_bytes - baseline.net_bytes)
                net_mbps = sent * 8 / 1e6 / elapsed
            if elapsed >= self.min_interval:
                self._baseline[instance_id] = reading
        wait_ns = 0
        if cgroup is not None:
            wait_ns = self._waits.setdefault(instance_id, WaitCounter()).observe(
                cgroup.task_waits_ns
            )
        memory = cgroup.memory_bytes if cgroup else 0
        inactive = cgroup.memory_inactive_file_bytes if cgroup else 0
        return {
            "cpu_millicores": cpu_millicores,
            "cpu_usage_seconds": cpu_ns / 1e9,
            "cpu_periods": float(cgroup.cpu_periods if cgroup else 0),
            "throttled_periods": float(cgroup.throttled_periods if cgroup else 0),
            "throttled_seconds": (cgroup.throttled_ns if cgroup else 0) / 1e9,
            "cpu_wait_seconds": wait_ns / 1e9,
            "memory_mib": memory / MIB,
            "memory_max_mib": (cgroup.memory_max_bytes if cgroup else 0) / MIB,
            "memory_working_set_mib": max(0, memory - inactive) / MIB,
            "memory_limit_mib": (cgroup.memory_limit_bytes if cgroup else 0) / MIB,
            "oom_kills": float(cgroup.oom_kills if cgroup else 0),
            "pids": float(cgroup.pids if cgroup else 0),
            "net_rx_bytes": float(net_rx_bytes),
            "net_tx_bytes": float(net_tx_bytes),
            "net_mbps": net_mbps,
        }
