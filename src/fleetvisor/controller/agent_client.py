"""How the controller reaches an agent: one interface, over HTTP or in-process.

The in-process form is for the simulator, where thousands of agents live in the
controller's own event loop. Both raise AgentUnreachable when the agent cannot be
reached (the caller retries or rolls back) and DriverError when the agent answered
that it could not do the work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import httpx

from fleetvisor.errors import AgentUnreachable, DriverError
from fleetvisor.model.resources import Resources
from fleetvisor.model.specs import InstanceReport, InstanceSpec


class AgentClient(Protocol):
    async def create(self, spec: InstanceSpec, start: bool = False) -> InstanceReport: ...

    async def start(self, instance_id: str) -> InstanceReport: ...

    async def stop(self, instance_id: str) -> InstanceReport: ...

    async def destroy(self, instance_id: str) -> None: ...

    async def resize(self, instance_id: str, resources: Resources) -> InstanceReport: ...

    async def stats(self, instance_id: str) -> dict[str, float]: ...

    async def list(self) -> list[InstanceReport]: ...

    async def set_scaling(self, spec: InstanceSpec) -> dict[str, Any]: ...

    async def scaling_status(self, instance_id: str) -> dict[str, Any]: ...

    def logs(
        self, instance_id: str, follow: bool = False, tail: int | None = None
    ) -> AsyncIterator[bytes]: ...

    # Migration (agent/migration.py): the source packs, the target pulls and runs.
    async def migrate_prepare(
        self,
        spec: InstanceSpec,
        migration: str,
        machine: dict[str, Any] | None = None,
        checkpoint: bool = False,
    ) -> dict[str, Any]: ...

    async def migration_machine(self, instance_id: str) -> dict[str, Any] | None: ...

    async def migrate_out(
        self, instance_id: str, migration: str, live: bool, uri: str | None = None
    ) -> dict[str, Any]: ...

    async def migrate_in(
        self, spec: InstanceSpec, migration: str, source: Any, token: str = "", start: bool = True
    ) -> InstanceReport: ...

    async def migrate_abort(self, instance_id: str, migration: str) -> InstanceReport: ...

    async def migrate_forget(self, migration: str) -> None: ...


class InstanceMissing(DriverError):
    """The agent does not have this instance."""


# A checkpoint of a large instance, or pulling its package, takes longer than a call.
MIGRATION_TIMEOUT = 600.0


class HttpAgentClient:
    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        self.url = base_url
        self._client = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, headers={"Authorization": f"Bearer {token}"}
        )

    async def create(self, spec: InstanceSpec, start: bool = False) -> InstanceReport:
        path = "/v1/instances?start=true" if start else "/v1/instances"
        return InstanceReport(**await self._call("POST", path, json=spec.model_dump()))

    async def start(self, instance_id: str) -> InstanceReport:
        return InstanceReport(**await self._call("POST", f"/v1/instances/{instance_id}/start"))

    async def stop(self, instance_id: str) -> InstanceReport:
        return InstanceReport(**await self._call("POST", f"/v1/instances/{instance_id}/stop"))

    async def destroy(self, instance_id: str) -> None:
        await self._call("DELETE", f"/v1/instances/{instance_id}")

    async def resize(self, instance_id: str, resources: Resources) -> InstanceReport:
        body = resources.as_dict()
        return InstanceReport(
            **await self._call("POST", f"/v1/instances/{instance_id}/resize", json=body)
        )

    async def stats(self, instance_id: str) -> dict[str, float]:
        return dict(await self._call("GET", f"/v1/instances/{instance_id}/stats"))

    async def list(self) -> list[InstanceReport]:
        return [InstanceReport(**item) for item in await self._call("GET", "/v1/instances")]

    async def set_scaling(self, spec: InstanceSpec) -> dict[str, Any]:
        path = f"/v1/instances/{spec.id}/scaling"
        return dict(await self._call("PUT", path, json=spec.model_dump()))

    async def scaling_status(self, instance_id: str) -> dict[str, Any]:
        return dict(await self._call("GET", f"/v1/instances/{instance_id}/scaling"))

    async def logs(
        self, instance_id: str, follow: bool = False, tail: int | None = None
    ) -> AsyncIterator[bytes]:
        params: dict[str, bool | int] = {"follow": follow}
        if tail is not None:
            params["tail"] = tail
        try:
            async with self._client.stream(
                "GET",
                f"/v1/instances/{instance_id}/logs",
                params=params,
                timeout=httpx.Timeout(10.0, read=None),
            ) as response:
                if response.status_code == 404:
                    await response.aread()
                    raise InstanceMissing(_detail(response))
                if response.is_error:
                    await response.aread()
                    raise DriverError(_detail(response))
                async for chunk in response.aiter_bytes():
                    yield chunk
        except httpx.TransportError as exc:
            raise AgentUnreachable(f"{self._client.base_url}: {exc}") from exc

    async def migrate_prepare(
        self,
        spec: InstanceSpec,
        migration: str,
        machine: dict[str, Any] | None = None,
        checkpoint: bool = False,
    ) -> dict[str, Any]:
        path = f"/v1/migrations/{migration}/prepare"
        body = {"spec": spec.model_dump(), "machine": machine, "checkpoint": checkpoint}
        return dict(await self._call("POST", path, json=body, timeout=MIGRATION_TIMEOUT))

    async def migration_machine(self, instance_id: str) -> dict[str, Any] | None:
        answer = await self._call("GET", f"/v1/instances/{instance_id}/machine")
        machine = answer.get("machine")
        return dict(machine) if machine is not None else None

    async def migrate_out(
        self, instance_id: str, migration: str, live: bool, uri: str | None = None
    ) -> dict[str, Any]:
        body = {"migration": migration, "live": live, "uri": uri}
        path = f"/v1/instances/{instance_id}/migrate-out"
        return dict(await self._call("POST", path, json=body, timeout=MIGRATION_TIMEOUT))

    async def migrate_in(
        self, spec: InstanceSpec, migration: str, source: Any, token: str = "", start: bool = True
    ) -> InstanceReport:
        if not isinstance(source, HttpAgentClient):
            raise DriverError("an agent over HTTP pulls a package only from another such agent")
        body = {
            "spec": spec.model_dump(),
            "source_url": source.url,
            "source_token": token,
            "start": start,
        }
        path = f"/v1/migrations/{migration}/receive"
        return InstanceReport(
            **await self._call("POST", path, json=body, timeout=MIGRATION_TIMEOUT)
        )

    async def migrate_abort(self, instance_id: str, migration: str) -> InstanceReport:
        path = f"/v1/instances/{instance_id}/migrate-abort"
        body = {"migration": migration}
        return InstanceReport(
            **await self._call("POST", path, json=body, timeout=MIGRATION_TIMEOUT)
        )

    async def migrate_forget(self, migration: str) -> None:
        await self._call("DELETE", f"/v1/migrations/{migration}")

    async def attest(self, nonce: bytes) -> dict[str, Any]:
        """The agent's answer to an attestation challenge: TPM quote over `nonce` + event log."""
        return dict(await self._call("POST", "/v1/attestation", json={"nonce": nonce.hex()}))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(  # type: ignore[no-untyped-def]
        self, method: str, path: str, json: object = None, timeout: float | None = None
    ):
        try:
            response = await self._client.request(
                method,
                path,
                json=json,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TransportError as exc:
            raise AgentUnreachable(
                f"{self._client.base_url}: {exc.__class__.__name__}: {exc}"
            ) from exc
        if response.status_code == 404:
            raise InstanceMissing(_detail(response))
        if response.status_code >= 500 and response.status_code != 500:
            raise AgentUnreachable(f"{self._client.base_url} answered {response.status_code}")
        if response.is_error:
            raise DriverError(_detail(response))
        return response.json() if response.content else None


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text or f"HTTP {response.status_code}"


class AgentClients:
    """Hands out the client for a host; caches HTTP clients by (url, token)."""

    def __init__(self, in_process: Callable[[str], AgentClient | None] | None = None) -> None:
        self._in_process = in_process
        self._http: dict[tuple[str, str], HttpAgentClient] = {}

    def for_host(self, host_name: str, agent_url: str, token: str) -> AgentClient:
        if self._in_process is not None:
            client = self._in_process(host_name)
            if client is not None:
                return client
        key = (agent_url, token)
        if key not in self._http:
            self._http[key] = HttpAgentClient(agent_url, token)
        return self._http[key]

    async def aclose(self) -> None:
        for client in self._http.values():
            await client.aclose()
        self._http.clear()
