"""The placement engine: PreFilter → Filter → Score (+ NormalizeScore, weights) → Reserve.

    request ─ prepare (PreFilter: validate, resolve groups)
            ─ filters (filtering.py: hard rules as masks over all hosts)
            ─ scoring models (ranking.py: normalized, weighed, summed per host)
            ─ best feasible host (ties: first by name)
            ─ reserve in the snapshot (assign), so the next placement sees it

Bind is the controller's: it reserves the decision in the store in one transaction,
conditional on the host's generation; a stale generation means place again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fleetvisor.scheduler.config import SchedulerConfig
from fleetvisor.scheduler.cycle import CycleState, prepare
from fleetvisor.scheduler.errors import PlacementFailed
from fleetvisor.scheduler.explain import Explanation, FilterOutcome, ScoreRow
from fleetvisor.scheduler.filtering import FilterPipeline
from fleetvisor.scheduler.filters import Filter, default_filters
from fleetvisor.scheduler.fleet import FleetSnapshot, Floats, Ints, Mask
from fleetvisor.scheduler.ranking import Ranking, ScorePipeline
from fleetvisor.scheduler.scoring import ScoringModel, enabled_models
from fleetvisor.scheduler.snapshot import PlacementDecision, PlacementRequest


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One cycle's outcome before anything is reserved."""

    host: int
    total: float  # the winner's weighted mean, 0..100
    ranking: Ranking
    explanation: Explanation | None


class PlacementEngine:
    def __init__(
        self,
        fleet: FleetSnapshot,
        config: SchedulerConfig | None = None,
        filters: Sequence[Filter] | None = None,
        models: Sequence[ScoringModel] | None = None,
    ) -> None:
        self.fleet = fleet
        self.config = config or SchedulerConfig()
        self.filters = list(filters) if filters is not None else default_filters()
        self.models = list(models) if models is not None else enabled_models(self.config)
        self._filtering = FilterPipeline(self.filters, self.config)
        self._ranking = ScorePipeline(self.models, self.config)

    # -- the public calls ---------------------------------------------------------

    def place(
        self,
        request: PlacementRequest,
        *,
        explain: bool = True,
        pinned: Mask | None = None,
        pin_reason: str = "",
    ) -> PlacementDecision:
        """Choose a host and reserve the request on it in the snapshot.

        Raises PlacementFailed (a 409) naming the failed constraint when no host passes
        every filter. `pinned` restricts the choice to some hosts (batch placement).
        """
        cycle = prepare(self.fleet, request, pinned, pin_reason)
        result = self.evaluate(cycle, explain=explain)
        self.fleet.assign(result.host, cycle.need, request.groups)
        explanation = result.explanation
        return PlacementDecision(
            host=self.fleet.hosts[result.host],
            rejected=explanation.rejected_sample() if explanation else {},
            score=result.total,
            explanation=explanation,
            request=request,
        )

    def explain(self, request: PlacementRequest) -> Explanation:
        """Where `request` would go and why, without reserving anything."""
        cycle = prepare(self.fleet, request)
        try:
            result = self.evaluate(cycle, explain=True)
        except PlacementFailed as failure:
            assert failure.explanation is not None
            return failure.explanation
        assert result.explanation is not None
        return result.explanation

    def release(self, decision: PlacementDecision) -> None:
        """Undo a placement in the snapshot (a rolled-back batch member)."""
        assert decision.request is not None
        host = self.fleet.index_of[decision.host.id]
        need = np.array(decision.request.resources.as_tuple(), dtype=np.int64)
        self.fleet.unassign(host, need, decision.request.groups)

    # -- for planners (batch, cross-cluster, optimizer, rebalance) ------------------

    def feasible(self, cycle: CycleState, *, group_rules: bool = True) -> Mask:
        """Hosts passing every filter (a new array). Without `group_rules` the hard group
        filter admits all: an exact model encodes those rules itself."""
        if group_rules:
            return self._filtering.feasible(cycle).copy()
        saved, cycle.hard_groups = cycle.hard_groups, ()
        try:
            return self._filtering.feasible(cycle).copy()
        finally:
            cycle.hard_groups = saved

    def explain_filters(self, cycle: CycleState, outcomes: list[FilterOutcome]) -> Mask:
        """Run every filter in order, appending who rejected which hosts and why."""
        return self._filtering.explain(cycle, outcomes)

    def score(self, cycle: CycleState, candidates: Ints) -> Floats:
        """Weighted mean scores (0..100) of `candidates` for the cycle's request."""
        mask = np.zeros(len(self.fleet), dtype=bool)
        mask[candidates] = True
        ranking = self._ranking.rank(cycle, mask)
        if ranking.weight_sum <= 0:
            return np.zeros(candidates.size)
        return np.asarray(ranking.totals[candidates] / ranking.weight_sum, dtype=np.float64)

    # -- one cycle ------------------------------------------------------------------

    def evaluate(self, cycle: CycleState, *, explain: bool) -> Evaluation:
        outcomes: list[FilterOutcome] = []
        if len(self.fleet) == 0:
            raise self._failure(cycle, outcomes)
        if explain:
            feasible = self._filtering.explain(cycle, outcomes)
        else:
            feasible = self._filtering.feasible(cycle)
        ranking = self._ranking.rank(cycle, feasible, columns=explain)
        # Feasible hosts first (the bonus exceeds any total), then the best total; ties:
        # the lowest index, i.e. first by name.
        bonus = 100.0 * ranking.weight_sum + 1.0
        host = int(np.argmax(ranking.totals + feasible * bonus))
        if not feasible[host]:
            if not explain:
                self._filtering.explain(cycle, outcomes)
            raise self._failure(cycle, outcomes)
        explanation = (
            self._explanation(cycle, outcomes, feasible, ranking, host) if explain else None
        )
        return Evaluation(host, ranking.mean(host), ranking, explanation)

    # -- explanations -----------------------------------------------------------------

    def _explanation(
        self,
        cycle: CycleState,
        outcomes: list[FilterOutcome],
        feasible: Mask,
        ranking: Ranking,
        host: int,
    ) -> Explanation:
        candidates = np.flatnonzero(feasible)
        totals = ranking.totals[candidates]
        top = candidates[np.lexsort((candidates, -totals))[: self.config.explain_top_k]]
        rows = tuple(
            ScoreRow(
                host=self.fleet.hosts[int(h)].name,
                total=round(ranking.mean(int(h)), 3),
                normalized={c.model: round(float(c.normalized[h]), 3) for c in ranking.columns},
                raw={c.model: round(float(c.raw[h]), 4) for c in ranking.columns},
            )
            for h in top
        )
        return Explanation(
            request=cycle.request.describe(),
            hosts=len(self.fleet),
            feasible=int(candidates.size),
            filtered=tuple(outcomes),
            weights={c.model: c.weight for c in ranking.columns},
            scores=rows,
            winner=self.fleet.hosts[host].name,
        )

    def _failure(self, cycle: CycleState, outcomes: list[FilterOutcome]) -> PlacementFailed:
        request = cycle.request.describe()
        if len(self.fleet) == 0:
            return PlacementFailed(
                "no hosts are registered; start an agent (fleetvisor agent) or a local fleet "
                "(fleetvisor up)",
                constraint="hosts",
                explanation=Explanation(request, 0, 0, (), failed="no hosts"),
                request=request,
            )
        last = outcomes[-1]  # the rule that rejected the last hosts standing
        failed = f"{last.filter}: {last.reason} on {last.count} host(s)"
        explanation = Explanation(request, len(self.fleet), 0, tuple(outcomes), failed=failed)
        summary = "; ".join(
            f"{o.count} host(s): {o.reason}"
            + (f" (e.g. {o.examples[0][0]}: {o.examples[0][1]})" if o.examples else "")
            for o in outcomes
        )
        return PlacementFailed(
            f"no host can take {request}: {summary}. " + _advice(last.filter),
            constraint=last.filter,
            where=dict(last.examples),
            explanation=explanation,
            request=request,
        )


def _advice(filter_name: str) -> str:
    if filter_name == "placement_groups":
        return "Relax the placement group (soft strength, larger max per scope) or add hosts."
    if filter_name == "capacity":
        return "Ask for fewer resources, free capacity, or add hosts."
    return "Change the request's requirements or bring matching hosts up."
