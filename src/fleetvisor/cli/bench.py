"""`fleetvisor bench ...`: benchmarks that print JSON with a baseline measured in the same run."""

from __future__ import annotations

import typer

bench_app = typer.Typer(
    help="Benchmarks: each prints JSON with its figure and a baseline measured in the same run.",
    no_args_is_help=True,
)
