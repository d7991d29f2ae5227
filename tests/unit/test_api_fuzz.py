"""Schemathesis fuzzing of the controller's OpenAPI spec against the in-process app."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from fleetvisor.api.app import create_app
from fleetvisor.controller.core import Controller
from fleetvisor.model.specs import HostInfo, ResourceVector

HOST = "fuzz-host"
STREAM = "/v1/events/stream"
HEARTBEAT = "/v1/hosts/{name}/heartbeat"


STATE = tempfile.TemporaryDirectory(prefix="fleetvisor-fuzz-")  # one SQLite store per module


def _fleet() -> tuple[Controller, str]:
    """A prepared controller with one ready host, and that host's token."""
    controller = Controller(state_dir=Path(STATE.name))
    controller.prepare()
    registration = controller.hosts.register(
        name=HOST,
        cluster="default",
        agent_url="http://127.0.0.1:9",
        agent_token="t" * 32,
        info=HostInfo(
            capacity=ResourceVector(vcpus=64_000, memory=262_144), cpu_model="x", driver="sim"
        ),
        labels={},
        instances=[],
    )
    return controller, registration.token


# Built at import: schemathesis' lazy `from_fixture` does not run on this pytest version.
CONTROLLER, HOST_TOKEN = _fleet()
APP = create_app(CONTROLLER, run_loops=False)
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", APP, headers={"Authorization": f"Bearer {CONTROLLER.admin_token}"}
)


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> Iterator[None]:
    yield
    CONTROLLER.db.dispose()
    STATE.cleanup()


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case: schemathesis.Case) -> None:
    """No generated request, valid or not, makes any endpoint answer 5xx."""
    token = CONTROLLER.admin_token
    if case.path == HEARTBEAT:  # agents only: fuzz it with the host's own token and name
        token, case.path_parameters = HOST_TOKEN, {"name": HOST}
    if isinstance(case.body, dict) and isinstance(case.body.get("name"), str):
        # Reach past the name check (a DNS label) into placement, storage and listings.
        case.body["name"] = (
            "n" + hashlib.sha1(case.body["name"].encode(errors="replace")).hexdigest()[:8]
        )
    if case.path == STREAM:  # the stream ends after max_seconds: keep each case short
        case.query = {**(case.query or {}), "max_seconds": 0.01}
    case.call_and_validate(
        headers={"Authorization": f"Bearer {token}"}, checks=[not_a_server_error]
    )


SURROGATE = "\ud800"  # json.dumps escapes it: valid JSON, but text with no UTF-8 form
RESOURCES = {"vcpus": 1, "memory": 1}
SURROGATE_BODIES = {
    "register-cpu-model": (
        "/v1/hosts/register",
        {
            "name": "h1",
            "agent_url": "http://a:1",
            "agent_token": "t" * 32,
            "info": {"capacity": {}, "cpu_model": SURROGATE, "driver": "sim"},
        },
    ),
    "heartbeat-report-id": (
        f"/v1/hosts/{HOST}/heartbeat",
        {"instances": [{"id": SURROGATE, "name": "x", "state": "running", "resources": {}}]},
    ),
    "instance-image": ("/v1/instances", {"name": "i1", "image": SURROGATE, "resources": RESOURCES}),
    "instance-env": (
        "/v1/instances",
        {"name": "i2", "image": "x", "resources": RESOURCES, "env": {"k": SURROGATE}},
    ),
}


@pytest.mark.parametrize("case_id", SURROGATE_BODIES)
def test_lone_surrogates_are_refused(case_id: str) -> None:
    """Text with no UTF-8 form is a 422 at the edge, not a 500 or a poisoned listing later."""
    path, body = SURROGATE_BODIES[case_id]
    token = HOST_TOKEN if path.endswith("/heartbeat") else CONTROLLER.admin_token
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    client = TestClient(APP)
    assert client.post(path, content=json.dumps(body), headers=headers).status_code == 422
    admin = {"Authorization": f"Bearer {CONTROLLER.admin_token}"}
    for listing in ("/v1/hosts", "/v1/instances", "/v1/events?tail=true"):
        assert client.get(listing, headers=admin).status_code == 200
