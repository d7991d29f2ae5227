"""The controller's REST API (FastAPI). Thin: every route calls one controller service.

Long work (create, start, stop, delete) answers 202 with an Operation; clients poll
GET /v1/operations/{id} or follow /v1/events/stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from fleetvisor import __version__
from fleetvisor.api import image_routes, problems, trust_routes
from fleetvisor.api.auth import Admin, controller_of, require_host
from fleetvisor.api.metrics import FleetCollector, render
from fleetvisor.api.schemas import (
    ClusterIn,
    ClusterOut,
    EventOut,
    GroupIn,
    GroupOut,
    HeartbeatIn,
    HeartbeatOut,
    HostOut,
    HostRegisterIn,
    HostRegisterOut,
    HostStateIn,
    InstanceAccepted,
    InstanceBatchAccepted,
    InstanceBatchIn,
    InstanceIn,
    InstanceOut,
    MigrateIn,
    OperationOut,
    Problem,
    SiteIn,
    SiteOut,
    cluster_out,
    event_out,
    group_out,
    host_out,
    instance_out,
    operation_out,
    site_out,
)
from fleetvisor.asyncutil import prepend
from fleetvisor.controller import events
from fleetvisor.controller.core import Controller
from fleetvisor.controller.instance_specs import instance_spec
from fleetvisor.controller.instances import InstanceRequest
from fleetvisor.controller.moves import plan_rebalance_moves
from fleetvisor.errors import AgentUnreachable, Conflict, DriverError, Forbidden, NotFound
from fleetvisor.model.entities import HostState, InstanceStatus, PowerState
from fleetvisor.model.scaling import ScalingPolicy
from fleetvisor.store.tables import HostRow

MAX_ID = 2**62
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {"application/problem+json": {}}}
    for code in (401, 403, 404, 409, 422)
}
NameParam = Annotated[str, Query(max_length=63)]
After = Annotated[int, Query(ge=0, le=MAX_ID, description="only events with a larger id")]
Limit = Annotated[int, Query(ge=1, le=1000)]
Filter = Annotated[str | None, Query(max_length=128)]


def create_app(controller: Controller, *, run_loops: bool = True) -> FastAPI:
    """The ASGI app. With run_loops, the controller's background loops live with the app."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if run_loops:
            await controller.start_loops()
        try:
            yield
        finally:
            if run_loops:
                await controller.stop_loops()

    app = FastAPI(
        title="fleetvisor",
        version=__version__,
        lifespan=lifespan,
        description="Control plane for fleets of virtualization hosts. Authenticate "
        "with 'Authorization: Bearer TOKEN' (the admin token is in the controller's "
        "state directory).",
        responses=ERRORS,
        # The spec is served below, behind the token like everything but /healthz; the
        # browsable docs would need scripts from the internet, so they are off.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.controller = controller
    collector = FleetCollector(controller)
    app.state.collector = collector
    problems.install(app)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        route = request.scope.get("route")
        key = (request.method, getattr(route, "path", "unmatched"), str(response.status_code))
        collector.requests[key] = collector.requests.get(key, 0) + 1
        return response

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Admin])
    def openapi_spec() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict[str, str]:
        """Liveness; the only endpoint that needs no token."""
        return {"status": "ok", "version": __version__}

    @app.get(
        "/metrics",
        tags=["meta"],
        dependencies=[Admin],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    def metrics() -> Response:
        return Response(render(collector), media_type="text/plain; version=0.0.4")

    app.include_router(_inventory_routes())
    app.include_router(_host_routes())
    app.include_router(_instance_routes())
    app.include_router(_operation_routes())
    app.include_router(_event_routes())
    image_routes.install(app)
    app.include_router(trust_routes.router())
    return app


def _inventory_routes() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["inventory"], dependencies=[Admin])

    @router.get("/sites")
    def list_sites(request: Request) -> list[SiteOut]:
        return [site_out(row, n) for row, n in controller_of(request).inventory.sites()]

    @router.post("/sites", status_code=201)
    def create_site(request: Request, body: SiteIn) -> SiteOut:
        return site_out(controller_of(request).inventory.create_site(body.name), 0)

    @router.delete("/sites/{name}", status_code=204)
    def delete_site(request: Request, name: str) -> None:
        controller_of(request).inventory.delete_site(name)

    @router.get("/clusters")
    def list_clusters(request: Request) -> list[ClusterOut]:
        return [cluster_out(*item) for item in controller_of(request).inventory.clusters()]

    @router.post("/clusters", status_code=201)
    def create_cluster(request: Request, body: ClusterIn) -> ClusterOut:
        row = controller_of(request).inventory.create_cluster(body.name, body.site)
        return cluster_out(row, body.site, 0)

    @router.delete("/clusters/{name}", status_code=204)
    def delete_cluster(request: Request, name: str) -> None:
        controller_of(request).inventory.delete_cluster(name)

    @router.get("/placement-groups")
    def list_groups(request: Request) -> list[GroupOut]:
        return [group_out(row, n) for row, n in controller_of(request).inventory.groups()]

    @router.post("/placement-groups", status_code=201)
    def create_group(request: Request, body: GroupIn) -> GroupOut:
        row = controller_of(request).inventory.create_group(
            body.name, body.policy, body.strength, body.scope, body.max_per_scope
        )
        return group_out(row, [])

    @router.get("/placement-groups/{name}")
    def get_group(request: Request, name: str) -> GroupOut:
        row, members = controller_of(request).inventory.group(name)
        return group_out(row, members)

    @router.delete("/placement-groups/{name}", status_code=204)
    def delete_group(request: Request, name: str) -> None:
        controller_of(request).inventory.delete_group(name)

    return router


def _host_routes() -> APIRouter:
    router = APIRouter(prefix="/v1/hosts", tags=["hosts"])

    @router.get("", dependencies=[Admin])
    def list_hosts(request: Request) -> list[HostOut]:
        controller = controller_of(request)
        names = controller.names()
        return [
            host_out(h, names.clusters.get(h.cluster_id), names.instances_per_host.get(h.id, 0))
            for h in controller.hosts.all()
        ]

    @router.get("/{name}", dependencies=[Admin])
    def get_host(request: Request, name: str) -> HostOut:
        controller = controller_of(request)
        host = controller.hosts.get(name)
        names = controller.names()
        return host_out(
            host, names.clusters.get(host.cluster_id), names.instances_per_host.get(host.id, 0)
        )

    @router.post("/{name}/state", dependencies=[Admin])
    def set_host_state(request: Request, name: str, body: HostStateIn) -> HostOut:
        """`draining` takes no new instances and migrates those whose health policy says so."""
        controller = controller_of(request)
        host, created = controller.hosts.change_state(name, HostState(body.state))
        if created:
            controller.runner.wake()
        return host_out(host)

    @router.post("/{name}/drain", dependencies=[Admin], status_code=202)
    def drain_host(request: Request, name: str) -> dict[str, Any]:
        """Take no new instances and migrate every instance off, one after the other, each
        to a host that keeps its constraints. Returns the migrations (operations)."""
        controller = controller_of(request)
        host, created = controller.hosts.drain(name)
        controller.runner.wake()
        ops = [operation_out(controller.operation(op_id)) for op_id in created]
        return {"host": host_out(host).model_dump(), "operations": [o.model_dump() for o in ops]}

    @router.post("/register", dependencies=[Admin], status_code=201)
    def register(request: Request, body: HostRegisterIn) -> HostRegisterOut:
        """An agent joins (or rejoins) the fleet; it gets a host-scoped token back."""
        controller = controller_of(request)
        registration = controller.hosts.register(
            name=body.name,
            cluster=body.cluster,
            agent_url=body.agent_url,
            agent_token=body.agent_token,
            info=body.info,
            labels=body.labels,
            instances=body.instances,
            ready=body.ready,
            cache=body.cache,
        )
        controller.runner.wake()
        return HostRegisterOut(
            host=host_out(registration.host, body.cluster),
            token=registration.token,
            heartbeat_interval=controller.settings.heartbeat_interval,
            destroy=registration.destroy,
        )

    @router.post("/{name}/heartbeat")
    def heartbeat(
        request: Request,
        name: str,
        body: HeartbeatIn,
        host: Annotated[HostRow, Depends(require_host)],
    ) -> HeartbeatOut:
        """Agents only, with their host token: liveness, metrics and instance report."""
        if host.name != name:
            raise Forbidden(f"this token belongs to host {host.name}, not {name}")
        controller = controller_of(request)
        result = controller.hosts.heartbeat(
            host.id,
            metrics=body.metrics,
            instances=body.instances,
            ready=body.ready,
            cache=body.cache,
            scaling_events=body.scaling_events,
            detections=body.detections,
        )
        if result.recover:
            controller.runner.wake()
        return HeartbeatOut(
            heartbeat_interval=controller.settings.heartbeat_interval,
            destroy=result.destroy,
            scaling=result.scaling,
        )

    return router


def _instance_routes() -> APIRouter:
    router = APIRouter(prefix="/v1/instances", tags=["instances"], dependencies=[Admin])

    def out(controller: Controller, rows: list) -> list[InstanceOut]:  # type: ignore[type-arg]
        names = controller.names()
        parents = controller.instances.names_of({r.parent_id for r in rows if r.parent_id})
        return [
            instance_out(
                r,
                names.hosts.get(r.host_id or ""),
                names.groups.get(r.placement_group_id or ""),
                parents.get(r.parent_id or ""),
            )
            for r in rows
        ]

    @router.get("")
    def list_instances(
        request: Request, host: NameParam | None = None, status: NameParam | None = None
    ) -> list[InstanceOut]:
        controller = controller_of(request)
        return out(controller, controller.instances.all(host=host, status=status))

    @router.post("", status_code=202)
    def create_instance(request: Request, body: InstanceIn) -> InstanceAccepted:
        """Place and create an instance; answers at once with the create operation."""
        controller = controller_of(request)
        instance, op = controller.instances.create(_instance_request(body))
        controller.runner.wake()
        return InstanceAccepted(
            instance=out(controller, [instance])[0], operation=operation_out(op)
        )

    @router.post("/batch", status_code=202)
    def create_instances(request: Request, body: InstanceBatchIn) -> InstanceBatchAccepted:
        """Place and create several instances all or nothing (e.g. a group's members)."""
        controller = controller_of(request)
        created = controller.instances.create_many([_instance_request(b) for b in body.instances])
        controller.runner.wake()
        rows = out(controller, [instance for instance, _ in created])
        return InstanceBatchAccepted(
            accepted=[
                InstanceAccepted(instance=row, operation=operation_out(op))
                for row, (_, op) in zip(rows, created, strict=True)
            ]
        )

    @router.post("/rebalance")
    def rebalance(
        request: Request,
        max_moves: Annotated[int, Query(ge=0, le=10_000)] = 10,
        dry_run: bool = True,
    ) -> dict[str, Any]:
        """A move plan that keeps every hard rule at every step within `max_moves`; without
        `dry_run` its moves run as `move` operations, in order (cold moves)."""
        controller = controller_of(request)
        result = plan_rebalance_moves(controller.instances, max_moves=max_moves, dry_run=dry_run)
        controller.runner.wake()
        return result

    @router.get("/{name}/explain")
    def explain_instance(request: Request, name: str) -> dict[str, Any]:
        """Why the instance went where it went: filtered hosts with reasons, the score
        table per model, the winner (recorded when it was placed)."""
        instance = controller_of(request).instances.get(name)
        if not instance.placement:
            raise NotFound(f"{name} has no recorded placement explanation")
        return instance.placement

    @router.post("/explain")
    def explain_request(request: Request, body: InstanceIn) -> dict[str, Any]:
        """Where an instance like this would go now, and why; nothing is reserved."""
        return controller_of(request).instances.explain(_instance_request(body))

    @router.get("/{name}")
    def get_instance(request: Request, name: str) -> InstanceOut:
        controller = controller_of(request)
        return out(controller, [controller.instances.get(name)])[0]

    @router.get("/{name}/scaling-policy")
    def get_scaling(request: Request, name: str) -> dict[str, Any]:
        """The instance's local scaling: policy, whole size, siblings and their shares,
        service endpoint (for a sibling: its parent)."""
        return controller_of(request).instances.scaling(name)

    @router.put("/{name}/scaling-policy")
    async def set_scaling(request: Request, name: str, body: ScalingPolicy) -> dict[str, Any]:
        """Set the policy its host's scaling manager applies; the host takes it up at once
        (or with its next heartbeat when it cannot be reached now)."""
        return await _apply_scaling(controller_of(request), name, body)

    @router.delete("/{name}/scaling-policy")
    async def remove_scaling(request: Request, name: str) -> dict[str, Any]:
        """Remove the policy: the host folds the siblings back and stops the manager."""
        return await _apply_scaling(controller_of(request), name, None)

    @router.get(
        "/{name}/logs",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def instance_logs(
        request: Request,
        name: str,
        follow: bool = False,
        tail: Annotated[int | None, Query(ge=0, le=1_000_000)] = None,
    ) -> StreamingResponse:
        """The instance's output (stdout/stderr or console); `follow` streams new output."""
        controller = controller_of(request)
        instance, host, agent = await asyncio.to_thread(controller.agent_for, name)
        stream = agent.logs(instance.id, follow=follow, tail=tail)
        try:
            first = await anext(stream, b"")
        except DriverError as exc:  # includes the agent's 404
            raise NotFound(f"no output for {name} on {host.name} yet: {exc}") from exc
        except AgentUnreachable as exc:
            raise Conflict(f"cannot reach host {host.name} for {name}'s output: {exc}") from exc
        return StreamingResponse(prepend(first, stream), media_type="text/plain")

    def power(request: Request, name: str, state: PowerState) -> OperationOut:
        controller = controller_of(request)
        op = controller.instances.set_power(name, state)
        controller.runner.wake()
        return operation_out(op)

    @router.post("/{name}/migrate", status_code=202)
    def migrate_instance(request: Request, name: str, body: MigrateIn) -> OperationOut:
        """Move the instance to another host with its state: live (CRIU checkpoint and
        restore, when both hosts can) or cold (stop, move its files, start)."""
        controller = controller_of(request)
        op = controller.instances.migrate(name, to=body.to, mode=body.mode)
        controller.runner.wake()
        return operation_out(op)

    @router.post("/{name}/start", status_code=202)
    def start_instance(request: Request, name: str) -> OperationOut:
        return power(request, name, PowerState.RUNNING)

    @router.post("/{name}/stop", status_code=202)
    def stop_instance(request: Request, name: str) -> OperationOut:
        return power(request, name, PowerState.STOPPED)

    @router.delete("/{name}", status_code=202)
    def delete_instance(request: Request, name: str) -> OperationOut:
        controller = controller_of(request)
        op = controller.instances.delete(name)
        controller.runner.wake()
        return operation_out(op)

    return router


def _operation_routes() -> APIRouter:
    router = APIRouter(prefix="/v1/operations", tags=["operations"], dependencies=[Admin])

    @router.get("")
    def list_operations(
        request: Request,
        state: NameParam | None = None,
        instance: NameParam | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[OperationOut]:
        rows = controller_of(request).operations(state=state, instance=instance, limit=limit)
        return [operation_out(row) for row in rows]

    @router.get("/{op_id}")
    def get_operation(request: Request, op_id: str) -> OperationOut:
        return operation_out(controller_of(request).operation(op_id))

    return router


def _event_routes() -> APIRouter:
    router = APIRouter(prefix="/v1/events", tags=["events"], dependencies=[Admin])

    @router.get("")
    def list_events(
        request: Request,
        after: After = 0,
        limit: Limit = 100,
        kind: Filter = None,
        subject: Filter = None,
        tail: bool = False,
    ) -> list[EventOut]:
        """Events in id order; `tail=true` gives the newest `limit` instead of the oldest."""
        with controller_of(request).db.read() as session:
            rows = (
                events.latest(session, limit)
                if tail and not after
                else events.since(session, after, limit, kind, subject)
            )
            return [event_out(row) for row in rows]

    @router.get(
        "/stream",
        response_class=StreamingResponse,
        responses={200: {"content": {"application/x-ndjson": {}}}},
    )
    async def stream_events(
        request: Request,
        after: After = 0,
        kind: Filter = None,
        subject: Filter = None,
        max_seconds: Annotated[float, Query(gt=0, le=86_400)] = 3600.0,
    ) -> StreamingResponse:
        """Follow the log: one JSON event per line, as they happen (polls the store)."""
        controller = controller_of(request)

        async def lines() -> AsyncIterator[bytes]:
            last = after
            started = controller.clock.monotonic()
            while controller.clock.monotonic() - started < max_seconds:
                rows = await asyncio.to_thread(_events_after, controller, last, kind, subject)
                for row in rows:
                    last = row.id
                    yield (json.dumps(row.model_dump()) + "\n").encode()
                if await request.is_disconnected():
                    return
                await controller.clock.sleep(0.25)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return router


async def _apply_scaling(
    controller: Controller, name: str, policy: ScalingPolicy | None
) -> dict[str, Any]:
    row = controller.instances.set_scaling_policy(name, policy)
    host = controller.hosts.by_id(row.host_id) if row.host_id else None
    if host is not None and row.status == InstanceStatus.RUNNING:
        agent = controller.clients.for_host(host.name, host.agent_url, host.agent_token)
        with contextlib.suppress(AgentUnreachable, DriverError):
            await agent.set_scaling(instance_spec(row))
    return controller.instances.scaling(name)


def _instance_request(body: InstanceIn) -> InstanceRequest:
    return InstanceRequest(
        name=body.name,
        image=body.image,
        resources=body.resources.to_resources(),
        command=body.command,
        env=body.env,
        labels=body.labels,
        driver=body.driver,
        placement_group=body.placement_group,
        start=body.start,
        required_labels=body.required_labels,
        trusted_host=body.secure if body.trusted_host is None else body.trusted_host,
        scaling=body.scaling,
        health=body.health,
    )


def _events_after(
    controller: Controller, after: int, kind: str | None, subject: str | None
) -> list[EventOut]:
    with controller.db.read() as session:
        return [event_out(r) for r in events.since(session, after, 500, kind, subject)]
