"""The agent's HTTP API, called by the controller with the token it was given."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, StringConstraints

from fleetvisor import __version__
from fleetvisor.agent.attestation_api import attestation_router
from fleetvisor.agent.core import Agent
from fleetvisor.api import problems
from fleetvisor.asyncutil import prepend
from fleetvisor.errors import DriverError, InvalidInput, Unauthorized
from fleetvisor.model.specs import InstanceReport, InstanceSpec, ResourceVector

bearer = HTTPBearer(auto_error=False)


# Where the source sends the state: a QEMU listening (tcp:) or a CRIU page server.
MIGRATION_URI = r"^(tcp|criu-page-server):[0-9a-zA-Z.:\[\]-]{1,200}$"


class MigrateOut(BaseModel):
    migration: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,64}$")]
    live: bool = True
    uri: (
        Annotated[
            str, StringConstraints(pattern=r"^(tcp|criu-page-server):[0-9a-zA-Z.:\[\]-]{1,200}$")
        ]
        | None
    ) = None


class MigratePrepare(BaseModel):
    spec: InstanceSpec
    machine: dict[str, Any] | None = None
    checkpoint: bool = False  # a CRIU dump follows: answer a page server for its memory


class MigrateAbort(BaseModel):
    migration: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,64}$")]


class MigrateIn(BaseModel):
    spec: InstanceSpec
    source_url: Annotated[str, StringConstraints(pattern=r"^https?://[!-~]{1,500}$")]
    source_token: Annotated[str, StringConstraints(max_length=200)]
    start: bool = True


class RemotePackage:
    """A migration package on another agent, pulled over HTTP with the migration's token."""

    def __init__(self, url: str, token: str) -> None:
        self._client = httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(30.0, read=300.0),
        )

    async def migration_package(self, migration: str) -> AsyncIterator[bytes]:
        try:
            async with self._client.stream("GET", f"/v1/migrations/{migration}/package") as answer:
                if answer.is_error:
                    await answer.aread()
                    raise DriverError(
                        f"the source refused the package of {migration}: "
                        f"{answer.status_code} {answer.text[:300]}"
                    )
                async for chunk in answer.aiter_bytes(1 << 20):
                    yield chunk
        except httpx.TransportError as exc:
            raise DriverError(f"pulling the package of {migration} failed: {exc}") from exc

    async def aclose(self) -> None:
        await self._client.aclose()


def create_agent_app(agent: Agent, token: str) -> FastAPI:
    app = FastAPI(title="fleetvisor agent", version=__version__)
    problems.install(app)
    app.include_router(attestation_router(token))  # POST /v1/attestation (measured boot)

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized("only the controller may call this agent")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "driver": agent.driver.kind}

    @app.get("/v1/instances", dependencies=[Depends(authorized)])
    async def list_instances() -> list[InstanceReport]:
        return await agent.list()

    @app.post("/v1/instances", dependencies=[Depends(authorized)])
    async def create(spec: InstanceSpec, start: bool = False) -> InstanceReport:
        return await agent.create(spec, start=start)

    @app.post("/v1/instances/{instance_id}/start", dependencies=[Depends(authorized)])
    async def start(instance_id: str) -> InstanceReport:
        return await agent.start(instance_id)

    @app.post("/v1/instances/{instance_id}/stop", dependencies=[Depends(authorized)])
    async def stop(instance_id: str) -> InstanceReport:
        return await agent.stop(instance_id)

    @app.post("/v1/instances/{instance_id}/resize", dependencies=[Depends(authorized)])
    async def resize(instance_id: str, body: ResourceVector) -> InstanceReport:
        return await agent.resize(instance_id, body.to_resources())

    @app.put("/v1/instances/{instance_id}/scaling", dependencies=[Depends(authorized)])
    async def set_scaling(instance_id: str, spec: InstanceSpec) -> dict[str, Any]:
        if spec.id != instance_id:
            raise InvalidInput(f"the spec is for {spec.id}, not {instance_id}")
        return await agent.set_scaling(spec)

    @app.get("/v1/instances/{instance_id}/scaling", dependencies=[Depends(authorized)])
    async def scaling_status(instance_id: str) -> dict[str, Any]:
        return await agent.scaling_status(instance_id)

    @app.get("/v1/instances/{instance_id}/stats", dependencies=[Depends(authorized)])
    async def stats(instance_id: str) -> dict[str, float]:
        return await agent.stats(instance_id)

    @app.get("/v1/instances/{instance_id}/logs", dependencies=[Depends(authorized)])
    async def logs(
        instance_id: str, follow: bool = False, tail: int | None = None
    ) -> StreamingResponse:
        stream = agent.logs(instance_id, follow=follow, tail=tail)
        first = await anext(stream, b"")  # a missing instance fails here, as a 404
        return StreamingResponse(prepend(first, stream), media_type="text/plain")

    # -- migration: the controller drives both ends; the target pulls from the source ----

    @app.post("/v1/instances/{instance_id}/migrate-out", dependencies=[Depends(authorized)])
    async def migrate_out(instance_id: str, body: MigrateOut) -> dict[str, Any]:
        return await agent.migrate_out(instance_id, body.migration, body.live, body.uri)

    @app.post("/v1/instances/{instance_id}/migrate-abort", dependencies=[Depends(authorized)])
    async def migrate_abort(instance_id: str, body: MigrateAbort) -> InstanceReport:
        return await agent.migrate_abort(instance_id, body.migration)

    @app.post("/v1/migrations/{migration}/prepare", dependencies=[Depends(authorized)])
    async def migrate_prepare(migration: str, body: MigratePrepare) -> dict[str, Any]:
        return await agent.migrate_prepare(body.spec, migration, body.machine, body.checkpoint)

    @app.get("/v1/instances/{instance_id}/machine", dependencies=[Depends(authorized)])
    async def migration_machine(instance_id: str) -> dict[str, Any]:
        return {"machine": await agent.migration_machine(instance_id)}

    @app.post("/v1/migrations/{migration}/receive", dependencies=[Depends(authorized)])
    async def migrate_in(migration: str, body: MigrateIn) -> InstanceReport:
        source = RemotePackage(body.source_url, body.source_token)
        try:
            return await agent.migrate_in(body.spec, migration, source, start=body.start)
        finally:
            await source.aclose()

    @app.get("/v1/migrations/{migration}/package")
    async def migration_package(
        migration: str, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> StreamingResponse:
        agent.migrations.check_token(migration, credentials.credentials if credentials else "")
        return StreamingResponse(agent.migration_package(migration), media_type="application/x-tar")

    @app.delete("/v1/migrations/{migration}", status_code=204, dependencies=[Depends(authorized)])
    async def migrate_forget(migration: str) -> None:
        await agent.migrate_forget(migration)

    @app.delete("/v1/instances/{instance_id}", status_code=204, dependencies=[Depends(authorized)])
    async def destroy(instance_id: str) -> None:
        await agent.destroy(instance_id)

    @app.exception_handler(Exception)
    async def _driver_failure(_request: Request, exc: Exception):  # type: ignore[no-untyped-def]
        # A driver failure is the controller's business to handle (it rolls back), so it
        # is reported as 409 with the cause rather than as a 5xx that means "retry".
        return problems.problem(409, "driver-error", "The driver failed", str(exc))

    return app
