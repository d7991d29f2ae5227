"""When to carve and when to fold: a pure function of the metric history.

    sample ──► values {cpu, memory, throttled, latency}
       carve  when any trigger's metric stayed >= `above` for `hold_s`,
              there is room for a sibling, and the last action is `cooldown_s` old
       fold   when every trigger's metric stayed <= `below` for `fold_hold_s`,
              there is a sibling, and the last action is `cooldown_s` old

The gap between `above` and `below` plus the cooldown is the hysteresis that keeps a
noisy metric from carving and folding in turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from fleetvisor.model.scaling import ScalingPolicy


@dataclass(frozen=True)
class Decision:
    action: Literal["carve", "fold"] | None
    reason: str = ""


@dataclass
class TriggerState:
    policy: ScalingPolicy
    above_since: dict[str, float] = field(default_factory=dict)
    below_since: float | None = None
    last_action_at: float = -math.inf

    def observe(self, now: float, values: dict[str, float], siblings: int) -> Decision:
        """Feed one sample (metric -> value; a missing metric counts as neither high nor
        low) and say what to do now."""
        policy = self.policy
        for trigger in policy.triggers:
            value = values.get(trigger.metric)
            if value is not None and value >= trigger.above:
                self.above_since.setdefault(trigger.metric, now)
            else:
                self.above_since.pop(trigger.metric, None)
        all_low = all(
            values.get(t.metric) is not None and values[t.metric] <= t.below
            for t in policy.triggers
        )
        if not all_low:
            self.below_since = None
        elif self.below_since is None:
            self.below_since = now
        if now - self.last_action_at < policy.cooldown_s:
            return Decision(None)
        if siblings < policy.max_siblings:
            for trigger in policy.triggers:
                since = self.above_since.get(trigger.metric)
                if since is not None and now - since >= policy.hold_s:
                    return Decision(
                        "carve",
                        f"{trigger.metric} {_show(trigger.metric, values[trigger.metric])} ≥ "
                        f"{_show(trigger.metric, trigger.above)} for {now - since:.1f}s",
                    )
        if siblings > 0 and self.below_since is not None:
            held = now - self.below_since
            if held >= policy.fold_hold_s:
                lows = ", ".join(
                    f"{t.metric} {_show(t.metric, values[t.metric])} ≤ {_show(t.metric, t.below)}"
                    for t in policy.triggers
                )
                return Decision("fold", f"{lows} for {held:.1f}s")
        return Decision(None)

    def acted(self, now: float) -> None:
        """An action happened (or was refused): start the cooldown, restart the holds."""
        self.last_action_at = now
        self.above_since.clear()
        self.below_since = None


def _show(metric: str, value: float) -> str:
    return f"{value:.0f} ms" if metric == "latency" else f"{value:.2f}"
