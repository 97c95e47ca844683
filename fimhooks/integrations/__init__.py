"""Callbacks for training loops the user does not own (they use ``FisherMonitor.start``)."""

from __future__ import annotations

import math
from typing import Dict


def layer_scalars(monitor) -> Dict[str, float]:
    """``{"fisher/<layer>/<estimator>/<trace|rse|label_share>": value}``, finite ones only."""
    out = {}
    for layer, stats in monitor.live_estimates().layer_statistics().items():
        for estimator in monitor.estimators:
            for key in ("trace", "rse", "label_share"):
                value = stats[estimator][key]
                if value is not None and math.isfinite(value):
                    out[f"fisher/{layer or 'model'}/{estimator}/{key}"] = value
    return out
