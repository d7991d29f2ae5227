"""VM networking: a tap per instance on the agent's bridge, addresses from the same IPAM
as the runc driver (drivers/runc/network.py: AddressPool, BridgeNetwork, reused as is).

```
 host: fv<agent>-qbr 198.18.N.1/24 <── tap fv<agent>-t<i> ══ QEMU virtio-net ══ eth0 198.18.N.i
```

The guest configures eth0 itself from `fv_ip=` / `fv_gw=` on its kernel command line.
The tap is created here (not by QEMU) so it survives QEMU restarts and stays on the
bridge; a restored or migrated-in guest keeps the address it booted with.
"""

from __future__ import annotations

from fleetvisor.drivers.runc import commands
from fleetvisor.drivers.runc.network import BridgeNetwork, link_exists


async def attach_tap(network: BridgeNetwork, tap: str, timeout: float = 10.0) -> None:
    """Tap `tap` on the bridge, up. Idempotent."""
    await network.ensure_bridge()
    lines = []
    if not link_exists(tap):
        lines.append(f"tuntap add dev {tap} mode tap")
    lines += [f"link set {tap} master {network.bridge}", f"link set {tap} up"]
    script = ("\n".join(lines) + "\n").encode()
    await commands.run(["ip", "-batch", "-"], timeout=timeout, stdin=script)


async def detach_tap(tap: str, timeout: float = 10.0) -> None:
    if link_exists(tap):
        await commands.run(["ip", "link", "del", tap], timeout=timeout)
