"""Soft placement groups: their rules become preferences instead of filters.

Per soft group of the request, at the group's scope:
- anti-affinity: 1 while the host's domain is under the group's max (default 1),
  then 1 / (2 + members − max): each extra member there costs more.
- affinity: 1 in a domain that has members and room; 0 elsewhere, unless the group
  has no members yet or every domain with members is full (then any domain is 1).
The model's score is the mean over the request's soft groups.
"""

from __future__ import annotations

import numpy as np

from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.fleet import Floats, Hosts
from fleetvisor.scheduler.scoring.base import ScoringModel


class GroupPreference(ScoringModel):
    name = "group_preference"
    per_host = False  # a member placed anywhere in a domain changes the domain's hosts

    def applies(self, cycle: CycleState) -> bool:
        return bool(cycle.soft_groups)

    def score(self, cycle: CycleState, hosts: Hosts) -> Floats:
        total = np.zeros(len(cycle.fleet))[hosts]
        for group in cycle.soft_groups:
            members = cycle.fleet.members_near(group)[hosts]
            limit = group.spec.limit
            if group.spec.anti:
                assert limit is not None
                over = np.maximum(members - limit, -1)
                total += np.where(members < limit, 1.0, 1.0 / (2.0 + over))
                continue
            if group.total == 0:
                total += 1.0
                continue
            with_room = [c for c in group.in_scope().values() if limit is None or c < limit]
            if with_room:
                room = members < limit if limit is not None else True
                total += ((members > 0) & room).astype(np.float64)
            else:
                total += (members == 0).astype(np.float64)
        return total / len(cycle.soft_groups)
