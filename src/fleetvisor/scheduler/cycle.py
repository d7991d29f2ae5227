"""PreFilter and the per-cycle state every filter and scoring model reads.

One placement attempt is a cycle. `prepare` checks the request once (known groups,
non-negative resources) and resolves what every stage needs (the resource vector, the
request's hard and soft groups), so the stages themselves do no validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetvisor.errors import InvalidInput
from fleetvisor.scheduler.fleet import FleetSnapshot, Floats, Ints, Mask
from fleetvisor.scheduler.groups import GroupState
from fleetvisor.scheduler.snapshot import PlacementRequest
from fleetvisor.scheduler.telemetry import METRIC_DIMENSION_INDEX


@dataclass(slots=True)
class CycleState:
    fleet: FleetSnapshot
    request: PlacementRequest
    need: Ints  # the request's resource vector (vcpus, memory, disk, net)
    need_key: tuple[int, ...]  # the same, hashable: the request's shape
    hard_groups: tuple[GroupState, ...]
    soft_groups: tuple[GroupState, ...]
    pinned: Mask | None = None  # batch placement restricts a member to these hosts
    pin_reason: str = ""
    scratch: dict[str, Any] = field(default_factory=dict)  # stage-to-stage notes

    @property
    def metric_need(self) -> Floats:
        """The request in the metrics with a history (vcpus, memory, net), as floats."""
        return np.array([self.need_key[i] for i in METRIC_DIMENSION_INDEX], dtype=np.float64)


def prepare(
    fleet: FleetSnapshot,
    request: PlacementRequest,
    pinned: Mask | None = None,
    pin_reason: str = "",
) -> CycleState:
    """PreFilter: validate the request against the snapshot and resolve its groups."""
    if not request.resources.is_nonnegative():
        raise InvalidInput(
            f"resources of {request.describe()} must not be negative in any dimension"
        )
    hard: list[GroupState] = []
    soft: list[GroupState] = []
    for name in request.groups:
        state = fleet.groups.get(name)
        if state is None:
            raise InvalidInput(
                f"placement group {name!r} is not in the scheduler's snapshot; "
                "create it first (fleetvisor group create)"
            )
        (hard if state.spec.hard else soft).append(state)
    shape = request.resources.as_tuple()
    return CycleState(
        fleet=fleet,
        request=request,
        need=np.array(shape, dtype=np.int64),
        need_key=shape,
        hard_groups=tuple(hard),
        soft_groups=tuple(soft),
        pinned=pinned,
        pin_reason=pin_reason,
    )
