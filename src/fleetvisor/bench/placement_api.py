"""Creates per second through the controller's API (batch and single), in process.

A temporary controller (SQLite in a temp dir) with `hosts` registered sim hosts serves
its ASGI app to an in-process client: the figure covers validation, the snapshot of
every host, the engine, the reservation transaction and the event rows, not a network.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from fleetvisor.api.app import create_app
from fleetvisor.controller.core import Controller
from fleetvisor.model.specs import HostInfo, ResourceVector

SLOT = {"vcpus": 500, "memory": 512, "disk": 1, "net": 10}


def run(hosts: int, instances: int, batch: int = 100, singles: int = 100) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fv-bench-api-") as scratch:
        controller = Controller(state_dir=Path(scratch))
        controller.prepare()
        info = HostInfo(
            capacity=ResourceVector(vcpus=32_000, memory=131_072, disk=2000, net=10_000),
            cpu_model="bench",
            driver="sim",
        )
        for i in range(hosts):
            controller.hosts.register(
                name=f"h{i:05d}",
                cluster="default",
                agent_url="http://127.0.0.1:9",
                agent_token="t" * 32,
                info=info,
                labels={},
                instances=[],
            )
        headers = {"Authorization": f"Bearer {controller.admin_token}"}
        with TestClient(create_app(controller, run_loops=False), headers=headers) as client:
            started = time.perf_counter()
            made = 0
            while made < instances:
                size = min(batch, instances - made)
                bodies = [
                    {"name": f"b{made + k}", "image": "busybox", "resources": SLOT}
                    for k in range(size)
                ]
                answer = client.post("/v1/instances/batch", json={"instances": bodies})
                answer.raise_for_status()
                made += size
            batch_seconds = time.perf_counter() - started
            started = time.perf_counter()
            for k in range(singles):
                body = {"name": f"s{k}", "image": "busybox", "resources": SLOT}
                client.post("/v1/instances", json=body).raise_for_status()
            single_seconds = time.perf_counter() - started
        controller.db.dispose()
    return {
        "api_hosts": hosts,
        "api_instances": instances,
        "api_batch_size": batch,
        "api_creates_per_s": round(instances / batch_seconds, 1),
        "api_single_creates_per_s": round(singles / single_seconds, 1),
    }
