"""Health policies from command-line flags: `--probe`, `--remedy`, `--health JSON`."""

from __future__ import annotations

import json
import shlex
from typing import Any

import typer
from pydantic import ValidationError

from fleetvisor.model.health import HealthPolicy, Issue, Remedy

PROBE_KEYS = {"every": "interval_s", "fail": "failure_threshold", "timeout": "timeout_s"}


def parse_probe(text: str) -> dict[str, Any]:
    """'http:8080/healthz;every=2;fail=3' -> a Probe as a dict."""
    target, *options = text.split(";")
    kind, _, rest = target.partition(":")
    probe: dict[str, Any] = {"kind": kind}
    if kind == "exec" and rest:
        probe["command"] = shlex.split(rest)
    elif kind in ("tcp", "http") and rest:
        port, slash, path = rest.partition("/")
        if not port.isdigit():
            raise typer.BadParameter(f"{text!r}: the port must be a number, e.g. {kind}:8080")
        probe["port"] = int(port)
        if kind == "http":
            probe["path"] = slash + path if slash else "/"
    else:
        raise typer.BadParameter(
            f"{text!r}: write tcp:PORT, http:PORT/PATH or exec:COMMAND, "
            "e.g. 'exec:cat /tmp/healthy;every=1;fail=2'"
        )
    for option in options:
        key, _, value = option.partition("=")
        if key not in PROBE_KEYS:
            raise typer.BadParameter(
                f"{text!r}: unknown probe option {key!r}; use {', '.join(PROBE_KEYS)}"
            )
        probe[PROBE_KEYS[key]] = float(value) if key != "fail" else int(value)
    return probe


def parse_remedy(text: str) -> tuple[str, str]:
    issue, _, remedy = text.partition("=")
    if issue not in set(Issue) or remedy not in set(Remedy):
        raise typer.BadParameter(
            f"{text!r}: write ISSUE=REMEDY with ISSUE one of {', '.join(Issue)} and REMEDY one "
            f"of {', '.join(Remedy)}"
        )
    return issue, remedy


def health_policy(probes: list[str], remedies: list[str], whole: str | None) -> dict[str, Any]:
    """The policy the flags describe, validated here so a mistake is told before the API."""
    try:
        policy: dict[str, Any] = json.loads(whole) if whole else {}
    except ValueError as exc:
        raise typer.BadParameter(f"--health is not JSON: {exc}") from None
    if probes:
        policy["probes"] = [*policy.get("probes", []), *(parse_probe(p) for p in probes)]
    if remedies:
        policy["remedies"] = {**policy.get("remedies", {}), **dict(map(parse_remedy, remedies))}
    try:
        return HealthPolicy.model_validate(policy).model_dump(mode="json")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise typer.BadParameter(f"health policy: {problems}") from None
