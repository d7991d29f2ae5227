"""Concurrent creates through the HTTP API never break a hard group rule nor oversubscribe
a host: 240 requests at once, 12 hard anti-affinity groups, more demand than capacity."""

from __future__ import annotations

from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from sqlalchemy import select

from fleetvisor.api.app import create_app
from fleetvisor.controller.core import Controller
from fleetvisor.model.specs import HostInfo, ResourceVector
from fleetvisor.store.tables import HostRow, InstanceRow, PlacementGroupRow
from helpers import serving

HOSTS, GROUPS, PER_GROUP = 16, 12, 20  # 240 requests; 16 hosts x 12 slots = 192 fit
SLOT = {"vcpus": 500, "memory": 256, "disk": 1, "net": 10}


def test_concurrent_creates_keep_hard_anti_affinity_and_capacity(
    tmp_path: Path, database_url: str
) -> None:
    controller = Controller(state_dir=tmp_path, db_url=database_url)
    controller.prepare()
    for i in range(HOSTS):
        controller.hosts.register(
            name=f"h{i:02d}",
            cluster="default",
            agent_url="http://127.0.0.1:9",
            agent_token="t" * 32,
            labels={},
            instances=[],
            info=HostInfo(
                capacity=ResourceVector(vcpus=6000, memory=4096, disk=100, net=1000),
                cpu_model="x",
                driver="sim",
            ),
        )
    for g in range(GROUPS):
        controller.inventory.create_group(f"g{g}", "anti-affinity", "hard", "host", None)
    bodies = [
        {"name": f"g{g}-m{m}", "image": "busybox", "resources": SLOT, "placement_group": f"g{g}"}
        for m in range(PER_GROUP)
        for g in range(GROUPS)
    ]
    headers = {"Authorization": f"Bearer {controller.admin_token}"}
    with (
        serving(create_app(controller, run_loops=False)) as url,
        httpx.Client(base_url=url, headers=headers, timeout=120) as client,
        ThreadPoolExecutor(max_workers=32) as pool,
    ):
        statuses = Counter(
            pool.map(lambda b: client.post("/v1/instances", json=b).status_code, bodies)
        )
    assert set(statuses) <= {202, 409}, statuses  # never a 5xx
    with controller.db.read() as session:
        hosts = {h.id: h for h in session.scalars(select(HostRow))}
        groups = {g.id: g.name for g in session.scalars(select(PlacementGroupRow))}
        instances = list(session.scalars(select(InstanceRow)))
    assert len(instances) == statuses[202]
    # An anti-affinity group has at most one member per host: 16 hosts -> 16 per group.
    assert statuses[202] == GROUPS * HOSTS
    per_group_host = Counter((groups[i.placement_group_id], i.host_id) for i in instances)
    assert max(per_group_host.values()) == 1
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for instance in instances:
        for k, value in enumerate(instance.resources.as_tuple()):
            sums[instance.host_id][k] += value
    for host in hosts.values():
        assert host.allocated.fits_in(host.capacity)  # zero oversubscription
        assert list(host.allocated.as_tuple()) == sums.get(host.id, [0, 0, 0, 0])
    controller.db.dispose()
