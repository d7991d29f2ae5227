"""The host's shared image cache, as the RootfsProvider the real drivers use.

    controller registry --pull (host token, every digest verified)--> ImageStore  root/store
    ImageStore blob --LayerCache.ensure (unpacked once per machine)--> root/layers/<hex>/
    Agent.create: prepare(instance, image) pins the layers, then the driver asks layers()

One cache directory serves every agent process on a machine (`fleetvisor up` passes the
same --cache-dir to all): the store and the layer cache are both multi-process safe.
Prepopulation: right after registering, the agent pulls and unpacks the controller's
plan (pinned + most launched images within the budget) before it reports ready.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetvisor.clock import Clock
from fleetvisor.errors import FleetvisorError, NotFound
from fleetvisor.images.layers import LayerCache
from fleetvisor.images.registry_client import RegistryClient
from fleetvisor.images.store import ImageStore, Manifest, Reference
from fleetvisor.model.specs import CachedLayer, CacheReport

log = logging.getLogger(__name__)
DEFAULT_BUDGET = 20 << 30


@dataclass
class PrepopulateResult:
    images: int
    bytes_pulled: int
    layers: int
    seconds: float
    failed: list[str]


class HostImageCache:
    def __init__(
        self,
        root: Path,
        clock: Clock,
        *,
        budget_bytes: int = DEFAULT_BUDGET,
        allow_setuid: bool = True,
    ) -> None:
        self.root = root
        self.clock = clock
        self.budget_bytes = budget_bytes
        self.store = ImageStore(root / "store")
        self.layer_cache = LayerCache(
            root / "layers", budget_bytes, allow_setuid=allow_setuid, clock=clock
        )
        self.registry: RegistryClient | None = None
        self.bytes_pulled = 0
        self.pulls = 0
        self.launch_seconds: deque[float] = deque(maxlen=200)
        self._pulling: dict[str, asyncio.Lock] = {}
        self._manifests: dict[str, Manifest] = {}
        self._configs: dict[str, dict[str, Any]] = {}

    def connect(self, registry_url: str, token: str) -> None:
        """Pull from the controller's registry with this host's token."""
        if self.registry is not None:
            self.registry.close()
        self.registry = RegistryClient(registry_url, token)

    # -- RootfsProvider --------------------------------------------------------------------

    async def layers(self, image: str) -> list[Path]:
        manifest = await self.ensure_image(image)
        return [
            await asyncio.to_thread(
                self.layer_cache.ensure, layer.digest, self.store.blob_path, layer.media_type
            )
            for layer in manifest.layers
        ]

    async def config(self, image: str) -> dict[str, Any]:
        if image in self._configs:
            return dict(self._configs[image])
        await self.ensure_image(image)
        config = await asyncio.to_thread(self.store.image_config, image)
        if "@" in image:  # content addressed: it never changes
            self._configs[image] = config
        return dict(config)

    # -- pinning and pulling ---------------------------------------------------------------

    async def prepare(self, instance_id: str, image: str) -> None:
        """Have the image locally and pin its layers for the instance (before unpacking,
        so no other process's eviction can take them between unpack and mount)."""
        manifest = await self.ensure_image(image)
        await asyncio.to_thread(
            self.layer_cache.acquire, instance_id, [layer.digest for layer in manifest.layers]
        )

    async def release(self, instance_id: str) -> None:
        """Unpin the instance's layers; evict what no longer fits the budget."""
        await asyncio.to_thread(self.layer_cache.release, instance_id)
        await asyncio.to_thread(self.layer_cache.evict, self.budget_bytes)

    async def ensure_image(self, image: str) -> Manifest:
        """The image's manifest, pulled from the fleet's registry if this host lacks it."""
        known = self._manifests.get(image)
        if known is not None and all(  # still here (a gc or an eviction may have run)
            self.layer_cache.has(layer.digest) or self.store.has_blob(layer.digest)
            for layer in known.layers
        ):
            return known
        manifest = await self._ensure_image(image)
        if "@" in image:  # content addressed: it never changes; save the launch path a read
            self._manifests[image] = manifest
        return manifest

    async def _ensure_image(self, image: str) -> Manifest:
        lock = self._pulling.setdefault(image, asyncio.Lock())
        async with lock:
            try:
                return await asyncio.to_thread(self.store.manifest, image)
            except NotFound:
                pass
            if self.registry is None:
                raise NotFound(f"image {image} is not on this host and no registry is known")
            transfer = await asyncio.to_thread(self.registry.pull, image, self.store)
            self.bytes_pulled += transfer.bytes_transferred
            self.pulls += 1
            log.info(
                "pulled %s: %d bytes in %d blobs (%d already here)",
                image,
                transfer.bytes_transferred,
                transfer.blobs_transferred,
                transfer.blobs_skipped,
            )
            return await asyncio.to_thread(self.store.manifest, image)

    async def prepopulate(self, plan: list[dict[str, Any]]) -> PrepopulateResult:
        """Pull and unpack every image of the plan; a failure skips that image only."""
        start = self.clock.monotonic()
        pulled_before = self.bytes_pulled
        failed: list[str] = []
        layers = 0
        for entry in plan:
            ref = f"{Reference.parse(entry['image']).name}@{entry['digest']}"
            try:
                layers += len(await self.layers(ref))
            except FleetvisorError as exc:
                log.warning("prepopulating %s failed: %s", entry["image"], exc)
                failed.append(entry["image"])
        evicted = await asyncio.to_thread(self.layer_cache.evict, self.budget_bytes)
        if evicted:
            log.info("evicted %d layer(s) to stay within %d bytes", len(evicted), self.budget_bytes)
        return PrepopulateResult(
            len(plan) - len(failed),
            self.bytes_pulled - pulled_before,
            layers,
            self.clock.monotonic() - start,
            failed,
        )

    # -- reporting ---------------------------------------------------------------------------

    def record_launch(self, seconds: float) -> None:
        self.launch_seconds.append(seconds)

    def report(self) -> CacheReport:
        snap = self.layer_cache.snapshot()
        counters: dict[str, float] = {
            key: float(snap[key])
            for key in (
                "hits",
                "misses",
                "bytes_unpacked",
                "bytes_saved",
                "evictions",
                "bytes_evicted",
                "total_bytes",
            )
        }
        counters["bytes_pulled"] = float(self.bytes_pulled)
        counters["pulls"] = float(self.pulls)
        counters["budget_bytes"] = float(self.budget_bytes)
        if self.launch_seconds:
            ordered = sorted(self.launch_seconds)
            counters["launches"] = float(len(ordered))
            counters["launch_p50_ms"] = statistics.median(ordered) * 1000
            counters["launch_p95_ms"] = ordered[math.ceil(0.95 * len(ordered)) - 1] * 1000
        return CacheReport(
            layers=[CachedLayer(digest=d, size=size) for d, size in snap["layer_sizes"].items()],
            counters=counters,
        )

    def close(self) -> None:
        if self.registry is not None:
            self.registry.close()
