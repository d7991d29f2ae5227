"""The trusted_host filter: trust-requiring instances only on trusted hosts; untrusted hosts
take nothing; unknown hosts take the rest. Every rejection names the attestation."""

from __future__ import annotations

import pytest

from fleetvisor.model.resources import Resources
from fleetvisor.scheduler import (
    FleetSnapshot,
    HostCandidate,
    PlacementEngine,
    PlacementFailed,
    PlacementRequest,
    SchedulerConfig,
)

CAP = Resources(4000, 8192, 100, 1000)
NEED = Resources(500, 256)


def host(name: str, attestation: str, reason: str = "") -> HostCandidate:
    return HostCandidate(
        id=name,
        name=name,
        state="ready",
        driver="sim",
        capacity=CAP,
        allocated=Resources(),
        generation=0,
        cluster="c1",
        site="s1",
        attestation=attestation,
        attestation_reason=reason,
    )


def engine(*hosts: HostCandidate) -> PlacementEngine:
    return PlacementEngine(FleetSnapshot(list(hosts)), SchedulerConfig(explain_examples=5))


def test_a_trust_requiring_instance_goes_only_to_trusted_hosts() -> None:
    eng = engine(
        host("a-unknown", "unknown", "not-enrolled"),
        host("b-untrusted", "untrusted", "component-mismatch"),
        host("c-trusted", "trusted", "ok"),
    )
    request = PlacementRequest(NEED, trusted_host=True)
    assert eng.place(request).host.name == "c-trusted"
    why = eng.explain(request).rejected_sample()
    assert why["a-unknown"] == (
        "host attestation is unknown (not-enrolled), and a trusted host is required"
    )
    assert why["b-untrusted"] == "host attestation is untrusted (component-mismatch)"


def test_untrusted_hosts_take_nothing_and_unknown_hosts_take_the_rest() -> None:
    eng = engine(host("a-untrusted", "untrusted", "stale-nonce"), host("b-unknown", "unknown"))
    assert eng.place(PlacementRequest(NEED)).host.name == "b-unknown"
    everyone_unknown = engine(host("a", "unknown"), host("b", "unknown"))
    assert everyone_unknown.place(PlacementRequest(NEED)).host.name == "a"


def test_no_trusted_host_is_an_unsatisfiable_placement_that_says_why() -> None:
    eng = engine(host("a", "unknown"), host("b", "untrusted", "rollback"))
    with pytest.raises(PlacementFailed) as caught:
        eng.place(PlacementRequest(NEED, trusted_host=True, name="vault"))
    assert caught.value.status == 409
    assert "trusted" in caught.value.detail
