"""`fleetvisor dashboard`: a live terminal view of the fleet (Rich Live), refreshed each second.

┌ hosts: state, CPU and memory allocation bars, live usage, heartbeat age ┐
├ instances by status, operations in flight                              ┤
└ the newest events                                                       ┘
"""

from __future__ import annotations

import time
from collections import Counter

from rich.bar import Bar
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fleetvisor.cli.output import STATE_STYLE, ago, clock, console, styled
from fleetvisor.client import ApiError, FleetClient


def _bar(used: float, total: float, width: int = 20) -> Bar:
    ratio = used / total if total else 0.0
    color = "green" if ratio < 0.7 else "yellow" if ratio < 0.9 else "red"
    return Bar(size=1.0, begin=0.0, end=min(ratio, 1.0), width=width, color=color)


def render(client: FleetClient, events_shown: int = 12) -> Group:
    hosts = client.hosts()
    instances = client.instances()
    ops = client.operations(limit=200)
    recent = client.events(limit=events_shown, tail=True)

    host_table = Table(box=None, header_style="bold", expand=True)
    for column in ("HOST", "STATE", "CPU alloc", "", "MEM alloc", "", "CPU used", "INST", "BEAT"):
        host_table.add_column(column)
    for h in hosts:
        cap, alloc = h["capacity"], h["allocated"]
        used = h["metrics"].get("cpu_millicores", 0.0)
        host_table.add_row(
            h["name"],
            styled(h["state"]),
            _bar(alloc["vcpus"], cap["vcpus"]),
            f"{alloc['vcpus'] / 1000:g}/{cap['vcpus'] / 1000:g}",
            _bar(alloc["memory"], cap["memory"]),
            f"{alloc['memory']}/{cap['memory']} MiB",
            f"{used / 1000:.2f}",
            str(h["instances"]),
            ago(h["last_heartbeat"]),
        )
    by_status = Counter(i["status"] for i in instances)
    status_line = (
        Text.assemble(
            *[
                Text(f" {status} {count} ", style=STATE_STYLE.get(status, ""))
                for status, count in sorted(by_status.items())
            ]
        )
        if by_status
        else Text(" none yet: fleetvisor run NAME --image IMAGE")
    )
    in_flight = [o for o in ops if o["state"] in ("pending", "running")]
    ops_line = Text(
        f" operations in flight: {len(in_flight)}  "
        + ", ".join(f"{o['kind']} {o['instance']}" for o in in_flight[:8])
    )
    event_table = Table(box=None, show_header=False, expand=True)
    event_table.add_column(style="dim", no_wrap=True)
    event_table.add_column(no_wrap=True)
    event_table.add_column()
    for e in recent:
        event_table.add_row(clock(e["at"]), e["kind"], e["message"])
    return Group(
        Panel(host_table, title=f"hosts ({len(hosts)})  {client.url}", border_style="blue"),
        Panel(
            Group(status_line, ops_line), title=f"instances ({len(instances)})", border_style="blue"
        ),
        Panel(event_table, title="events", border_style="blue"),
    )


def run_dashboard(client: FleetClient, interval: float = 1.0, once: bool = False) -> None:
    if once:
        console.print(render(client))
        return
    with Live(render(client), console=console, screen=False, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            try:
                live.update(render(client), refresh=True)
            except ApiError as exc:
                live.update(Panel(Text(f"{exc.detail}\nretrying…", style="red")), refresh=True)


__all__ = ["run_dashboard", "render"]
