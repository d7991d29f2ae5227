"""End to end: virtual machines on a two-host `fleetvisor up --driver qemu` fleet.

A VM image built and pushed with `image build-vm`, run, then live-migrated host to host
over QMP while its guest counts on the serial console: the count goes on on the target
(no reboot), cold migration boots it again, a drain empties a host, and nothing of the
fleet (no QEMU process) is left when it stops.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetvisor.drivers.qemu.prereqs import qemu_missing

from .conftest import Fleet, running, wait_for

COUNTER = re.compile(r"^fv-counter (\d+) ", re.M)


pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def vm_fleet(tmp_path: Path) -> Iterator[Fleet]:
    missing = qemu_missing()
    if missing:
        print(f"\nskipping the VM fleet test: {missing}")
        pytest.skip(missing)
    fleet = Fleet(
        tmp_path / "state",
        hosts=2,
        up_args=["--driver", "qemu", "--heartbeat-interval", "0.5", "--down-after", "6"],
        start_timeout=120.0,
    )
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.shutdown()
        left = [(pid, argv[:3]) for pid, argv in fleet.all_pids() if running(pid, argv)]
        qemu = [p for p in Path("/proc").glob("[0-9]*") if _qemu_of(p, tmp_path)]
        assert not left and not qemu, f"left running: {left} {qemu}"


def _qemu_of(proc: Path, root: Path) -> bool:
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(argv)
        and argv[0].endswith(b"qemu-system-x86_64")
        and str(root).encode() in b" ".join(argv)
    )


def counts(fleet: Fleet, name: str) -> list[int]:
    return [int(n) for n in COUNTER.findall(fleet.cli("logs", name).stdout)]


def host_of(fleet: Fleet, name: str) -> str:
    return str(next(i for i in fleet.instances() if i["name"] == name)["host"])


def migrate(fleet: Fleet, name: str, *options: str) -> dict[str, Any]:
    op: dict[str, Any] = json.loads(
        fleet.cli("migrate", name, *options, "--json", timeout=180).stdout
    )
    assert op["state"] == "succeeded", op
    return op


def test_vm_live_migration_between_hosts_keeps_the_guest_running(vm_fleet: Fleet) -> None:
    fleet = vm_fleet
    fleet.cli("image", "build-vm", "vm:latest", timeout=300)
    fleet.cli("run", "vm1", "--image", "vm:latest", "--cpu", "0.5", "--memory", "256M", timeout=180)
    wait_for("the guest to count", lambda: len(counts(fleet, "vm1")) >= 3, 60)
    source = host_of(fleet, "vm1")
    last = counts(fleet, "vm1")[-1]

    op = migrate(fleet, "vm1", "--live")
    print(f"\nVM live migration: {op['result']}")
    assert op["result"]["mode"] == "live" and host_of(fleet, "vm1") != source
    wait_for("the count to go on", lambda: len(counts(fleet, "vm1")) >= 2, 30)
    after = counts(fleet, "vm1")  # the target's console
    assert after[0] > last and after == list(range(after[0], after[-1] + 1)), (last, after)

    # A cold migration carries the disk overlay (the VM boots again on its own disk).
    op = migrate(fleet, "vm1", "--cold")
    assert op["result"]["mode"] == "cold" and host_of(fleet, "vm1") == source
    assert op["result"]["package_bytes"] > 0  # the disk overlay travelled
    wait_for("the guest to boot again and count", lambda: counts(fleet, "vm1")[:1] == [0], 60)

    answer = json.loads(fleet.cli("drain", source, "--json", timeout=300).stdout)
    assert [o["state"] for o in answer["operations"]] == ["succeeded"]
    assert host_of(fleet, "vm1") != source
    fleet.cli("rm", "vm1", timeout=120)
