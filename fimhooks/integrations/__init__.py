"""Callbacks for training loops the user does not own (they use ``FisherMonitor.start``)."""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Union

from torch import nn

from fimhooks.monitor import FisherMonitor


class StartedMonitor:
    """A ``FisherMonitor`` started for the length of a framework's training run.

    The callbacks call ``start_on(model)`` when training begins, ``check_reached`` after
    training steps and ``finish()`` when training ends or fails; ``monitor`` keeps its
    estimates after that.

    Args:
        likelihood: As for ``FisherMonitor``.
        monitor_options: ``FisherMonitor`` options.
    """

    def __init__(self, likelihood: Union[str, nn.Module], monitor_options: dict):
        self.likelihood, self.monitor_options = likelihood, monitor_options
        self.monitor: Optional[FisherMonitor] = None
        self._handles: List = []  # the callback's own hooks, removed with the monitor
        self._warned = False

    def start_on(self, model: nn.Module) -> None:
        """Attach a started monitor to ``model``.

        A monitor left by an earlier run of this callback that did not finish (it raised
        where the framework tells no callback) is removed first.
        """
        self.finish()
        self.monitor = FisherMonitor(model, self.likelihood, **self.monitor_options).start()
        self._warned = False

    def finish(self) -> None:
        """Stop and remove the monitor and the callback's hooks (estimates stay readable)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.monitor is not None and not self.monitor.removed:
            self.monitor.stop()
            self.monitor.remove()

    def check_reached(self, fix: str) -> None:
        """After training steps that ran a backward pass: warn once if none reached the output.

        Args:
            fix: What to change, named in the warning (the option that selects the model or
                its output).
        """
        monitor = self.monitor
        if monitor is None or monitor.removed or monitor.backward_passes or self._warned:
            return
        self._warned = True
        warnings.warn(
            "fimhooks: training ran backward passes, but none went through the output of the "
            f"watched {type(monitor.model).__name__}, so nothing is collected. {fix}",
            RuntimeWarning,
            stacklevel=2,
        )

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
