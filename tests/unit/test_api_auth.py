"""Auth of the controller API, proven over every route the app serves (not a hand-written list)."""

from __future__ import annotations

import re
import stat
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient

from fleetvisor.api.app import create_app
from fleetvisor.controller.core import Controller
from fleetvisor.controller.tokens import ADMIN_TOKEN_FILE

PUBLIC = {"/healthz"}
HOST_ONLY = {"/v1/hosts/{name}/heartbeat"}
ADMIN_OR_HOST = {"/v1/cache/plan"}  # agents read their prepopulation plan


def _register_body(name: str) -> dict[str, object]:
    return {
        "name": name,
        "agent_url": "http://10.0.0.1:7001",
        "agent_token": "a" * 32,
        "info": {
            "capacity": {"vcpus": 4000, "memory": 8192, "disk": 100, "net": 1000},
            "cpu_model": "test-cpu",
            "driver": "sim",
        },
    }


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Controller:
    controller = Controller(state_dir=tmp_path_factory.mktemp("state"))
    controller.prepare()
    return controller


@pytest.fixture(scope="module")
def app(controller: Controller) -> FastAPI:
    return create_app(controller, run_loops=False)


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def host_tokens(client: TestClient, controller: Controller) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {controller.admin_token}"}
    tokens = {}
    for name in ("host-a", "host-b"):
        answer = client.post("/v1/hosts/register", json=_register_body(name), headers=admin)
        assert answer.status_code == 201, answer.text
        tokens[name] = answer.json()["token"]
    return tokens


def _endpoints(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every API route, included routers flattened; path converters
    ({ref:path}) written as the spec writes them ({ref})."""
    return sorted(
        (method, re.sub(r":\w+}", "}", route.path))
        for route in iter_route_contexts(app.routes)
        if isinstance(route.original_route, APIRoute)
        for method in route.methods or ()
    )


def _url(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", path)


def _assert_problem(answer, status: int) -> None:  # type: ignore[no-untyped-def]
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["status"] == status


def test_routes_match_openapi(app: FastAPI) -> None:
    """Every served route is in the OpenAPI spec and vice versa, so iterating routes is complete."""
    spec = {
        (method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item
    }
    assert set(_endpoints(app)) == spec | {("GET", "/openapi.json")}  # the spec, served too
    assert len(spec) > 20


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
    ids=["missing", "wrong", "empty", "not-bearer"],
)
def test_every_endpoint_needs_a_token(
    app: FastAPI, client: TestClient, headers: dict[str, str]
) -> None:
    """Every endpoint but /healthz answers 401 problem+json with WWW-Authenticate: Bearer."""
    checked = 0
    for method, path in _endpoints(app):
        if path in PUBLIC:
            continue
        answer = client.request(method, _url(path), headers=headers)
        _assert_problem(answer, 401)
        assert answer.headers["www-authenticate"] == "Bearer", (method, path)
        checked += 1
    assert checked == len(_endpoints(app)) - len(PUBLIC)


def test_healthz_is_public(client: TestClient) -> None:
    """/healthz, the one public endpoint, answers without a token."""
    assert client.get("/healthz").status_code == 200


def test_host_token_is_refused_on_admin_endpoints(
    app: FastAPI, client: TestClient, host_tokens: dict[str, str]
) -> None:
    """A host-scoped token gets 403 problem+json on every admin endpoint."""
    headers = {"Authorization": f"Bearer {host_tokens['host-a']}"}
    for method, path in _endpoints(app):
        if path in PUBLIC | HOST_ONLY | ADMIN_OR_HOST:
            continue
        _assert_problem(client.request(method, _url(path), headers=headers), 403)
    for path in ADMIN_OR_HOST:
        assert client.get(path, headers=headers).status_code == 200


def test_host_token_heartbeats_only_for_its_host(
    client: TestClient, host_tokens: dict[str, str]
) -> None:
    """A host token heartbeats for its own host (200) but not for another host's name (403)."""
    headers = {"Authorization": f"Bearer {host_tokens['host-a']}"}
    assert client.post("/v1/hosts/host-a/heartbeat", json={}, headers=headers).status_code == 200
    for other in ("host-b", "no-such-host"):
        _assert_problem(client.post(f"/v1/hosts/{other}/heartbeat", json={}, headers=headers), 403)


def test_admin_token_file_is_private(controller: Controller) -> None:
    """The admin token file in the state dir has mode 0600 and holds the served token."""
    path = controller.state_dir / ADMIN_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == controller.admin_token
