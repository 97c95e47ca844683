"""Callbacks for training loops the user does not own (they use ``FisherMonitor.start``)."""

from __future__ import annotations

import math
from typing import Dict, Optional, Union

from torch import nn

from fimhooks.monitor import FisherMonitor


class StartedMonitor:
    """A ``FisherMonitor`` started for the length of a framework's training run.

    The callbacks call ``start_on(model)`` when training begins and ``finish()`` when it
    ends; ``monitor`` keeps its estimates after that.

    Args:
        likelihood: As for ``FisherMonitor``.
        monitor_options: ``FisherMonitor`` options.
    """

    def __init__(self, likelihood: Union[str, nn.Module], monitor_options: dict):
        self.likelihood, self.monitor_options = likelihood, monitor_options
        self.monitor: Optional[FisherMonitor] = None

    def start_on(self, model: nn.Module) -> None:
        """Attach a started monitor to ``model``."""
        self.monitor = FisherMonitor(model, self.likelihood, **self.monitor_options).start()

    def finish(self) -> None:
        """Stop and remove the monitor (its estimates stay readable)."""
        if self.monitor is not None and not self.monitor.removed:
            self.monitor.stop()
            self.monitor.remove()

    def scalars(self) -> Dict[str, float]:
        """``{"fisher/<layer>/<estimator>/<trace|rse|label_share>": value}``, finite ones.

        Empty before the first collected step.
        """
        if self.monitor is None or not self.monitor.collected_steps:
            return {}
        out = {}
        for layer, stats in self.monitor.live_estimates().layer_statistics().items():
            for estimator in self.monitor.estimators:
                for key in ("trace", "rse", "label_share"):
                    value = stats[estimator][key]
                    if value is not None and math.isfinite(value):
                        out[f"fisher/{layer or 'model'}/{estimator}/{key}"] = value
        return out
