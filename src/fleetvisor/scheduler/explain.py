"""Why an instance went where it went: filtered hosts with reasons, the score table, the winner.

At 10,000 hosts a per-host list is noise, so rejections are aggregated: one row per
(filter, reason) with the number of hosts and a few named examples with their exact
reason. The score table lists the top-k candidates with every model's normalized
score and the weighted total.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class FilterOutcome:
    filter: str
    reason: str  # shared by the `count` hosts
    count: int
    examples: tuple[tuple[str, str], ...] = ()  # (host name, that host's exact reason)


@dataclass(frozen=True, slots=True)
class ScoreRow:
    host: str
    total: float  # weighted mean of `normalized`, 0..100
    normalized: Mapping[str, float]  # model -> 0..100
    raw: Mapping[str, float]  # model -> the model's own figure


@dataclass(frozen=True, slots=True)
class Explanation:
    request: str
    hosts: int  # hosts in the snapshot
    feasible: int  # hosts that passed every filter
    filtered: tuple[FilterOutcome, ...]
    weights: Mapping[str, float] = field(default_factory=dict)  # models that applied
    scores: tuple[ScoreRow, ...] = ()  # best first
    winner: str | None = None
    failed: str | None = None  # no placement: the constraint that failed, and where

    def rejected_sample(self) -> dict[str, str]:
        """host name -> reason, for the named examples only."""
        return {host: why for outcome in self.filtered for host, why in outcome.examples}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        """Plain text for a terminal or an event message."""
        lines = [f"placement of {self.request}: {self.feasible} of {self.hosts} hosts feasible"]
        for outcome in self.filtered:
            examples = "; ".join(f"{host}: {why}" for host, why in outcome.examples)
            lines.append(
                f"  filtered {outcome.count:>6} by {outcome.filter}: {outcome.reason}"
                + (f" (e.g. {examples})" if examples else "")
            )
        if self.scores:
            models = list(self.weights)
            header = "  " + f"{'host':<24}{'total':>8}" + "".join(f"{m[:14]:>16}" for m in models)
            weights = (
                "  "
                + f"{'(weight)':<24}{'':>8}"
                + "".join(f"{self.weights[m]:>16g}" for m in models)
            )
            lines += [header, weights]
            for row in self.scores:
                lines.append(
                    "  "
                    + f"{row.host[:23]:<24}{row.total:>8.1f}"
                    + "".join(f"{row.normalized[m]:>16.1f}" for m in models)
                )
        if self.winner:
            lines.append(f"  winner: {self.winner}")
        if self.failed:
            lines.append(f"  failed: {self.failed}")
        return "\n".join(lines)
