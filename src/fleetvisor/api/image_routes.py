"""Images and the image cache in the controller API, and the OCI registry mount.

/v2/...             OCI distribution API (push: admin token; pull: admin or host token)
/v1/images          what the registry holds (list, inspect, remove)
/v1/cache/pins      images every host's cache must hold
/v1/cache/plan      what a host should prepopulate within its budget (agents call it)
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import BaseModel, StringConstraints

from fleetvisor.api.auth import Admin, AdminOrHost, controller_of
from fleetvisor.images.registry_server import registry_router, token_authorizer
from fleetvisor.model.specs import SafeStr

ImageRef = Annotated[SafeStr, StringConstraints(min_length=1, max_length=255)]


class ImageOut(BaseModel):
    name: str
    tag: str | None
    ref: str
    digest: str
    size: int
    layers: int
    created: str | None


class ImageDetail(ImageOut):
    manifest: dict[str, Any]
    config: dict[str, Any]


class PinIn(BaseModel):
    image: ImageRef


class PinOut(BaseModel):
    image: str
    created_at: float
    digest: str | None
    size: int | None


class PlanEntry(BaseModel):
    image: str
    digest: str
    size: int
    pinned: bool
    uses: int


def install(app: FastAPI) -> None:
    controller = app.state.controller
    app.include_router(
        registry_router(
            lambda request: controller_of(request).images,
            token_authorizer(
                controller.admin_token,
                lambda token: controller.hosts.authenticate(token) is not None,
            ),
        )
    )
    app.include_router(_image_routes())
    app.include_router(_cache_routes())


def _image_out(info: Any) -> ImageOut:
    return ImageOut(
        name=info.name,
        tag=info.tag,
        ref=info.ref,
        digest=info.digest,
        size=info.size,
        layers=info.layers,
        created=info.created,
    )


def _image_routes() -> APIRouter:
    router = APIRouter(prefix="/v1/images", tags=["images"], dependencies=[Admin])

    @router.get("")
    def list_images(request: Request) -> list[ImageOut]:
        """Images in the fleet's registry (push with `fleetvisor image import` or skopeo)."""
        return [_image_out(info) for info in controller_of(request).images.images()]

    @router.get("/{ref:path}")
    def inspect_image(request: Request, ref: str) -> ImageDetail:
        store = controller_of(request).images
        info = store.info(ref)
        manifest = store.manifest(ref)
        return ImageDetail(
            **_image_out(info).model_dump(),
            manifest={
                "config": manifest.config.to_json(),
                "layers": [layer.to_json() for layer in manifest.layers],
            },
            config=store.image_config(ref),
        )

    @router.delete("/{ref:path}", status_code=204)
    def remove_image(request: Request, ref: str) -> None:
        """Untag the image; its blobs go at the next garbage collection if unused."""
        controller_of(request).images.remove(ref)

    return router


def _cache_routes() -> APIRouter:
    router = APIRouter(prefix="/v1/cache", tags=["cache"])

    @router.get("/pins", dependencies=[Admin])
    def list_pins(request: Request) -> list[PinOut]:
        controller = controller_of(request)
        out = []
        for pin in controller.cache.pins():
            found = controller.image_size(pin.image)
            out.append(
                PinOut(
                    image=pin.image,
                    created_at=pin.created_at,
                    digest=found[0] if found else None,
                    size=found[1] if found else None,
                )
            )
        return out

    @router.post("/pins", dependencies=[Admin], status_code=201)
    def pin(request: Request, body: PinIn) -> PinOut:
        """Keep an image in every host's cache, whatever its popularity."""
        controller = controller_of(request)
        row = controller.cache.pin(body.image)
        found = controller.image_size(row.image)
        return PinOut(
            image=row.image,
            created_at=row.created_at,
            digest=found[0] if found else None,
            size=found[1] if found else None,
        )

    @router.delete("/pins/{image:path}", dependencies=[Admin], status_code=204)
    def unpin(request: Request, image: str) -> None:
        controller_of(request).cache.unpin(image)

    @router.get("/plan", dependencies=[AdminOrHost])
    async def plan(
        request: Request,
        budget_bytes: Annotated[int, Query(ge=0, le=1 << 50)] = 10 << 30,
    ) -> list[PlanEntry]:
        """Pinned images, then the most launched ones over the window, within the budget."""
        entries = await asyncio.to_thread(controller_of(request).cache.plan, budget_bytes)
        return [
            PlanEntry(image=e.image, digest=e.digest, size=e.size, pinned=e.pinned, uses=e.uses)
            for e in entries
        ]

    return router
