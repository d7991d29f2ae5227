"""The scheduler's user-facing failure: no placement satisfies the hard constraints.

A subclass of InsufficientCapacity (409), so the API maps it as before; it carries
the constraint that failed, where (domain -> reason), and the full explanation.
"""

from __future__ import annotations

from collections.abc import Mapping

from fleetvisor.errors import InsufficientCapacity
from fleetvisor.scheduler.explain import Explanation


class PlacementFailed(InsufficientCapacity):
    def __init__(
        self,
        detail: str,
        *,
        constraint: str,
        where: Mapping[str, str] | None = None,
        explanation: Explanation | None = None,
        request: str = "",
    ) -> None:
        rejected = explanation.rejected_sample() if explanation else {}
        super().__init__(
            detail,
            constraint=constraint,
            where=dict(where or {}),
            rejected=rejected,
            request=request,
        )
        self.constraint = constraint
        self.where = dict(where or {})
        self.explanation = explanation
        self.rejected = rejected
