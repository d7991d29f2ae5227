"""First-fit placement: filters with reasons, deterministic order."""

import pytest

from fleetvisor.errors import InsufficientCapacity
from fleetvisor.model.resources import Resources
from fleetvisor.scheduler import HostCandidate, PlacementRequest, first_fit

CAP = Resources(4000, 8192, 100, 1000)


def host(
    name: str, allocated: Resources = Resources(), state: str = "ready", driver: str = "sim"
) -> HostCandidate:
    return HostCandidate(
        id=name,
        name=name,
        state=state,
        driver=driver,
        capacity=CAP,
        allocated=allocated,
        generation=0,
    )


def test_picks_first_host_by_name_that_fits() -> None:
    hosts = [host("h3"), host("h1", Resources(3800, 0, 0, 0)), host("h2")]
    decision = first_fit(hosts, PlacementRequest(Resources(500, 256, 1, 10)))
    assert decision.host.name == "h2"
    assert "h1" in decision.rejected and "cpu" in decision.rejected["h1"]


def test_rejects_hosts_not_ready_or_of_another_driver() -> None:
    hosts = [host("a", state="down"), host("b", driver="qemu"), host("c")]
    decision = first_fit(hosts, PlacementRequest(Resources(1, 1), driver="sim"))
    assert decision.host.name == "c"
    assert "down" in decision.rejected["a"]
    assert "qemu" in decision.rejected["b"]


def test_no_fit_explains_every_host() -> None:
    with pytest.raises(InsufficientCapacity) as info:
        first_fit([host("a"), host("b")], PlacementRequest(Resources(5000, 1)))
    assert "a: not enough cpu (short by 1)" in info.value.detail
    assert "add hosts" in info.value.detail


def test_no_hosts_says_how_to_add_one() -> None:
    with pytest.raises(InsufficientCapacity, match="fleetvisor up"):
        first_fit([], PlacementRequest(Resources(1, 1)))
