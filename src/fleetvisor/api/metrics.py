"""/metrics in Prometheus text format: fleet state read from the store at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from fleetvisor.controller.core import Controller
from fleetvisor.model.resources import DIMENSIONS
from fleetvisor.store.tables import EventRow, HostRow, InstanceRow, OperationRow


class FleetCollector(Collector):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.requests: dict[tuple[str, str, str], int] = {}

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        with self.controller.db.read() as session:
            hosts = list(session.scalars(select(HostRow)))
            instances = session.execute(
                select(InstanceRow.status, func.count()).group_by(InstanceRow.status)
            ).all()
            operations = session.execute(
                select(OperationRow.kind, OperationRow.state, func.count()).group_by(
                    OperationRow.kind, OperationRow.state
                )
            ).all()
            events_total = session.scalar(select(func.max(EventRow.id))) or 0
        by_state = GaugeMetricFamily("fleetvisor_hosts", "Hosts by state", labels=["state"])
        states: dict[str, int] = {}
        for host in hosts:
            states[host.state] = states.get(host.state, 0) + 1
        for state, count in sorted(states.items()):
            by_state.add_metric([state], count)
        yield by_state
        capacity = GaugeMetricFamily(
            "fleetvisor_host_capacity",
            "Host capacity per resource (vcpus in millicores, memory MiB, disk GiB, net Mbit/s)",
            labels=["host", "resource"],
        )
        allocated = GaugeMetricFamily(
            "fleetvisor_host_allocated",
            "Resources reserved by instances on the host",
            labels=["host", "resource"],
        )
        heartbeat = GaugeMetricFamily(
            "fleetvisor_host_last_heartbeat_seconds",
            "Time of the host's last heartbeat",
            labels=["host"],
        )
        for host in hosts:
            for dim, cap, alloc in zip(
                DIMENSIONS, host.capacity.as_tuple(), host.allocated.as_tuple(), strict=True
            ):
                capacity.add_metric([host.name, dim], cap)
                allocated.add_metric([host.name, dim], alloc)
            heartbeat.add_metric([host.name], host.last_heartbeat)
        yield capacity
        yield allocated
        yield heartbeat
        cache = GaugeMetricFamily(
            "fleetvisor_host_image_cache",
            "Host image cache counters "
            "(hits, misses, bytes_pulled, bytes_saved, launch_p50_ms, ...)",
            labels=["host", "counter"],
        )
        for host in hosts:
            for counter, value in sorted((host.cache or {}).get("counters", {}).items()):
                cache.add_metric([host.name, counter], value)
        yield cache
        inst = GaugeMetricFamily("fleetvisor_instances", "Instances by status", labels=["status"])
        for status, count in sorted(instances):
            inst.add_metric([status], count)
        yield inst
        ops = GaugeMetricFamily(
            "fleetvisor_operations", "Operations by kind and state", labels=["kind", "state"]
        )
        for kind, state, count in sorted(operations):
            ops.add_metric([kind, state], count)
        yield ops
        yield CounterMetricFamily("fleetvisor_events", "Events recorded", value=events_total)
        http = CounterMetricFamily(
            "fleetvisor_http_requests", "API requests served", labels=["method", "route", "status"]
        )
        for (method, route, status), count in sorted(self.requests.items()):
            http.add_metric([method, route, status], count)
        yield http


def render(collector: FleetCollector) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
