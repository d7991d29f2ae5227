"""Placement benchmark: engine throughput, correctness checked independently, optimality gap.

    run(hosts, instances, groups, seed) -> dict (JSON-ready)

1. A synthetic fleet: sites of 25 clusters of 50 hosts, three host shapes, a few
   hosts not ready, labels and CPU features, image caches, a week of hourly
   utilization (daily cycle, trend, noise) and noisy neighbours per host.
2. basic: `instances` requests of cloud-like flavours, placed one at a time by the
   engine with every scoring model on; first_fit on the same fleet is the baseline.
3. groups: the same requests, each in one of `groups` hard anti-affinity groups
   (host, cluster or site scope, with a max per scope).
4. Every assignment is re-checked here from the plain HostCandidate data, not from
   the engine's arrays: oversubscribed hosts and group violations must both be 0.
5. optimality: on a small fleet where CP-SAT proves OPTIMAL, the hosts the engine's
   batch placement uses ÷ that optimum (and the same for one-at-a-time placement).
6. forecast: Holt-Winters MAE ÷ last-sample MAE on held-out hours of the histories.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from fleetvisor.errors import InsufficientCapacity
from fleetvisor.model.entities import PlacementPolicy, PlacementScope, PlacementStrength
from fleetvisor.model.resources import Resources
from fleetvisor.scheduler import (
    FleetSnapshot,
    HostCandidate,
    InstanceUsage,
    Objective,
    PlacementEngine,
    PlacementFailed,
    PlacementGroupSpec,
    PlacementRequest,
    SchedulerConfig,
    first_fit,
    optimize_batch,
    place_batch,
)
from fleetvisor.scheduler.forecast import Smoothing, holt_winters

CLUSTER_SIZE = 50
CLUSTERS_PER_SITE = 25
HISTORY_HOURS = 168
HOST_SHAPES = (  # vcpus (millicores), memory MiB, disk GiB, net Mbit/s
    Resources(32_000, 131_072, 2_000, 10_000),
    Resources(64_000, 262_144, 4_000, 25_000),
    Resources(16_000, 65_536, 1_000, 10_000),
)
FLAVOURS = (
    Resources(500, 1_024, 10, 100),
    Resources(1_000, 2_048, 20, 100),
    Resources(2_000, 4_096, 40, 250),
    Resources(2_000, 8_192, 40, 250),
    Resources(4_000, 8_192, 80, 500),
    Resources(4_000, 16_384, 80, 500),
    Resources(8_000, 32_768, 160, 1_000),
)
IMAGES = 40
BASELINE_REQUESTS = 200
OPTIMALITY_SEEDS = 3


def synthetic_fleet(hosts: int, seed: int) -> list[HostCandidate]:
    rng = np.random.default_rng(seed)
    hours = np.arange(HISTORY_HOURS)
    base = rng.uniform(0.1, 0.5, (hosts, 3))
    amplitude = rng.uniform(0.02, 0.25, (hosts, 3))
    phase = rng.uniform(0, 2 * np.pi, (hosts, 1, 1))
    trend = rng.normal(0, 0.001, (hosts, 3))
    history = (
        base[:, :, None]
        + amplitude[:, :, None] * np.sin(2 * np.pi * hours[None, None, :] / 24 + phase)
        + trend[:, :, None] * hours[None, None, :]
        + rng.normal(0, 0.03, (hosts, 3, HISTORY_HOURS))
    ).clip(0, 1)
    layers = [[f"sha256:{i:04d}{j:02d}" for j in range(rng.integers(2, 6))] for i in range(IMAGES)]
    result = []
    for i in range(hosts):
        shape = HOST_SHAPES[int(rng.integers(len(HOST_SHAPES)))]
        used = float(rng.uniform(0.0, 0.5))
        allocated = Resources(*(int(v * used) for v in shape.as_tuple()))
        cluster = i // CLUSTER_SIZE
        roll = rng.random()
        state = "ready" if roll < 0.97 else ("draining" if roll < 0.99 else "down")
        cached = {d for k in rng.choice(IMAGES, 4, replace=False) for d in layers[int(k)]}
        neighbours = tuple(
            InstanceUsage(
                allocated=FLAVOURS[2],
                cpu_millicores=float(rng.uniform(0, 2_000)),
                memory_mib=float(rng.uniform(0, 4_096)),
                net_mbps=float(rng.uniform(0, 250)),
            )
            for _ in range(int(rng.integers(0, 4)))
        )
        result.append(
            HostCandidate(
                id=f"host-{i:05d}",
                name=f"host-{i:05d}",
                state=state,
                driver="qemu" if rng.random() < 0.7 else "runc",
                capacity=shape,
                allocated=allocated,
                generation=0,
                cluster=f"cluster-{cluster:03d}",
                site=f"site-{cluster // CLUSTERS_PER_SITE:02d}",
                labels={"disk": "ssd" if rng.random() < 0.6 else "hdd"},
                capabilities=frozenset({"live_migrate"}),
                cached_layers=frozenset(cached),
                cpu_features=frozenset({"avx512"}) if rng.random() < 0.5 else frozenset(),
                utilization_history={
                    m: tuple(history[i, k].tolist())
                    for k, m in enumerate(("vcpus", "memory", "net"))
                },
                neighbours=neighbours,
            )
        )
    return result


def synthetic_requests(count: int, seed: int) -> list[PlacementRequest]:
    rng = np.random.default_rng(seed + 1)
    layer_sets = [
        {f"sha256:{i:04d}{j:02d}": int(rng.integers(1, 200)) << 20 for j in range(2 + i % 4)}
        for i in range(IMAGES)
    ]
    requests = []
    for k in range(count):
        roll = rng.random()
        requests.append(
            PlacementRequest(
                resources=FLAVOURS[int(rng.integers(len(FLAVOURS)))],
                name=f"inst-{k:05d}",
                driver=("qemu" if roll < 0.2 else "runc" if roll < 0.3 else None),
                required_labels={"disk": "ssd"} if rng.random() < 0.2 else {},
                required_traits=frozenset({"avx512"}) if rng.random() < 0.1 else frozenset(),
                image_layers=layer_sets[int(rng.integers(IMAGES))],
            )
        )
    return requests


def anti_affinity_groups(count: int, sites: int) -> list[PlacementGroupSpec]:
    """Hard anti-affinity groups: 60% per host, 30% per cluster (max 2), 10% per site."""
    specs = []
    for g in range(count):
        kind = g % 10
        if kind < 6:
            scope, limit = PlacementScope.HOST, None
        elif kind < 9:
            scope, limit = PlacementScope.CLUSTER, 2
        else:
            scope, limit = PlacementScope.SITE, 0  # filled in by the caller (members/sites)
        specs.append(
            PlacementGroupSpec(
                f"group-{g:05d}",
                PlacementPolicy.ANTI_AFFINITY,
                PlacementStrength.HARD,
                scope,
                limit or None,
            )
        )
    return specs


def independent_check(
    hosts: Sequence[HostCandidate],
    placements: Sequence[tuple[PlacementRequest, str]],
    groups: Sequence[PlacementGroupSpec],
) -> dict[str, int]:
    """Recount from plain data: oversubscribed hosts, and group-rule violations."""
    by_id = {h.id: h for h in hosts}
    load = {h.id: list(h.allocated.as_tuple()) for h in hosts}
    per_domain: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    specs = {g.name: g for g in groups}
    for request, host_id in placements:
        for d, v in enumerate(request.resources.as_tuple()):
            load[host_id][d] += v
        host = by_id[host_id]
        for name in request.groups:
            scope = specs[name].scope
            domain = {"host": host.id, "cluster": host.cluster, "site": host.site}[scope]
            per_domain[(name, scope)][domain] += 1
    oversubscribed = sum(
        any(v > c for v, c in zip(load[h.id], h.capacity.as_tuple(), strict=True))
        for h in hosts
        if any(v != a for v, a in zip(load[h.id], h.allocated.as_tuple(), strict=True))
    )
    violations = 0
    for (name, _), counts in per_domain.items():
        spec = specs[name]
        limit = spec.limit
        if limit is not None:
            violations += sum(1 for c in counts.values() if c > limit)
        if not spec.anti and spec.limit is None and len(counts) > 1:
            violations += 1
    return {"oversubscribed_hosts": oversubscribed, "group_violations": violations}


def _place_all(
    engine: PlacementEngine, requests: Sequence[PlacementRequest], explain: bool
) -> tuple[list[tuple[PlacementRequest, str]], int, float, float]:
    """Place one at a time: (placed, failures, wall seconds, CPU seconds of this process)."""
    placed, failed = [], 0
    started, cpu = time.perf_counter(), time.process_time()
    for request in requests:
        try:
            decision = engine.place(request, explain=explain)
        except PlacementFailed:
            failed += 1
            continue
        placed.append((request, decision.host.id))
    return placed, failed, time.perf_counter() - started, time.process_time() - cpu


def _first_fit_rate(hosts: list[HostCandidate], requests: Sequence[PlacementRequest]) -> float:
    current = {h.id: h for h in hosts}
    started = time.perf_counter()
    for request in requests:
        try:
            decision = first_fit(current.values(), request)
        except InsufficientCapacity:
            continue
        host = decision.host
        current[host.id] = replace(host, allocated=host.allocated + request.resources)
    return len(requests) / (time.perf_counter() - started)


def optimality(seed: int, hosts: int = 30, instances: int = 100) -> dict[str, Any]:
    """Engine hosts used ÷ the CP-SAT optimum on a fleet small enough to prove it."""
    rng = np.random.default_rng(seed + 2)
    fleet_hosts = [
        HostCandidate(
            id=f"h{i:03d}",
            name=f"h{i:03d}",
            state="ready",
            driver="sim",
            capacity=HOST_SHAPES[0] if i % 3 else HOST_SHAPES[2],
            allocated=Resources(),
            generation=0,
            cluster=f"c{i % 2}",
            site="s0",
        )
        for i in range(hosts)
    ]
    requests = [
        PlacementRequest(FLAVOURS[int(rng.integers(len(FLAVOURS)))], name=f"i{k}")
        for k in range(instances)
    ]
    config = SchedulerConfig().with_weights(resource_fit=1.0)
    batch_engine = PlacementEngine(FleetSnapshot(fleet_hosts), config)
    place_batch(batch_engine, requests)
    online_engine = PlacementEngine(FleetSnapshot(fleet_hosts), config)
    for request in requests:
        online_engine.place(request, explain=False)
    exact_engine = PlacementEngine(FleetSnapshot(fleet_hosts), config)
    exact = optimize_batch(exact_engine, requests, objective=Objective.MIN_HOSTS, time_limit_s=60)
    optimum = exact.hosts_used
    batch_used = int(batch_engine.fleet.used().sum())
    online_used = int(online_engine.fleet.used().sum())
    return {
        "hosts": hosts,
        "instances": instances,
        "cpsat_status": exact.status,
        "cpsat_hosts_used": optimum,
        "cpsat_bound": exact.bound,
        "cpsat_seconds": round(exact.solver_wall_time_s, 3),
        "engine_batch_hosts_used": batch_used,
        "engine_online_hosts_used": online_used,
        "batch_ratio_to_optimum": round(batch_used / optimum, 4),
        "online_ratio_to_optimum": round(online_used / optimum, 4),
    }


def forecast_accuracy(hosts: Sequence[HostCandidate], holdout: int = 3) -> dict[str, float]:
    """Holt-Winters vs last sample on the last `holdout` hours of every CPU history."""
    series = np.array([h.utilization_history["vcpus"] for h in hosts])
    train, test = series[:, :-holdout], series[:, -holdout:]
    forecast, _ = holt_winters(train, holdout, 24, Smoothing(0.5, 0.1, 0.3))
    model = float(np.abs(forecast - test).mean())
    naive = float(np.abs(train[:, -1:] - test).mean())
    return {
        "holt_winters_mae": round(model, 5),
        "last_sample_mae": round(naive, 5),
        "mae_ratio": round(model / naive, 4),
    }


def run(hosts: int, instances: int, groups: int, seed: int = 0) -> dict[str, Any]:
    started = time.perf_counter()
    fleet_hosts = synthetic_fleet(hosts, seed)
    generated = time.perf_counter() - started
    requests = synthetic_requests(instances, seed)

    started = time.perf_counter()
    snapshot = FleetSnapshot(fleet_hosts)
    build_seconds = time.perf_counter() - started
    engine = PlacementEngine(snapshot)
    placed, failed, seconds, cpu = _place_all(engine, requests, explain=False)
    basic = {
        "placements_per_s": round(len(requests) / seconds, 1),
        "placements_per_cpu_s": round(len(requests) / cpu, 1),
        "placed": len(placed),
        "failed": failed,
        **independent_check(fleet_hosts, placed, []),
        "hosts_used_after": int(snapshot.used().sum()),
    }
    sample = requests[: min(1000, len(requests))]
    _, _, explained, _ = _place_all(
        PlacementEngine(FleetSnapshot(fleet_hosts)), sample, explain=True
    )
    basic["placements_per_s_with_explain"] = round(len(sample) / explained, 1)
    baseline = _first_fit_rate(list(fleet_hosts), requests[:BASELINE_REQUESTS])
    basic["first_fit_placements_per_s"] = round(baseline, 1)
    basic["speedup_vs_first_fit"] = round(basic["placements_per_s"] / baseline, 1)

    sites = len({h.site for h in fleet_hosts})
    members = math.ceil(instances / max(groups, 1))
    specs = [
        replace(s, max_per_scope=math.ceil(members / sites) + 1)
        if s.scope == PlacementScope.SITE
        else s
        for s in anti_affinity_groups(groups, sites)
    ]
    grouped = [
        replace(r, groups=(specs[k % len(specs)].name,)) if specs else r
        for k, r in enumerate(requests)
    ]
    snapshot = FleetSnapshot(fleet_hosts, specs)
    engine = PlacementEngine(snapshot)
    placed, failed, seconds, cpu = _place_all(engine, grouped, explain=False)
    with_groups = {
        "groups": len(specs),
        "members_per_group": members,
        "scopes": dict(Counter(str(s.scope) for s in specs)),
        "placements_per_s": round(len(grouped) / seconds, 1),
        "placements_per_cpu_s": round(len(grouped) / cpu, 1),
        "placed": len(placed),
        "failed": failed,
        **independent_check(fleet_hosts, placed, specs),
    }
    return {
        "benchmark": "placement",
        "hosts": hosts,
        "instances": instances,
        "seed": seed,
        "fleet_generation_s": round(generated, 2),
        "snapshot_build_s": round(build_seconds, 3),
        "basic": basic,
        "hard_anti_affinity": with_groups,
        "optimality": [optimality(seed + k) for k in range(OPTIMALITY_SEEDS)],
        "forecast": forecast_accuracy(fleet_hosts),
        "targets": {
            "basic_placements_per_s": 5000,
            "grouped_placements_per_s": 2000,
            "violations": 0,
            "max_ratio_to_optimum": 1.05,
        },
    }


if __name__ == "__main__":  # pragma: no cover - manual runs
    import json
    import sys

    args = [int(a) for a in sys.argv[1:]] or [5000, 10000, 1000, 0]
    print(json.dumps(run(*args), indent=2))
