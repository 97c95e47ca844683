"""Running (cumulative or EMA) diagonal estimates and their variances, docs/math.md §4-§5.

One parameter's float64 statistics built from the batch sums of ``diagonal_terms``; they
know nothing of modules or hooks. Two averaging rules behind one interface
(``RunningDiagonal``):

* ``CumulativeDiagonal`` (``ema_decay=None``): weights ``w_t ∝ N_t``. The statistics are
  float64 sums (of terms, of squared terms, of closed-form variances) and the input count,
  so accumulating several batches, or merging accumulators, gives exactly the numbers of
  one batch of all inputs.
* ``EMADiagonal`` (``0 < β < 1``): ``Ī = Σ_t w_t Î^(t)`` with bias-corrected weights
  ``w_t = (1−β)β^(T−t) / (1−β^T)``; every variance is ``Σ_t w_t² Var(Î^(t))``.

Statistics are kept by kind (``{kind: {name: tensor}}``); a kind's one averaging fact is
its per-step decay. A closed-form variance term absent from the batch sums (``v2`` of a
layer where the network is piecewise linear) counts as exactly zero.

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

#: Batch sums of Kronecker factors (``engine.chain.ChainPass.kronecker_sums``): averaged
#: like estimates.
KRONECKER_PREFIX = "kron_"
#: Steps staged in the model's precision before they are folded into float64.
FOLD_EVERY = 8

#: ``{kind: {name: tensor}}``, ``[*P]`` each (scalars for ``variance_weight``).
Statistics = Dict[str, Dict[str, Tensor]]


class RunningDiagonal:
    """Running statistics of one parameter's diagonal estimates (the common interface).

    ``RunningDiagonal(ema_decay, mc_samples)`` makes the accumulator of that averaging
    rule: a ``CumulativeDiagonal`` for ``ema_decay=None``, else an ``EMADiagonal``.

    Args:
        ema_decay: ``None`` for the cumulative average, else ``β`` in ``(0, 1)``.
        mc_samples: Label draws per input ``M``.
    """

    #: The kinds of statistic this rule keeps (each decays per step by ``_decay(kind)``).
    KINDS: Tuple[str, ...] = ()

    def __new__(cls, ema_decay: Optional[float] = None, mc_samples: int = 1):
        """The subclass of the averaging rule that ``ema_decay`` names."""
        if cls is RunningDiagonal:
            cls = CumulativeDiagonal if ema_decay is None else EMADiagonal
        return super().__new__(cls)

    def __init__(self, ema_decay: Optional[float] = None, mc_samples: int = 1):
        self.ema_decay = ema_decay
        self.mc_samples = mc_samples
        self.num_inputs = 0
        self.num_steps = 0
        self.single_input_steps = 0
        self.aliases: Dict[str, str] = {}
        self.stats: Statistics = _empty(self.KINDS)
        self._reset_staging()

    # --- the averaging rule: what each subclass declares ----------------------------

    def _decay(self, kind: str) -> float:
        """Per-step decay of a statistic of ``kind`` (1 for sums)."""
        raise NotImplementedError

    def _stage(self, batch: BatchSums, num_inputs: int) -> None:
        """Add one step's batch sums to the staged statistics."""
        raise NotImplementedError

    def has(self, name: str) -> bool:
        """Whether statistics of ``name`` (an estimator or a ``kron_*`` factor) exist."""
        raise NotImplementedError

    def fisher(self, estimator: str) -> Tensor:
        """Running diagonal estimate ``[*P]`` (or a running Kronecker factor, ``kron_*``)."""
        raise NotImplementedError

    def label_variance_term(self, term: str) -> Optional[Tensor]:
        """A label-noise variance term of the running estimate, ``[*P]`` (``None``: absent)."""
        raise NotImplementedError

    def sample_variance(self, estimator: str) -> Tensor:
        """Empirical variance of the running estimate (sample variance across inputs / N)."""
        raise NotImplementedError

    def effective_inputs(self) -> float:
        """Inputs whose plain average has the running estimate's variance (docs/math.md §4-§5)."""
        raise NotImplementedError

    def merge(self, other: "RunningDiagonal") -> None:
        """Merge another accumulator over different inputs into this one (cumulative only)."""
        raise ValueError("only cumulative averages (ema_decay=None) can be merged.")

    # --- shared --------------------------------------------------------------------

    def update(self, batch: BatchSums, num_inputs: int) -> None:
        """Add one collected batch from its batch sums (``diagonal_terms``)."""
        dtype = batch.dtype()
        if self._staged_dtype not in (None, dtype):  # the model changed precision
            self._fold()
            self._reset_staging()
        self._staged_dtype = dtype
        self._stage(batch, num_inputs)
        self.num_inputs += num_inputs
        self.num_steps += 1
        self.single_input_steps += num_inputs < 2
        self._staged_steps += 1
        if self._staged_steps == FOLD_EVERY:
            self._fold()

    def label_variance(self, estimator: str) -> Tensor:
        """Closed-form label-noise variance of the running estimate, ``[*P]``."""
        return self._label_variance_or_zero(ESTIMATOR_SPECS[estimator].variance, estimator)

    def bound(self, term: str) -> Tensor:
        """A bound term (docs/math.md §7) aggregated like the quantity it bounds, ``[*P]``.

        Bounds of ``exact`` are averaged like it; those of ``v1`` and ``v2`` like the
        label-noise variances (``1/(N²M)`` and ``w_t²``).
        """
        if TERMS[term].label_variance:
            return self._label_variance_or_zero(term, "exact")
        return self.fisher(term)

    def _label_variance_or_zero(self, term: Optional[str], like: str) -> Tensor:
        """A label-noise variance term (zeros shaped like ``fisher(like)`` where absent)."""
        value = None if term is None else self.label_variance_term(term)
        return torch.zeros_like(self.fisher(like)) if value is None else value

    def _reset_staging(self) -> None:
        self._staged: Statistics = _empty(self.KINDS)
        self._staged_products: Dict[Tuple[str, ...], Tensor] = {}
        self._staged_steps = 0
        self._staged_dtype: Optional[torch.dtype] = None

    def _staged_statistics(self) -> Statistics:
        """The staged statistics, with the staged products split into their keys."""
        return self._staged

    def _fold(self) -> None:
        """Fold the staged steps into the float64 statistics; staging restarts at zero."""
        steps = self._staged_steps
        if not steps:
            return
        for kind, staged in self._staged_statistics().items():
            decay = self._decay(kind) ** steps
            stats = self.stats[kind]
            if decay != 1.0:
                for value in stats.values():
                    value.mul_(decay)
            for name, value in staged.items():
                if name in stats:
                    stats[name].add_(value)
                else:
                    stats[name] = value.to(torch.float64, copy=True)
        for values in self._staged.values():
            for value in values.values():
                value.zero_()
        for value in self._staged_products.values():
            value.zero_()
        self._staged_steps = 0

    def state_dict(self) -> dict:
        """Everything needed to restore this accumulator exactly."""
        self._fold()
        return {
            "ema_decay": self.ema_decay,
            "mc_samples": self.mc_samples,
            "num_inputs": self.num_inputs,
            "num_steps": self.num_steps,
            "single_input_steps": self.single_input_steps,
            "stats": {k: v.clone() for k, v in self._saved_statistics().items()},
            "aliases": dict(self.aliases),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "RunningDiagonal":
        """A new accumulator restored from ``state_dict``."""
        acc = cls(state["ema_decay"], state["mc_samples"])
        acc.load_state_dict(state)
        return acc

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict`` (of the same averaging rule)."""
        if (state["ema_decay"] is None) != (self.ema_decay is None):
            raise ValueError(
                f"a state with ema_decay={state['ema_decay']!r} cannot be loaded into an "
                f"accumulator with ema_decay={self.ema_decay!r}."
            )
        self.ema_decay = state["ema_decay"]
        self.mc_samples = state["mc_samples"]
        self.num_inputs = state["num_inputs"]
        self.num_steps = state["num_steps"]
        self.single_input_steps = state.get("single_input_steps", 0)
        self.stats = self._loaded_statistics({k: v.clone() for k, v in state["stats"].items()})
        self.aliases = dict(state["aliases"])
        self._reset_staging()

    def _saved_statistics(self) -> Dict[str, Tensor]:
        """The statistics as ``state_dict`` saves them: one flat ``{key: tensor}``."""
        raise NotImplementedError

    def _loaded_statistics(self, saved: Dict[str, Tensor]) -> Statistics:
        """Inverse of ``_saved_statistics``."""
        raise NotImplementedError

    def to(self, device) -> "RunningDiagonal":
        """This accumulator with its statistics on ``device`` (in place; returns self)."""
        self._fold()
        self.stats = {
            kind: {k: v.to(device) for k, v in values.items()}
            for kind, values in self.stats.items()
        }
        self._reset_staging()
        return self

    def copy(self) -> "RunningDiagonal":
        """An independent copy (staged steps folded in)."""
        return RunningDiagonal.from_state_dict(self.state_dict())


class CumulativeDiagonal(RunningDiagonal):
    """The cumulative average: float64 sums of the batch sums, keyed like them.

    Kinds: ``sum`` (``{batch-sum key: Σ_t sums}``, squares under ``{term}_sq``).
    """

    KINDS = ("sum",)

    def __init__(self, ema_decay: Optional[float] = None, mc_samples: int = 1):
        if ema_decay is not None:
            raise ValueError(f"a cumulative average has ema_decay=None, got {ema_decay!r}.")
        super().__init__(None, mc_samples)

    def _decay(self, kind: str) -> float:
        return 1.0

    def _stage(self, batch: BatchSums, num_inputs: int) -> None:
        self.aliases.update(batch.aliases)
        staged = self._staged["sum"]
        for key, value in batch.sums.items():
            if key in staged:
                staged[key] += value
            else:
                staged[key] = value.clone()
        for keys, left, right in batch.products():
            if keys in self._staged_products:
                self._staged_products[keys].addmm_(left.T, right)
            else:
                self._staged_products[keys] = left.T @ right

    def _staged_statistics(self) -> Statistics:
        sums = dict(self._staged["sum"])
        for keys, product in self._staged_products.items():
            sums.update(zip(keys, product.split(product.shape[0] // len(keys))))
        return {"sum": sums}

    def merge(self, other: RunningDiagonal) -> None:
        """Merge another cumulative accumulator over different inputs into this one."""
        if not isinstance(other, CumulativeDiagonal):
            raise ValueError("only cumulative averages (ema_decay=None) can be merged.")
        if self.mc_samples != other.mc_samples:
            raise ValueError("cannot merge statistics with different mc_samples.")
        self._fold()
        sums = self.stats["sum"]
        for key, value in other.state_dict()["stats"].items():  # its staged steps folded in
            sums[key] = sums[key] + value if key in sums else value
        self.aliases.update(other.aliases)
        self.num_inputs += other.num_inputs
        self.num_steps += other.num_steps
        self.single_input_steps += other.single_input_steps

    def _sum(self, key: str) -> Tensor:
        return self.stats["sum"][self.aliases.get(key, key)]

    def has(self, name: str) -> bool:
        """Whether sums of ``name`` exist."""
        return name in self.stats["sum"] or name in self._staged["sum"]

    def fisher(self, estimator: str) -> Tensor:
        """``Σ_n g(x_n) / N``, ``[*P]``."""
        self._fold()
        return self._sum(estimator) / self.num_inputs

    def label_variance_term(self, term: str) -> Optional[Tensor]:
        """``Σ_n v(x_n) / (N² M)`` (``None`` where absent: ``exact``, or v2 where σ'' = 0)."""
        self._fold()
        if term not in self.stats["sum"]:
            return None
        return self.stats["sum"][term] / (self.num_inputs**2 * self.mc_samples)

    def sample_variance(self, estimator: str) -> Tensor:
        """``(Σ g² − (Σ g)²/N) / ((N−1) N)``, ``[*P]`` (NaN below two inputs)."""
        self._fold()
        n = self.num_inputs
        total, squares = self._sum(estimator), self._sum(estimator + "_sq")
        if n < 2:
            return torch.full_like(total, float("nan"))
        return (squares - total**2 / n).clamp_min(0.0) / ((n - 1) * n)

    def effective_inputs(self) -> float:
        """``N``."""
        return float(self.num_inputs)

    def _saved_statistics(self) -> Dict[str, Tensor]:
        return dict(self.stats["sum"])

    def _loaded_statistics(self, saved: Dict[str, Tensor]) -> Statistics:
        return {"sum": saved}


#: The EMA's kinds of statistic, with the key prefix its saved state gives each (the
#: layout of ``state_dict()["stats"]``, unchanged so that saved checkpoints load).
_EMA_SAVED_PREFIXES = {"mean": "mean_", "variance": "var_", "label_variance": "labelvar_"}
#: Saved key of ``Σ_t w_t²`` over the steps that have a sample variance (one scalar).
_EMA_SAVED_VARIANCE_WEIGHT = "varweight"


class EMADiagonal(RunningDiagonal):
    """The exponential moving average with bias-corrected weights.

    Kinds: ``mean`` (estimates, bounds of ``exact``, Kronecker factors; decay ``β``),
    ``variance`` (per-step sample variances of the estimates; ``β²``), ``label_variance``
    (per-step label-noise variance terms; ``β²``) and ``variance_weight`` (per estimator, the
    weight of the steps that have a sample variance, a scalar; ``β²``).
    """

    KINDS = ("mean", "variance", "label_variance", "variance_weight")

    def __init__(self, ema_decay: Optional[float] = None, mc_samples: int = 1):
        if ema_decay is None or not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay!r}.")
        super().__init__(ema_decay, mc_samples)

    def _decay(self, kind: str) -> float:
        return self.ema_decay if kind == "mean" else self.ema_decay**2

    def _gain(self, kind: str) -> float:
        gain = 1 - self.ema_decay
        return gain if kind == "mean" else gain**2

    def _stage(self, batch: BatchSums, num_inputs: int) -> None:
        step = _ema_step(batch.dense(), num_inputs, self.mc_samples)
        for kind, staged in self._staged.items():
            decay, gain, values = self._decay(kind), self._gain(kind), step[kind]
            for name in staged.keys() - values.keys():  # a term that is zero in this step
                staged[name].mul_(decay)
            for name, value in values.items():
                if name in staged:
                    staged[name].mul_(decay).add_(value, alpha=gain)
                else:
                    staged[name] = value * gain

    def has(self, name: str) -> bool:
        """Whether means of ``name`` exist."""
        return name in self.stats["mean"] or name in self._staged["mean"]

    def fisher(self, estimator: str) -> Tensor:
        """``Σ_t w_t Î^(t)``, ``[*P]``."""
        self._fold()
        return self.stats["mean"][estimator] / self._bias_correction()

    def label_variance_term(self, term: str) -> Optional[Tensor]:
        """``Σ_t w_t² Σ_n v / (N_t² M)`` (``None`` where absent)."""
        self._fold()
        if term not in self.stats["label_variance"]:
            return None
        return self.stats["label_variance"][term] / self._bias_correction() ** 2

    def sample_variance(self, estimator: str) -> Tensor:
        """``Σ_t w_t² Var_t``; a step of one input has no ``Var_t``.

        Such steps are left out and the sum is scaled back to all the weights (the other
        steps' variances stand in for theirs); with none left it is NaN.
        """
        self._fold()
        variance = self.stats["variance"][estimator] / self._bias_correction() ** 2
        if not self.single_input_steps:
            return variance
        weight = self.stats["variance_weight"].get(estimator)
        defined = weight.item() if weight is not None else 0.0
        if defined <= 0:
            return torch.full_like(variance, float("nan"))
        return variance * (self._sum_of_squared_gains() / defined)

    def effective_inputs(self) -> float:
        """The mean batch size over ``Σ_t w_t²``."""
        sum_sq_weights = self._sum_of_squared_gains() / self._bias_correction() ** 2
        return self.num_inputs / self.num_steps / sum_sq_weights

    def _sum_of_squared_gains(self) -> float:
        """``Σ_t ((1−β)β^(T−t))²``, the squared weights before bias correction."""
        beta, steps = self.ema_decay, self.num_steps
        return (1 - beta) ** 2 * (1 - beta ** (2 * steps)) / (1 - beta**2)

    def _bias_correction(self) -> float:
        return 1.0 - self.ema_decay**self.num_steps

    def _saved_statistics(self) -> Dict[str, Tensor]:
        saved = {
            prefix + name: value
            for kind, prefix in _EMA_SAVED_PREFIXES.items()
            for name, value in self.stats[kind].items()
        }
        weight = next(iter(self.stats["variance_weight"].values()), None)
        if weight is not None:
            saved[_EMA_SAVED_VARIANCE_WEIGHT] = weight
        return saved

    def _loaded_statistics(self, saved: Dict[str, Tensor]) -> Statistics:
        stats = _empty(self.KINDS)
        for key, value in saved.items():
            if key == _EMA_SAVED_VARIANCE_WEIGHT:
                continue
            kind = next(k for k, p in _EMA_SAVED_PREFIXES.items() if key.startswith(p))
            stats[kind][key[len(_EMA_SAVED_PREFIXES[kind]) :]] = value
        weight = saved.get(_EMA_SAVED_VARIANCE_WEIGHT)
        if weight is not None:
            stats["variance_weight"] = {e: weight.clone() for e in stats["variance"]}
        return stats


def _ema_step(sums: Dict[str, Tensor], n: int, mc_samples: int) -> Statistics:
    """One step's means and variances of its estimates (docs/math.md §5), by kind."""
    step = _empty(EMADiagonal.KINDS)
    for name in ESTIMATORS:
        if name in sums:
            total = sums[name]
            step["mean"][name] = total / n
            if name + "_sq" not in sums:  # no per-input summands (granularity "batch")
                continue
            m2 = (sums[name + "_sq"] - total**2 / n).clamp_min_(0.0)
            step["variance"][name] = m2 / ((n - 1) * n) if n > 1 else torch.zeros_like(m2)
            step["variance_weight"][name] = total.new_tensor(float(n > 1))
    for term, spec in TERMS.items():
        if term in sums and spec.label_variance:
            step["label_variance"][term] = sums[term] / (n**2 * mc_samples)
        elif term in sums and spec.bounds:  # bounds of exact: averaged like it
            step["mean"][term] = sums[term] / n
    for key in sums:
        if key.startswith(KRONECKER_PREFIX):
            step["mean"][key] = sums[key] / n
    return step


def _empty(kinds) -> Statistics:
    return {kind: {} for kind in kinds}
