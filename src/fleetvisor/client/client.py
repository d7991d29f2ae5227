"""FleetClient: one method per API call, errors as ApiError with the server's advice.

client = connect_local()                      # URL and token from the state dir
accepted = client.create_instance({...})
client.wait_operation(accepted["operation"]["id"])
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_PORT = 8470
TERMINAL = ("succeeded", "failed", "rolled_back")


class ApiError(Exception):
    def __init__(self, status: int, title: str, detail: str, body: dict[str, Any] | None = None):
        super().__init__(f"{detail}" if detail else title)
        self.status = status
        self.title = title
        self.detail = detail
        self.body = body or {}


def default_state_dir() -> Path:
    return Path(os.environ.get("FLEETVISOR_HOME", Path.home() / ".fleetvisor"))


def connect_local(
    url: str | None = None, token: str | None = None, state_dir: Path | None = None
) -> FleetClient:
    """A client for the controller named by arguments, env, or the state dir, in that order."""
    state = state_dir or default_state_dir()
    url = url or os.environ.get("FLEETVISOR_URL")
    if not url:
        endpoint = state / "controller.json"
        if endpoint.exists():
            url = json.loads(endpoint.read_text())["url"]
        else:
            url = f"http://127.0.0.1:{DEFAULT_PORT}"
    token = token or os.environ.get("FLEETVISOR_TOKEN")
    if not token:
        token_file = state / "admin.token"
        if not token_file.exists():
            raise ApiError(
                0,
                "No token",
                f"no admin token at {token_file}: start a fleet "
                "(fleetvisor up) or pass --state-dir / set FLEETVISOR_TOKEN",
            )
        token = token_file.read_text().strip()
    return FleetClient(url, token)


class FleetClient:
    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self._http = httpx.Client(
            base_url=self.url, timeout=timeout, headers={"Authorization": f"Bearer {token}"}
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(
                0,
                "Controller unreachable",
                f"cannot reach the controller at {self.url} ({exc.__class__.__name__}); "
                "is it running? start one with `fleetvisor up`",
            ) from exc
        if response.is_error:
            raise _api_error(response)
        if response.status_code == 204 or not response.content:
            return None
        if response.headers.get("content-type", "").startswith("text/plain"):
            return response.text
        return response.json()

    # -- meta ------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/healthz")

    def metrics(self) -> str:
        return self.request("GET", "/metrics")

    # -- inventory -------------------------------------------------------------------------

    def sites(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/sites")

    def create_site(self, name: str) -> dict[str, Any]:
        return self.request("POST", "/v1/sites", json={"name": name})

    def delete_site(self, name: str) -> None:
        self.request("DELETE", f"/v1/sites/{name}")

    def clusters(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/clusters")

    def create_cluster(self, name: str, site: str = "default") -> dict[str, Any]:
        return self.request("POST", "/v1/clusters", json={"name": name, "site": site})

    def delete_cluster(self, name: str) -> None:
        self.request("DELETE", f"/v1/clusters/{name}")

    def groups(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/placement-groups")

    def group(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/placement-groups/{name}")

    def create_group(
        self,
        name: str,
        policy: str,
        strength: str = "hard",
        scope: str = "host",
        max_per_scope: int | None = None,
    ) -> dict[str, Any]:
        return self.request(
            "POST",
            "/v1/placement-groups",
            json={
                "name": name,
                "policy": policy,
                "strength": strength,
                "scope": scope,
                "max_per_scope": max_per_scope,
            },
        )

    def delete_group(self, name: str) -> None:
        self.request("DELETE", f"/v1/placement-groups/{name}")

    # -- hosts -----------------------------------------------------------------------------

    def hosts(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/hosts")

    def host(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/hosts/{name}")

    def set_host_state(self, name: str, state: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/hosts/{name}/state", json={"state": state})

    def register_host(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/v1/hosts/register", json=body)

    def heartbeat(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", f"/v1/hosts/{name}/heartbeat", json=body)

    # -- instances -------------------------------------------------------------------------

    def instances(self, host: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("host", host), ("status", status)) if v}
        return self.request("GET", "/v1/instances", params=params)

    def instance(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/instances/{name}")

    def create_instance(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/v1/instances", json=body)

    def create_instances(self, bodies: list[dict[str, Any]]) -> dict[str, Any]:
        return self.request("POST", "/v1/instances/batch", json={"instances": bodies})

    def rebalance(self, max_moves: int, dry_run: bool) -> dict[str, Any]:
        params = {"max_moves": max_moves, "dry_run": dry_run}
        return self.request("POST", "/v1/instances/rebalance", params=params)

    def explain(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/instances/{name}/explain")

    def migrate_instance(
        self, name: str, to: str | None = None, mode: str = "auto"
    ) -> dict[str, Any]:
        body = {"to": to, "mode": mode}
        return dict(self.request("POST", f"/v1/instances/{name}/migrate", json=body))

    def drain_host(self, name: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/hosts/{name}/drain"))

    def start_instance(self, name: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/instances/{name}/start")

    def stop_instance(self, name: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/instances/{name}/stop")

    def delete_instance(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/instances/{name}")

    def scaling_policy(self, name: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/instances/{name}/scaling-policy"))

    def set_scaling_policy(self, name: str, policy: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("PUT", f"/v1/instances/{name}/scaling-policy", json=policy))

    def remove_scaling_policy(self, name: str) -> dict[str, Any]:
        return dict(self.request("DELETE", f"/v1/instances/{name}/scaling-policy"))

    def logs(self, name: str, follow: bool = False, tail: int | None = None) -> Iterator[str]:
        """The instance's output as text chunks; with `follow`, until interrupted."""
        params: dict[str, Any] = {"follow": follow}
        if tail is not None:
            params["tail"] = tail
        try:
            with self._http.stream(
                "GET",
                f"/v1/instances/{name}/logs",
                params=params,
                timeout=httpx.Timeout(10.0, read=None),
            ) as response:
                if response.is_error:
                    response.read()
                    raise _api_error(response)
                yield from response.iter_text()
        except httpx.TransportError as exc:
            raise ApiError(
                0, "Controller unreachable", f"lost the output stream from {self.url}: {exc}"
            ) from exc

    # -- images and the image cache ---------------------------------------------------------

    def images(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/images")

    def image(self, ref: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/images/{ref}")

    def remove_image(self, ref: str) -> None:
        self.request("DELETE", f"/v1/images/{ref}")

    def cache_pins(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/cache/pins")

    def pin_image(self, image: str) -> dict[str, Any]:
        return self.request("POST", "/v1/cache/pins", json={"image": image})

    def unpin_image(self, image: str) -> None:
        self.request("DELETE", f"/v1/cache/pins/{image}")

    def cache_plan(self, budget_bytes: int) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/cache/plan", params={"budget_bytes": budget_bytes})

    # -- operations and events ---------------------------------------------------------------

    def operations(
        self, state: str | None = None, instance: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        if instance:
            params["instance"] = instance
        return self.request("GET", "/v1/operations", params=params)

    def operation(self, op_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/operations/{op_id}")

    def wait_operation(
        self,
        op_id: str,
        timeout: float = 300.0,
        interval: float = 0.1,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the operation ends; returns its final form."""
        deadline = time.monotonic() + timeout
        while True:
            op = self.operation(op_id)
            if on_update:
                on_update(op)
            if op["state"] in TERMINAL:
                return op
            if time.monotonic() > deadline:
                raise ApiError(
                    0,
                    "Timed out",
                    f"operation {op_id} is still {op['state']} "
                    f"(step {op['step'] or '-'}) after {timeout:.0f}s; check it later "
                    f"with `fleetvisor op show {op_id}`",
                )
            time.sleep(interval)
            interval = min(interval * 1.5, 1.0)

    def events(
        self,
        after: int = 0,
        limit: int = 100,
        kind: str | None = None,
        subject: str | None = None,
        tail: bool = False,
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"after": after, "limit": limit, "tail": tail}
        if kind:
            params["kind"] = kind
        if subject:
            params["subject"] = subject
        return self.request("GET", "/v1/events", params=params)

    def follow_events(
        self, after: int = 0, kind: str | None = None, subject: str | None = None
    ) -> Iterator[dict[str, Any]]:
        params: dict[str, Any] = {"after": after}
        if kind:
            params["kind"] = kind
        if subject:
            params["subject"] = subject
        try:
            with self._http.stream(
                "GET", "/v1/events/stream", params=params, timeout=httpx.Timeout(10.0, read=None)
            ) as response:
                if response.is_error:
                    response.read()
                    raise _api_error(response)
                for line in response.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TransportError as exc:
            raise ApiError(
                0, "Controller unreachable", f"lost the event stream from {self.url}: {exc}"
            ) from exc

    # -- measured boot and attestation ---------------------------------------------------

    def enrol_host(
        self, host: str, record: dict[str, Any], release_public_key: str | None = None
    ) -> dict[str, Any]:
        body = {"host": host, "record": record, "release_public_key": release_public_key}
        return self.request("POST", "/v1/trust/enrolments", json=body)

    def enrolments(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/trust/enrolments")

    def publish_release(
        self, signed: dict[str, Any], release_public_key: str | None = None
    ) -> dict[str, Any]:
        body = {"signed": signed, "release_public_key": release_public_key}
        return self.request("POST", "/v1/trust/releases", json=body)

    def releases(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/trust/releases")

    def host_attestation(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/trust/hosts/{name}")

    def attest_host(self, name: str) -> dict[str, Any]:
        """Challenge the host now; the verdict."""
        return self.request("POST", f"/v1/trust/hosts/{name}/attest")

    def assigned_release(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/trust/hosts/{name}/release")

    def attestation_nonce(self, name: str) -> str:
        return str(self.request("POST", f"/v1/trust/hosts/{name}/nonce")["nonce"])

    def submit_evidence(
        self,
        name: str,
        nonce: str,
        evidence: dict[str, Any],
        refusal: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        body = {"nonce": nonce, "evidence": evidence, "refusal": refusal}
        return self.request("POST", f"/v1/trust/hosts/{name}/evidence", json=body)


def _api_error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {"detail": str(body)}
    return ApiError(
        response.status_code,
        str(body.get("title", response.reason_phrase)),
        str(body.get("detail", response.text)),
        body,
    )
