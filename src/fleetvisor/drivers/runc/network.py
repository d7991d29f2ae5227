"""Instance networking: one bridge per agent, a netns and a veth pair per instance.

```
 host netns                                  instance netns  fv<agent>-<instance>
 fv<agent>-br  198.18.N.1/24  <── fv<agent>-h<i> ══ veth ══ eth0  198.18.N.i/24
                                                             default via 198.18.N.1
```

- The subnet is a /24 inside 198.18.0.0/15 (the project's own range, never routed
  anywhere else); the bridge takes .1, instances take .2-.254.
- AddressPool (IPAM) keeps instance -> address in a JSON file in the driver's state dir,
  so an address survives stop/start and agent restarts and is reused only after destroy.
- The address slot i also names the host-side veth (`fv<agent>-h<i>`): interface names
  are limited to 15 bytes, too short for an instance id.
- Traffic counters come from the host end of the veth: what the host side receives the
  instance sent, and the other way round.
- No NAT and no route off the host: instances reach each other and the host's bridge
  address, nothing else.
"""

from __future__ import annotations

import ipaddress
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from fleetvisor.drivers.runc import commands
from fleetvisor.errors import DriverError, InvalidInput

PROJECT_RANGE = ipaddress.IPv4Network("198.18.0.0/15")


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """A /24 inside 198.18.0.0/15, or InvalidInput saying what to write."""
    try:
        subnet = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise InvalidInput(
            f"runc driver subnet {text!r} is not a network ({exc}): write e.g. 198.18.7.0/24"
        ) from None
    if subnet.prefixlen != 24 or not subnet.subnet_of(PROJECT_RANGE):
        raise InvalidInput(
            f"runc driver subnet {text} must be a /24 inside {PROJECT_RANGE} (the project's "
            "own range), e.g. 198.18.7.0/24"
        )
    return subnet


def default_subnet(agent_id: str) -> ipaddress.IPv4Network:
    """A /24 picked from the agent id, so agents on one machine usually differ; set the
    `subnet` option explicitly where two agents share a network namespace."""
    slot = int.from_bytes(agent_id.encode(), "big") % 512
    return ipaddress.IPv4Network(f"198.{18 + slot // 256}.{slot % 256}.0/24")


@dataclass(frozen=True)
class Lease:
    address: ipaddress.IPv4Address
    index: int  # host part of the address: also names the host-side veth


class AddressPool:
    """Instance -> address in `subnet`, persisted to `path` after every change."""

    def __init__(self, path: Path, subnet: ipaddress.IPv4Network) -> None:
        self.path = path
        self.subnet = subnet
        self._lock = threading.Lock()

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    def _load(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text())
        if data.get("subnet") != str(self.subnet) and data.get("leases"):
            raise DriverError(
                f"{self.path} holds addresses in {data.get('subnet')}, but the driver was given "
                f"subnet {self.subnet}: keep the old subnet until its instances are destroyed"
            )
        return dict(data.get("leases", {}))

    def _save(self, leases: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"subnet": str(self.subnet), "leases": leases}, indent=1))
        os.replace(tmp, self.path)

    def _lease(self, text: str) -> Lease:
        address = ipaddress.IPv4Address(text)
        return Lease(address, int(address) - int(self.subnet.network_address))

    def get(self, instance_id: str) -> Lease | None:
        with self._lock:
            text = self._load().get(instance_id)
        return self._lease(text) if text else None

    def allocate(self, instance_id: str) -> Lease:
        """The instance's address; a new one (lowest free) on first call."""
        with self._lock:
            leases = self._load()
            if instance_id in leases:
                return self._lease(leases[instance_id])
            taken = {ipaddress.IPv4Address(a) for a in leases.values()} | {self.gateway}
            free = next((a for a in self.subnet.hosts() if a not in taken), None)
            if free is None:
                raise DriverError(
                    f"no free address left in {self.subnet} ({len(leases)} instances): destroy "
                    "instances, or run another agent with its own subnet"
                )
            leases[instance_id] = str(free)
            self._save(leases)
            return self._lease(str(free))

    def release(self, instance_id: str) -> None:
        with self._lock:
            leases = self._load()
            if leases.pop(instance_id, None) is not None:
                self._save(leases)

    def count(self) -> int:
        with self._lock:
            return len(self._load())


def _net_dev() -> dict[str, tuple[int, int]]:
    """Interface -> (rx bytes, tx bytes) in this process's network namespace.

    /proc/net/dev follows the reader's netns; /sys/class/net follows the netns sysfs was
    mounted in, which is not ours when the agent runs under `nsenter --net`.
    """
    table: dict[str, tuple[int, int]] = {}
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, _, fields = line.partition(":")
        values = fields.split()
        if len(values) >= 9:
            table[name.strip()] = (int(values[0]), int(values[8]))
    return table


def link_exists(name: str) -> bool:
    return name in _net_dev()


def netns_exists(name: str) -> bool:
    return (Path("/run/netns") / name).exists()


def counters(host_veth: str) -> tuple[int, int]:
    """(bytes the instance received, bytes it sent), from the host end of its veth."""
    host_rx, host_tx = _net_dev().get(host_veth, (0, 0))
    return host_tx, host_rx


class BridgeNetwork:
    """Creates and removes the agent's bridge and its instances' netns + veth pairs.

    Every step checks before it acts, so each call is idempotent and a half-finished
    attach (agent killed midway) is completed by calling it again.
    """

    def __init__(self, bridge: str, subnet: ipaddress.IPv4Network, timeout: float = 10.0) -> None:
        self.bridge = bridge
        self.subnet = subnet
        self.timeout = timeout
        self._bridge_ready = False

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    async def _ip(self, *args: str) -> str:
        return (await commands.run(["ip", *args], timeout=self.timeout)).stdout

    async def _ip_batch(self, lines: list[str], netns: str | None = None) -> None:
        """Several `ip` commands in one process (each fork+exec costs ~4 ms on a launch)."""
        if lines:
            where = ["-n", netns] if netns else []
            script = ("\n".join(lines) + "\n").encode()
            await commands.run(["ip", *where, "-batch", "-"], timeout=self.timeout, stdin=script)

    async def ensure_bridge(self) -> None:
        if self._bridge_ready and link_exists(self.bridge):
            return
        if not link_exists(self.bridge):
            result = await commands.run(
                ["ip", "link", "add", "name", self.bridge, "type", "bridge"],
                timeout=self.timeout,
                check=False,
            )
            if result.returncode != 0 and not link_exists(self.bridge):  # lost a race: fine
                raise commands.failure(["ip", "link", "add", self.bridge], 1, result.stderr)
        gateway = f"{self.gateway}/{self.subnet.prefixlen}"
        await self._ip_batch(
            [f"addr replace {gateway} dev {self.bridge}", f"link set {self.bridge} up"]
        )
        self._bridge_ready = True

    async def remove_bridge(self) -> None:
        if link_exists(self.bridge):
            await self._ip("link", "del", self.bridge)

    async def attach(self, netns: str, lease: Lease, host_veth: str, peer_veth: str) -> None:
        """Netns `netns` with eth0 = lease.address, default route via the bridge, lo up."""
        await self.ensure_bridge()
        outside = []
        if not netns_exists(netns):
            outside.append(f"netns add {netns}")
        fresh = not link_exists(host_veth)
        if fresh:  # the peer is born inside the netns, already named eth0
            outside.append(f"link add {host_veth} type veth peer name eth0 netns {netns}")
        outside.append(f"link set {host_veth} master {self.bridge} up")
        await self._ip_batch(outside)
        inside = []
        if not fresh:  # an attach cut short before the rename (older agents named it so)
            links = await self._ip("-n", netns, "-o", "link", "show")
            if f" {peer_veth}@" in links or f" {peer_veth}:" in links:
                inside.append(f"link set {peer_veth} name eth0")
        inside += [
            f"addr replace {lease.address}/{self.subnet.prefixlen} dev eth0",
            "link set eth0 up",
            "link set lo up",
            f"route replace default via {self.gateway}",
        ]
        await self._ip_batch(inside, netns)

    async def detach(self, netns: str, host_veth: str | None) -> None:
        """Remove the veth pair and the netns (either may already be gone)."""
        if host_veth and link_exists(host_veth):
            await self._ip("link", "del", host_veth)
        if netns_exists(netns):
            await self._ip("netns", "del", netns)
