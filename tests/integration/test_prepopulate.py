"""An agent fills its host's image cache from the controller's plan before it is ready."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleetvisor.agent.image_cache import HostImageCache
from fleetvisor.agent.runtime import AgentRuntime
from fleetvisor.api.app import create_app
from fleetvisor.clock import RealClock
from fleetvisor.controller.core import Controller
from fleetvisor.drivers.sim import SimDriver
from fleetvisor.images.archive import import_image
from fleetvisor.images.build import build_busybox_image, httpd_layer
from fleetvisor.images.registry_client import RegistryClient
from fleetvisor.images.store import ImageStore
from helpers import serving

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/bin/busybox").exists(),
    reason="needs root (layer ownership) and Debian's busybox-static",
)


async def test_agent_prepopulates_pinned_images_before_ready(tmp_path: Path) -> None:
    controller = Controller(state_dir=tmp_path / "controller")
    controller.prepare()
    layout = build_busybox_image(tmp_path / "layout", tag="1.36", extra_layers=[httpd_layer()])
    scratch = ImageStore(tmp_path / "scratch")
    info = import_image(scratch, layout, "busybox:1.36")
    with serving(create_app(controller, run_loops=False)) as url:
        with RegistryClient(url, controller.admin_token) as registry:
            registry.push(scratch, info.ref)
        controller.cache.pin("busybox:1.36")
        clock = RealClock()
        images = HostImageCache(tmp_path / "cache", clock)
        runtime = AgentRuntime(
            name="host-1",
            controller_url=url,
            token=controller.admin_token,
            driver=SimDriver(clock=clock, state_dir=tmp_path / "agent"),
            state_dir=tmp_path / "agent",
            clock=clock,
            images=images,
        )
        try:
            await runtime.register()
            assert controller.hosts.get("host-1").state == "booting"  # takes no instances yet
            await runtime.prepopulate()
            runtime.ready = True
            await runtime.heartbeat()
        finally:
            runtime.sock.close()
            runtime.controller.close()
            images.close()
    host = controller.hosts.get("host-1")
    assert host.state == "ready"
    layers = {layer.digest for layer in scratch.manifest(info.ref).layers}
    assert {entry["digest"] for entry in host.cache["layers"]} == layers
    counters = host.cache["counters"]
    assert counters["misses"] == len(layers) and counters["hits"] == 0
    assert counters["bytes_pulled"] >= sum(
        layer.size for layer in scratch.manifest(info.ref).layers
    )
    # A launch of the pinned image now finds every layer unpacked: only hits.
    await images.layers(f"busybox@{info.digest}")
    assert images.report().counters["hits"] == len(layers)
    controller.db.dispose()
