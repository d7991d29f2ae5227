"""Local scaling: the policy a host's scaling manager applies, and the exact carve arithmetic.

A policy says when to carve part of an instance's resources into a sibling on the same
host (a metric held at or above `above` for `hold_s`), how much (`carve_fraction`), how
far (`max_siblings`, `min_parent`), how often (`cooldown_s`), and when to fold the
siblings back (every metric at or below `below` for `fold_hold_s`).

Metrics, measured at the host over the parent and its siblings together:
  cpu        CPU time used / CPU allocated                        (fraction)
  memory     memory in use / memory allocated                     (fraction)
  throttled  share of wall time the CFS quota held the group back (fraction)
  latency    round trip of an HTTP probe to the service endpoint  (milliseconds)
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from fleetvisor.errors import InvalidInput
from fleetvisor.model.resources import DIMENSIONS, Resources
from fleetvisor.model.specs import Finite, ResourceVector, SafeStr

Metric = Literal["cpu", "memory", "throttled", "latency"]
# The label a sibling carries: the id of the instance it was carved from.
PARENT_LABEL = "fleetvisor.io/parent"
METRICS: tuple[str, ...] = ("cpu", "memory", "throttled", "latency")
FRACTION_METRICS = ("cpu", "memory", "throttled")


class ScalingTrigger(BaseModel):
    metric: Metric
    above: Finite = Field(gt=0, le=100_000, description="carve at or above this value")
    below: Finite = Field(ge=0, le=100_000, description="fold at or below this value")

    @model_validator(mode="after")
    def _hysteresis(self) -> ScalingTrigger:
        if self.below >= self.above:
            raise ValueError(
                f"{self.metric}: the fold threshold ({self.below:g}) must be below the carve "
                f"threshold ({self.above:g}), or the manager would carve and fold in a loop"
            )
        return self


class ScalingPolicy(BaseModel):
    """When and how a host carves an instance into siblings, and folds them back."""

    triggers: Annotated[list[ScalingTrigger], Field(min_length=1, max_length=4)]
    hold_s: Finite = Field(2.0, ge=0, le=3600, description="carve trigger held this long")
    fold_hold_s: Finite = Field(10.0, ge=0, le=86_400, description="fold condition held")
    cooldown_s: Finite = Field(30.0, ge=0, le=86_400, description="quiet time after an action")
    carve_fraction: Finite = Field(
        0.5, gt=0, lt=1, description="share of the parent's current resources a sibling gets"
    )
    max_siblings: int = Field(
        1, ge=0, le=16, description="at most this many siblings; 0: an endpoint, never a carve"
    )
    min_parent: ResourceVector = Field(
        default_factory=lambda: ResourceVector(vcpus=100, memory=32, disk=0, net=0),
        description="the parent never drops below this",
    )
    service_port: int | None = Field(
        None, ge=1, le=65535, description="port the service listens on in each member"
    )
    listen_port: int | None = Field(
        None, ge=1, le=65535, description="host port of the service endpoint (default: any)"
    )
    probe_path: Annotated[SafeStr, StringConstraints(pattern=r"^/[!-~]{0,255}$")] = "/"

    @model_validator(mode="after")
    def _consistent(self) -> ScalingPolicy:
        metrics = [t.metric for t in self.triggers]
        if len(set(metrics)) != len(metrics):
            raise ValueError("each metric may appear once in a policy's triggers")
        for trigger in self.triggers:
            if trigger.metric in FRACTION_METRICS and trigger.above > 10:
                raise ValueError(
                    f"{trigger.metric} is a fraction of the allocation (e.g. 0.8), "
                    f"not {trigger.above:g}"
                )
        if "latency" in metrics and self.service_port is None:
            raise ValueError("a latency trigger probes the service: set service_port")
        if self.listen_port is not None and self.service_port is None:
            raise ValueError("listen_port needs service_port: the endpoint forwards to it")
        return self

    def digest(self) -> str:
        """A short fingerprint, so host and controller can tell whether they agree."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        triggers = ", ".join(
            f"{t.metric} ≥ {t.above:g} (fold ≤ {t.below:g})" for t in self.triggers
        )
        return (
            f"{triggers}; hold {self.hold_s:g}s, carve {self.carve_fraction:.0%}, "
            f"≤ {self.max_siblings} sibling(s), cooldown {self.cooldown_s:g}s"
        )


def policy_digest(policy: ScalingPolicy | dict | None) -> str | None:
    if policy is None:
        return None
    if isinstance(policy, dict):
        policy = ScalingPolicy.model_validate(policy)
    return policy.digest()


def carve(
    current: Resources, fraction: float, min_parent: Resources
) -> tuple[Resources, Resources]:
    """Split `current` into (what the parent keeps, what the sibling gets), exactly.

    Every dimension is split by the same fraction and rounded down for the sibling, so
    kept + carved == current to the unit. Raises InvalidInput when the parent would
    drop below `min_parent` or the sibling would get no CPU or no memory.
    """
    carved = Resources(*(int(value * fraction) for value in current.as_tuple()))
    kept = current - carved
    if carved.vcpus <= 0 or carved.memory <= 0:
        raise InvalidInput(
            f"carving {fraction:.0%} of {current.describe()} leaves the sibling no CPU or "
            "memory; raise carve_fraction or the instance's size"
        )
    short = [
        name
        for name, have, need in zip(DIMENSIONS, kept.as_tuple(), min_parent.as_tuple(), strict=True)
        if have < need
    ]
    if short:
        raise InvalidInput(
            f"carving {fraction:.0%} would leave the parent {kept.describe()}, below its "
            f"minimum in {', '.join(short)}; lower carve_fraction or min_parent"
        )
    return kept, carved


NoticeKind = Literal["carved", "folded", "refused"]


class ScalingNotice(BaseModel):
    """What a host's scaling manager did, sent to the controller with the next heartbeat."""

    kind: NoticeKind
    parent: Annotated[SafeStr, StringConstraints(max_length=64)]
    child: Annotated[SafeStr, StringConstraints(max_length=64)] | None = None
    child_name: Annotated[SafeStr, StringConstraints(max_length=253)] | None = None
    resources: ResourceVector | None = None  # what the sibling got (carved) or gave back
    reason: Annotated[SafeStr, StringConstraints(max_length=1000)] = ""
    reaction_s: Finite | None = None  # trigger -> sibling serving its first request
    at: Finite = 0.0  # host's wall clock
