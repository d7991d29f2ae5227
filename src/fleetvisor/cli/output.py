"""Printing for the CLI: Rich tables for people, --json for scripts, errors with advice."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(highlight=False, soft_wrap=True)
errors = Console(stderr=True, highlight=False, soft_wrap=True)

STATE_STYLE = {
    "ready": "green",
    "running": "green",
    "succeeded": "green",
    "down": "red",
    "error": "red",
    "failed": "red",
    "rolled_back": "yellow",
    "unknown": "yellow",
    "draining": "yellow",
    "stopped": "dim",
    "pending": "cyan",
    "creating": "cyan",
    "starting": "cyan",
    "stopping": "cyan",
    "deleting": "cyan",
    "running_op": "cyan",
    "trusted": "green",
    "untrusted": "red",
}


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def styled(state: str) -> str:
    style = STATE_STYLE.get(state, "")
    return f"[{style}]{state}[/{style}]" if style else state


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> None:
    t = Table(title=title, header_style="bold", box=None, pad_edge=False)
    for column in columns:
        t.add_column(column)
    for row in rows:
        t.add_row(*(str(cell) if cell is not None else "-" for cell in row))
    console.print(t)


def cpu(millicores: int) -> str:
    return f"{millicores / 1000:g}"


def ago(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    seconds = max(0.0, time.time() - timestamp)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


def fail(message: str, code: int = 1) -> None:
    errors.print(f"[red]error:[/red] {message}")
    raise SystemExit(code)
