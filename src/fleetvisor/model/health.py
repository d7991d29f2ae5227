"""Execution monitoring: what a host watches in a running instance, and what is done about it.

A `HealthPolicy` names probes (exec, HTTP, TCP; liveness or readiness), the detectors'
thresholds, and the remedy for each kind of issue. Hosts run the probes and the
detectors that need the instance's counters; the controller detects what only it can
see (a host down or draining). Every detection is a `Detection` with its evidence.

Remedies escalate: a host restarts an instance in place itself, at most
`max_restarts` times per `restart_window_s`; past that the instance is in a restart
loop, which the controller remedies (by default it migrates the instance). The
controller rate-limits migrations per instance (`max_migrations` per
`migration_window_s`, then `backoff_s` doubling) so a flapping instance is not moved
in a loop.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from fleetvisor.model.specs import Finite, SafeStr


class Issue(StrEnum):
    PROBE_FAILED = "probe_failed"  # a liveness probe failed failure_threshold times
    CPU_THROTTLED = "cpu_throttled"  # the CFS quota held the instance back, sustained
    MEMORY_PRESSURE = "memory_pressure"  # memory in use near its limit, sustained
    OOM_KILLED = "oom_killed"  # the kernel killed a process of the instance
    RESTART_LOOP = "restart_loop"  # restarted in place more than the policy allows
    NOISY_NEIGHBOUR = "noisy_neighbour"  # runnable but waiting for CPU others hold
    EXITED = "exited"  # the instance's main process ended while it should run
    HOST_DOWN = "host_down"  # (controller) its host stopped answering
    HOST_DRAINING = "host_draining"  # (controller) an operator drains its host


class Remedy(StrEnum):
    RESTART = "restart"  # in place, by the host
    MIGRATE = "migrate"  # to another host, by the controller
    ALERT = "alert"  # an event only


DEFAULT_REMEDIES: dict[Issue, Remedy] = {
    Issue.PROBE_FAILED: Remedy.RESTART,
    Issue.EXITED: Remedy.RESTART,
    Issue.OOM_KILLED: Remedy.RESTART,
    Issue.RESTART_LOOP: Remedy.MIGRATE,
    Issue.CPU_THROTTLED: Remedy.ALERT,  # its own limit: another host does not lift it
    Issue.MEMORY_PRESSURE: Remedy.ALERT,
    Issue.NOISY_NEIGHBOUR: Remedy.MIGRATE,
    Issue.HOST_DOWN: Remedy.MIGRATE,
    Issue.HOST_DRAINING: Remedy.MIGRATE,
}


class Probe(BaseModel):
    """A check run from the host against the instance, like a Kubernetes probe."""

    kind: Literal["exec", "http", "tcp"]
    role: Literal["liveness", "readiness"] = "liveness"
    command: Annotated[
        list[Annotated[SafeStr, StringConstraints(max_length=4096)]], Field(max_length=64)
    ] = []
    port: int | None = Field(None, ge=1, le=65535)
    path: Annotated[SafeStr, StringConstraints(pattern=r"^/[!-~]{0,255}$")] = "/"
    interval_s: Finite = Field(5.0, ge=0.1, le=3600)
    timeout_s: Finite = Field(1.0, gt=0, le=600)
    failure_threshold: int = Field(3, ge=1, le=100)
    success_threshold: int = Field(1, ge=1, le=100)
    initial_delay_s: Finite = Field(0.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _target(self) -> Probe:
        if self.kind == "exec" and not self.command:
            raise ValueError('an exec probe needs a command, e.g. ["cat", "/tmp/healthy"]')
        if self.kind in ("http", "tcp") and self.port is None:
            raise ValueError(f"a {self.kind} probe needs the port the instance listens on")
        return self


class Detectors(BaseModel):
    """Thresholds of the host-side detectors. A sustained issue is held for `hold_s`."""

    hold_s: Finite = Field(5.0, ge=0, le=3600, description="a condition held this long")
    throttled: Finite = Field(
        0.5, gt=0, le=1, description="share of CFS periods throttled (cpu_throttled)"
    )
    memory: Finite = Field(
        0.9, gt=0, le=1, description="memory in use / memory allocated (memory_pressure)"
    )
    cpu_wait: Finite = Field(
        0.5,
        gt=0,
        le=64,
        description="CPU-seconds waiting on a run queue per second (noisy_neighbour)",
    )


class HealthPolicy(BaseModel):
    """Probes, detector thresholds and remedies for one instance."""

    probes: Annotated[list[Probe], Field(max_length=8)] = []
    detectors: Detectors = Field(default_factory=lambda: Detectors.model_validate({}))
    remedies: dict[Issue, Remedy] = {}  # overrides of DEFAULT_REMEDIES
    max_restarts: int = Field(3, ge=0, le=1000, description="in-place restarts per window")
    restart_window_s: Finite = Field(300.0, gt=0, le=86_400)
    max_migrations: int = Field(2, ge=0, le=1000, description="migrations per window")
    migration_window_s: Finite = Field(3600.0, gt=0, le=604_800)
    backoff_s: Finite = Field(30.0, ge=0, le=86_400, description="first wait after a remedy")

    @model_validator(mode="after")
    def _remedies(self) -> HealthPolicy:
        for issue, remedy in self.remedies.items():
            if remedy == Remedy.RESTART and issue in (Issue.HOST_DOWN, Issue.HOST_DRAINING):
                raise ValueError(f"{issue}: a host that is down or drained cannot restart it")
        return self

    def remedy(self, issue: Issue) -> Remedy:
        return self.remedies.get(issue, DEFAULT_REMEDIES[issue])

    def digest(self) -> str:
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Detection(BaseModel):
    """One detected issue with its evidence; hosts send them with the next heartbeat."""

    issue: Issue
    instance: Annotated[SafeStr, StringConstraints(max_length=64)]  # instance id
    at: Finite  # the host's wall clock when the issue was confirmed
    since: Finite | None = None  # when the condition began (a sustained issue)
    message: Annotated[SafeStr, StringConstraints(max_length=1000)] = ""
    evidence: dict[Annotated[SafeStr, StringConstraints(max_length=64)], Finite | str] = {}
    # What the host did about it itself ("restart", or "" when it left it to the fleet).
    action: Annotated[SafeStr, StringConstraints(max_length=32)] = ""
