"""Running (cumulative or EMA) diagonal estimates and their variances, SPEC §4-§5.

``RunningDiagonal`` holds, for one parameter, float64 statistics built from the batch sums
of ``diagonal_terms``. It knows nothing of modules or hooks.

* Cumulative (``ema_decay=None``): weights ``w_t ∝ N_t``. Means and sample variances are
  merged with Chan's formula, label-noise variances are plain sums, so accumulating
  several batches (or merging two accumulators) gives exactly the numbers one batch of
  all inputs would give.
* EMA (``0 < β < 1``): ``Ī = Σ_t w_t Î^(t)`` with bias-corrected weights
  ``w_t = (1−β)β^(T−t) / (1−β^T)``; every variance is ``Σ_t w_t² Var(Î^(t))``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

ESTIMATORS = ("I1", "I2", "exact")
#: Closed-form label-noise variance term of each sampled estimator (SPEC §3).
LABEL_VARIANCE_TERM = {"I1": "v1", "I2": "v2"}


class RunningDiagonal:
    """Running statistics of one parameter's diagonal estimates.

    Args:
        ema_decay: ``None`` for the cumulative average, else ``β`` in ``(0, 1)``.
        mc_samples: Label draws per input ``M``.

    """

    def __init__(self, ema_decay: Optional[float], mc_samples: int):
        self.ema_decay = ema_decay
        self.mc_samples = mc_samples
        self.num_inputs = 0
        self.num_steps = 0
        self.stats: Dict[str, Tensor] = {}

    def update(self, sums: Dict[str, Tensor], num_inputs: int) -> None:
        """Add one collected batch from its batch sums (``diagonal_terms.batch_sums``)."""
        batch = _batch_moments(sums, num_inputs, self.mc_samples)
        if self.ema_decay is None:
            self._merge_cumulative(batch, num_inputs)
        else:
            self._update_ema(batch)
        self.num_inputs += num_inputs
        self.num_steps += 1

    def merge(self, other: "RunningDiagonal") -> None:
        """Merge another cumulative accumulator over different inputs into this one."""
        if self.ema_decay is not None or other.ema_decay is not None:
            raise ValueError("only cumulative averages (ema_decay=None) can be merged.")
        if self.mc_samples != other.mc_samples:
            raise ValueError("cannot merge statistics with different mc_samples.")
        if other.num_inputs:
            self._merge_cumulative(_as_batch(other), other.num_inputs)
            self.num_inputs += other.num_inputs
            self.num_steps += other.num_steps

    def _merge_cumulative(self, batch: Dict[str, Tensor], n_b: int) -> None:
        n_a = self.num_inputs
        if n_a == 0:
            self.stats = {k: v.clone() for k, v in batch.items()}
            return
        n = n_a + n_b
        for key, value in batch.items():
            if key.startswith("mean_"):
                name = key[len("mean_") :]
                delta = value - self.stats[key]
                self.stats[key] += delta * (n_b / n)
                self.stats["m2_" + name] += batch["m2_" + name] + delta**2 * (n_a * n_b / n)
            elif key.startswith("sum_"):
                self.stats[key] += value

    def _update_ema(self, batch: Dict[str, Tensor]) -> None:
        beta = self.ema_decay
        for key, value in batch.items():
            if key.startswith("mean_"):
                decay, gain = beta, 1 - beta
            elif key.startswith(("var_", "labelvar_")):
                decay, gain = beta**2, (1 - beta) ** 2
            else:
                continue
            old = self.stats.get(key)
            self.stats[key] = gain * value if old is None else decay * old + gain * value

    # --- reported quantities -------------------------------------------------------

    def fisher(self, estimator: str) -> Tensor:
        """Running diagonal estimate, ``[*P]``."""
        return self.stats["mean_" + estimator] / self._bias_correction()

    def label_variance(self, estimator: str) -> Tensor:
        """Closed-form label-noise variance of the running estimate, ``[*P]``."""
        if estimator == "exact":
            return torch.zeros_like(self.stats["mean_exact"])
        term = LABEL_VARIANCE_TERM[estimator]
        if self.ema_decay is None:
            return self.stats["sum_" + term] / (self.num_inputs**2 * self.mc_samples)
        return self.stats["labelvar_" + term] / self._bias_correction() ** 2

    def sample_variance(self, estimator: str) -> Tensor:
        """Empirical variance of the running estimate (sample variance across inputs / N)."""
        if self.ema_decay is None:
            n = self.num_inputs
            m2 = self.stats["m2_" + estimator]
            return m2 / ((n - 1) * n) if n > 1 else torch.full_like(m2, float("nan"))
        return self.stats["var_" + estimator] / self._bias_correction() ** 2

    def _bias_correction(self) -> float:
        if self.ema_decay is None:
            return 1.0
        return 1.0 - self.ema_decay**self.num_steps

    def state_dict(self) -> dict:
        """Everything needed to restore this accumulator exactly."""
        return {
            "ema_decay": self.ema_decay,
            "mc_samples": self.mc_samples,
            "num_inputs": self.num_inputs,
            "num_steps": self.num_steps,
            "stats": {k: v.clone() for k, v in self.stats.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``."""
        self.ema_decay = state["ema_decay"]
        self.mc_samples = state["mc_samples"]
        self.num_inputs = state["num_inputs"]
        self.num_steps = state["num_steps"]
        self.stats = {k: v.clone() for k, v in state["stats"].items()}


def _batch_moments(sums: Dict[str, Tensor], n: int, mc_samples: int) -> Dict[str, Tensor]:
    """Per-batch mean, centred sum of squares and variances from batch sums."""
    batch = {}
    for name in ESTIMATORS:
        if name not in sums:
            continue
        mean = sums[name] / n
        m2 = (sums[name + "_sq"] - sums[name] * mean).clamp_min(0.0)
        batch["mean_" + name] = mean
        batch["m2_" + name] = m2
        batch["var_" + name] = m2 / ((n - 1) * n) if n > 1 else torch.zeros_like(m2)
    for term in LABEL_VARIANCE_TERM.values():
        if term in sums:
            batch["sum_" + term] = sums[term]
            batch["labelvar_" + term] = sums[term] / (n**2 * mc_samples)
    return batch


def _as_batch(acc: RunningDiagonal) -> Dict[str, Tensor]:
    return {k: v for k, v in acc.stats.items() if k.startswith(("mean_", "m2_", "sum_"))}
