"""Running (cumulative or EMA) diagonal estimates and their variances, docs/math.md §4-§5.

``RunningDiagonal`` holds, for one parameter, float64 statistics built from the batch sums
of ``diagonal_terms``. It knows nothing of modules or hooks.

* Cumulative (``ema_decay=None``): weights ``w_t ∝ N_t``. The statistics are float64 sums
  (of terms, of squared terms, of closed-form variances) and the input count, so
  accumulating several batches, or merging accumulators, gives exactly the numbers of one
  batch of all inputs.
* EMA (``0 < β < 1``): ``Ī = Σ_t w_t Î^(t)`` with bias-corrected weights
  ``w_t = (1−β)β^(T−t) / (1−β^T)``; every variance is ``Σ_t w_t² Var(Î^(t))``.

A closed-form variance term absent from the batch sums (``v2`` of a layer where the
network is piecewise linear) counts as exactly zero.

Batch sums arrive in the model's precision, rank-one ones as unmultiplied factors. They are
staged in that precision (products accumulated by ``addmm``) for at most ``FOLD_EVERY``
steps, then folded into the float64 statistics: an addition in float64 of a float32
tensor costs about as much as the matrix product that made it.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from fimhooks.fisher.diagonal_terms import BatchSums
from fimhooks.fisher.quantities import ESTIMATOR_SPECS, ESTIMATORS, TERMS

#: Batch sums of Kronecker factors (``extension.kronecker_sums``): averaged like estimates.
KRONECKER_PREFIX = "kron_"
#: Steps staged in the model's precision before they are folded into float64.
FOLD_EVERY = 8


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
        self.single_input_steps = 0
        self.stats: Dict[str, Tensor] = {}
        self.aliases: Dict[str, str] = {}
        self._staged: Dict[str, Tensor] = {}
        self._staged_products: Dict[Tuple[str, ...], Tensor] = {}
        self._staged_steps = 0
        self._staged_dtype: Optional[torch.dtype] = None

    def update(self, batch: BatchSums, num_inputs: int) -> None:
        """Add one collected batch from its batch sums (``diagonal_terms``)."""
        dtype = batch.dtype()
        if self._staged_dtype not in (None, dtype):  # the model changed precision
            self._fold()
            self._staged, self._staged_products = {}, {}
        self._staged_dtype = dtype
        if self.ema_decay is None:
            self.aliases.update(batch.aliases)
            self._stage_sums(batch)
        else:
            self._stage_ema(self._ema_step(batch.dense(), num_inputs))
        self.num_inputs += num_inputs
        self.num_steps += 1
        self.single_input_steps += num_inputs < 2
        self._staged_steps += 1
        if self._staged_steps == FOLD_EVERY:
            self._fold()

    def merge(self, other: "RunningDiagonal") -> None:
        """Merge another cumulative accumulator over different inputs into this one."""
        if self.ema_decay is not None or other.ema_decay is not None:
            raise ValueError("only cumulative averages (ema_decay=None) can be merged.")
        if self.mc_samples != other.mc_samples:
            raise ValueError("cannot merge statistics with different mc_samples.")
        self._fold()
        other._fold()
        for key, value in other.stats.items():
            self.stats[key] = self.stats[key] + value if key in self.stats else value.clone()
        self.aliases.update(other.aliases)
        self.num_inputs += other.num_inputs
        self.num_steps += other.num_steps
        self.single_input_steps += other.single_input_steps

    def _stage_sums(self, batch: BatchSums) -> None:
        for key, value in batch.sums.items():
            if key in self._staged:
                self._staged[key] += value
            else:
                self._staged[key] = value.clone()
        for keys, left, right in batch.products():
            if keys in self._staged_products:
                self._staged_products[keys].addmm_(left.T, right)
            else:
                self._staged_products[keys] = left.T @ right

    def _stage_ema(self, step: Dict[str, Tensor]) -> None:
        for key in self._staged.keys() - step.keys():  # a term that is zero in this step
            self._staged[key].mul_(self._decay(key))
        for key, value in step.items():
            if key in self._staged:
                self._staged[key].mul_(self._decay(key)).add_(value, alpha=self._gain(key))
            else:
                self._staged[key] = value * self._gain(key)

    def _ema_step(self, sums: Dict[str, Tensor], n: int) -> Dict[str, Tensor]:
        """Per-step means and variances of the step's estimates (docs/math.md §5)."""
        step = {}
        for name in ESTIMATORS:
            if name in sums:
                total = sums[name]
                step["mean_" + name] = total / n
                m2 = (sums[name + "_sq"] - total**2 / n).clamp_min_(0.0)
                step["var_" + name] = m2 / ((n - 1) * n) if n > 1 else torch.zeros_like(m2)
                step["varweight"] = total.new_tensor(float(n > 1))
        for term, spec in TERMS.items():
            if term in sums and spec.label_variance:
                step["labelvar_" + term] = sums[term] / (n**2 * self.mc_samples)
            elif term in sums and spec.bounds:  # bounds of exact: averaged like it
                step["mean_" + term] = sums[term] / n
        for key in sums:
            if key.startswith(KRONECKER_PREFIX):
                step["mean_" + key] = sums[key] / n
        return step

    def _decay(self, key: str) -> float:
        """Per-step decay of a statistic: 1 for sums, ``β`` for means, ``β²`` for variances."""
        if self.ema_decay is None:
            return 1.0
        return self.ema_decay if key.startswith("mean_") else self.ema_decay**2

    def _gain(self, key: str) -> float:
        if self.ema_decay is None:
            return 1.0
        gain = 1 - self.ema_decay
        return gain if key.startswith("mean_") else gain**2

    def _fold(self) -> None:
        """Fold the staged steps into the float64 statistics; staging restarts at zero."""
        staged = dict(self._staged)
        for keys, product in self._staged_products.items():
            staged.update(zip(keys, product.split(product.shape[0] // len(keys))))
        k = self._staged_steps
        for key in self.stats.keys() - staged.keys():
            self.stats[key].mul_(self._decay(key) ** k)
        for key, value in staged.items():
            if key not in self.stats:
                self.stats[key] = value.to(torch.float64, copy=True)
            elif self.ema_decay is None:
                self.stats[key] += value
            else:
                self.stats[key].mul_(self._decay(key) ** k).add_(value)
        for value in list(self._staged.values()) + list(self._staged_products.values()):
            value.zero_()
        self._staged_steps = 0

    def _stat(self, key: str) -> Tensor:
        return self.stats[self.aliases.get(key, key)]

    # --- reported quantities -------------------------------------------------------

    def has(self, name: str) -> bool:
        """Whether statistics of ``name`` (an estimator or a ``kron_*`` factor) exist."""
        key = name if self.ema_decay is None else "mean_" + name
        return key in self.stats or key in self._staged

    def fisher(self, estimator: str) -> Tensor:
        """Running diagonal estimate ``[*P]`` (or a running Kronecker factor, ``kron_*``)."""
        self._fold()
        if self.ema_decay is None:
            return self._stat(estimator) / self.num_inputs
        return self.stats["mean_" + estimator] / self._bias_correction()

    def label_variance(self, estimator: str) -> Tensor:
        """Closed-form label-noise variance of the running estimate, ``[*P]``."""
        return self._label_variance_term(ESTIMATOR_SPECS[estimator].variance, estimator)

    def bound(self, term: str) -> Tensor:
        """A bound term (docs/math.md §7) aggregated like the quantity it bounds, ``[*P]``.

        Bounds of ``exact`` are averaged like it; those of ``v1`` and ``v2`` like the
        label-noise variances (``1/(N²M)`` and ``w_t²``).
        """
        if TERMS[term].label_variance:
            return self._label_variance_term(term, "exact")
        return self.fisher(term)

    def _label_variance_term(self, term: Optional[str], like: str) -> Tensor:
        """A label-noise variance term (zeros shaped like ``fisher(like)`` where absent)."""
        value = None if term is None else self.label_variance_term(term)
        return torch.zeros_like(self.fisher(like)) if value is None else value

    def label_variance_term(self, term: str) -> Optional[Tensor]:
        """A label-noise variance term of the running estimate (``None`` where absent).

        Cumulative: ``Σ_n v(x_n) / (N² M)``; EMA: ``Σ_t w_t² Σ_n v / (N_t² M)``.
        """
        self._fold()
        key = term if self.ema_decay is None else f"labelvar_{term}"
        if key not in self.stats:  # 'exact', or v2 where σ'' = 0
            return None
        if self.ema_decay is None:
            return self.stats[key] / (self.num_inputs**2 * self.mc_samples)
        return self.stats[key] / self._bias_correction() ** 2

    def sample_variance(self, estimator: str) -> Tensor:
        """Empirical variance of the running estimate (sample variance across inputs / N)."""
        self._fold()
        if self.ema_decay is not None:
            return self._ema_sample_variance(estimator)
        n = self.num_inputs
        total, squares = self._stat(estimator), self._stat(estimator + "_sq")
        if n < 2:
            return torch.full_like(total, float("nan"))
        return (squares - total**2 / n).clamp_min(0.0) / ((n - 1) * n)

    def _ema_sample_variance(self, estimator: str) -> Tensor:
        """``Σ_t w_t² Var_t``; a step of one input has no ``Var_t``.

        Such steps are left out and the sum is scaled back to all the weights (the other
        steps' variances stand in for theirs); with none left it is NaN.
        """
        variance = self.stats["var_" + estimator] / self._bias_correction() ** 2
        if not self.single_input_steps:
            return variance
        beta, steps = self.ema_decay, self.num_steps
        every = (1 - beta) ** 2 * (1 - beta ** (2 * steps)) / (1 - beta**2)
        defined = self.stats["varweight"].item() if "varweight" in self.stats else 0.0
        if defined <= 0:
            return torch.full_like(variance, float("nan"))
        return variance * (every / defined)

    def effective_inputs(self) -> float:
        """Inputs whose plain average has the running estimate's variance (docs/math.md §4-§5).

        ``N`` for the cumulative average; for the EMA, the mean batch size over ``Σ_t w_t²``.
        """
        if self.ema_decay is None:
            return float(self.num_inputs)
        beta, steps = self.ema_decay, self.num_steps
        sum_sq_weights = (
            (1 - beta) ** 2 * (1 - beta ** (2 * steps)) / ((1 - beta**2) * (1 - beta**steps) ** 2)
        )
        return self.num_inputs / steps / sum_sq_weights

    def _bias_correction(self) -> float:
        return 1.0 - self.ema_decay**self.num_steps

    def state_dict(self) -> dict:
        """Everything needed to restore this accumulator exactly."""
        self._fold()
        return {
            "ema_decay": self.ema_decay,
            "mc_samples": self.mc_samples,
            "num_inputs": self.num_inputs,
            "num_steps": self.num_steps,
            "single_input_steps": self.single_input_steps,
            "stats": {k: v.clone() for k, v in self.stats.items()},
            "aliases": dict(self.aliases),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "RunningDiagonal":
        """A new accumulator restored from ``state_dict``."""
        acc = cls(state["ema_decay"], state["mc_samples"])
        acc.load_state_dict(state)
        return acc

    def to(self, device) -> "RunningDiagonal":
        """This accumulator with its statistics on ``device`` (in place; returns self)."""
        self._fold()
        self.stats = {k: v.to(device) for k, v in self.stats.items()}
        return self

    def copy(self) -> "RunningDiagonal":
        """An independent copy (staged steps folded in)."""
        return RunningDiagonal.from_state_dict(self.state_dict())

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``."""
        self.ema_decay = state["ema_decay"]
        self.mc_samples = state["mc_samples"]
        self.num_inputs = state["num_inputs"]
        self.num_steps = state["num_steps"]
        self.single_input_steps = state.get("single_input_steps", 0)
        self.stats = {k: v.clone() for k, v in state["stats"].items()}
        self.aliases = dict(state["aliases"])
        self._staged = {}
        self._staged_products = {}
        self._staged_steps = 0
