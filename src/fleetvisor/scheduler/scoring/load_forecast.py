"""Load forecast: prefer hosts whose predicted peak utilization over the next window is low.

The snapshot forecasts each host's cpu, memory and net utilization from its metric
history with Holt-Winters (`scheduler/forecast.py`: level, damped trend, daily season)
and keeps the peak over the window, plus what this engine has placed there since (as
if fully used). The model adds the request and scores the headroom of the tightest
metric: 1 − min(1, max_metric(predicted + placed + request)).
"""

from __future__ import annotations

import numpy as np

from fleetvisor.scheduler.config import SchedulerConfig
from fleetvisor.scheduler.cycle import CycleState
from fleetvisor.scheduler.fleet import Floats, Hosts
from fleetvisor.scheduler.scoring.base import ScoringModel, ShapeCache


class LoadForecast(ScoringModel):
    name = "load_forecast"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self._terms = ShapeCache()

    def applies(self, cycle: CycleState) -> bool:
        return cycle.fleet.has_history

    def score(self, cycle: CycleState, hosts: Hosts) -> Floats:
        fleet = cycle.fleet
        share = self._terms.get(  # (hosts, metrics): the request's share of each host
            fleet.metric_inverse_capacity,
            cycle.need_key,
            lambda: np.ascontiguousarray(
                (fleet.metric_inverse_capacity * cycle.metric_need[:, None]).T
            ),
        )
        load = share[hosts] + fleet.forecast_load[hosts]
        peak = load.max(axis=1)
        np.minimum(peak, 1.0, out=peak)
        return np.subtract(1.0, peak, out=peak)
