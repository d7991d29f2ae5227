"""Host networks of a local fleet: each host its own network namespace and address.

    root namespace: bridge fv<id>br  198.18.N.1/24   <- the controller listens here
        ├─ veth fv<id>h1 ── netns fv<id>-h1: eth0 198.18.N.11/24, default via .1
        ├─ veth fv<id>h2 ── netns fv<id>-h2: eth0 198.18.N.12/24
        ...
Agents run in their namespace (`nsenter --net`, which leaves the mount namespace
shared so their overlay mounts stay visible to a restarted agent). Killing a host's
agent or cutting its veth is then a real host failure. Names carry the fleet id, a
hash of the state dir, so a later `up` on the same state dir can remove leftovers.
"""

from __future__ import annotations

import hashlib
import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostNet:
    name: str
    netns: str
    address: str  # without prefix length
    instance_subnet: str  # for the host's own instance bridge (runc driver)


class FleetNetworkError(Exception):
    pass


def fleet_id(state_dir: Path) -> str:
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:5]


class FleetNetwork:
    def __init__(self, state_dir: Path) -> None:
        self.id = fleet_id(state_dir)
        self.prefix = f"fv{self.id}"
        self.bridge = f"{self.prefix}br"
        self.subnet = self._pick_subnet()
        self.gateway = str(self.subnet.network_address + 1)

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        """198.18.N.0/24 with N from the fleet id, moved on while another uses it."""
        used = _run(["ip", "-o", "-4", "addr", "show"], check=False)
        start = int(self.id, 16) % 200 + 20
        for n in range(start, start + 200):
            subnet = ipaddress.IPv4Network(f"198.18.{n % 250}.0/24")
            mine = f"{subnet.network_address + 1}/24" in used and self.bridge in used
            if mine or f" 198.18.{n % 250}." not in used:
                return subnet
        raise FleetNetworkError("no free /24 left in 198.18.0.0/16 for a fleet network")

    def create(self, hosts: int) -> list[HostNet]:
        self.destroy()  # leftovers of a fleet that died without cleaning up
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        nets = []
        for i in range(1, hosts + 1):
            netns, outside, inside = (
                f"{self.prefix}-h{i}",
                f"{self.prefix}h{i}",
                f"{self.prefix}i{i}",
            )
            address = str(self.subnet.network_address + 10 + i)
            _run(["ip", "netns", "add", netns])
            _run(["ip", "link", "add", outside, "type", "veth", "peer", "name", inside])
            _run(["ip", "link", "set", outside, "master", self.bridge, "up"])
            _run(["ip", "link", "set", inside, "netns", netns])
            inns = ["ip", "-n", netns]
            _run([*inns, "link", "set", inside, "name", "eth0"])
            _run([*inns, "addr", "add", f"{address}/24", "dev", "eth0"])
            _run([*inns, "link", "set", "eth0", "up"])
            _run([*inns, "link", "set", "lo", "up"])
            _run([*inns, "route", "add", "default", "via", self.gateway])
            nets.append(HostNet(f"host-{i}", netns, address, f"198.19.{i % 256}.0/24"))
        return nets

    def destroy(self) -> None:
        """Remove this fleet's namespaces, veths and bridge (idempotent)."""
        for netns in _run(["ip", "netns", "list"], check=False).splitlines():
            name = netns.split()[0] if netns.strip() else ""
            if name.startswith(f"{self.prefix}-h"):
                _run(["ip", "netns", "delete", name], check=False)
        for line in _run(["ip", "-o", "link", "show"], check=False).splitlines():
            parts = line.split(":")
            if len(parts) > 1:
                link = parts[1].strip().split("@")[0]
                if link.startswith(self.prefix):
                    _run(["ip", "link", "delete", link], check=False)

    @staticmethod
    def enter(netns: str) -> list[str]:
        """Command prefix that runs a program in `netns` (network only)."""
        return ["nsenter", f"--net=/run/netns/{netns}", "--"]


def _run(argv: list[str], check: bool = True) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise FleetNetworkError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout
