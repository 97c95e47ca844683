"""``FisherEstimates``: a detached snapshot of a monitor's running diagonal estimates."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from fimhooks.fisher.granularity import GRANULARITIES, vectors_per_pass
from fimhooks.fisher.guidance import (
    cost_per_input,
    draws_suggested,
    inputs_needed,
    recommended_granularity,
    rse_at_same_cost,
)
from fimhooks.fisher.quantities import (
    BOUND_SIDES,
    CLOSED_FORM,
    ESTIMATOR_SPECS,
    ESTIMATORS,
    bound_term,
    label_sampled,
)
from fimhooks.fisher.running import RunningDiagonal
from fimhooks.show.table import summary_table

#: Relative standard error that the guidance aims at by default.
DEFAULT_TARGET = 0.05

Diagonal = Dict[str, Tensor]


class FisherEstimates:
    """Running diagonal estimates and their variances, keyed by parameter name.

    Every tensor is float64, shaped like its parameter, per observation (docs/math.md §1).

    Args:
        accumulators: ``{param name: RunningDiagonal}`` (owned by the snapshot).
        layer_of: ``{param name: module path}``.
        layer_types: ``{module path: class name}``, shown beside the paths.
        estimators: The estimators that were collected.
        exact_pass: Whether the closed-form (exact-pass) quantities were collected.
        label_noise: Where the label-noise variances come from: ``"closed form"`` (the
            exact pass), ``"draws"`` (the spread among ``M ≥ 2`` label draws, docs/math.md
            §7d) or ``None`` (not collected). Default: ``"closed form"`` with the exact pass.
        granularity: Where Î₁ squared the score (docs/math.md §7d); ``"batch"`` steps have
            no per-input summands, hence no sample variance across inputs.
        bounds: Whether the bounds of docs/math.md §7 were collected.
        block_errors: Whether the layers' full-block Frobenius errors were collected.
        num_outputs: Outputs ``C`` of the network (the exact pass backpropagates ``C``
            vectors per input).
        positions_per_input: Mean positions ``T`` per input of the collected outputs
            (padded), which sets the cost of granularity ``"token"``.
        skipped: Collected batches skipped for non-finite statistics.
        generic_layers: Paths of the layers whose per-input gradients came from the
            generic ``torch.func`` rule.
    """

    def __init__(
        self,
        accumulators: Dict[str, RunningDiagonal],
        *,
        layer_of: Dict[str, str],
        estimators: tuple,
        layer_types: Optional[Dict[str, str]] = None,
        exact_pass: bool,
        label_noise: Optional[str] = None,
        granularity: str = "token",
        bounds: bool = False,
        block_errors: bool = False,
        num_outputs: int = 1,
        positions_per_input: float = 1.0,
        skipped: int = 0,
        generic_layers: tuple = (),
    ):
        in_model_order = [n for n in layer_of if n in accumulators]
        in_model_order += [n for n in accumulators if n not in layer_of]
        self._acc = {n: accumulators[n] for n in in_model_order}
        self._layer_of = layer_of
        self._layer_types = layer_types or {}
        self.estimators = tuple(estimators)
        self.exact_pass = exact_pass
        self.label_noise = CLOSED_FORM if exact_pass else label_noise
        self.granularity = granularity
        self.has_bounds = bounds
        self.has_block_errors = block_errors
        self.num_outputs = num_outputs
        self.positions_per_input = positions_per_input
        self.skipped = skipped
        self.generic_layers = tuple(generic_layers)

    @property
    def layers(self) -> Dict[str, str]:
        """``{param name: module path}`` of the model's parameters, in model order."""
        return dict(self._layer_of)

    def layer_of(self, name: str) -> str:
        """Path of the module that owns the parameter ``name``."""
        return self._layer_of[name]

    def accumulators(self) -> Dict[str, RunningDiagonal]:
        """The running statistics by parameter name, in model order (shared, not copied)."""
        return dict(self._acc)

    @property
    def num_inputs(self) -> int:
        """Inputs accumulated so far."""
        return max((a.num_inputs for a in self._acc.values()), default=0)

    def merge(self, other: "FisherEstimates") -> "FisherEstimates":
        """Estimates over the inputs of both, e.g. from two processes (docs/math.md §5).

        Both must be cumulative averages (``ema_decay=None``) of the same model with the
        same options; the result equals what one monitor would report on all the inputs.
        """
        others = other.accumulators()
        if set(self._acc) != set(others) or self.estimators != other.estimators:
            raise ValueError("can only merge estimates of the same parameters and estimators.")
        merged = {name: acc.copy() for name, acc in self._acc.items()}
        for name, acc in merged.items():
            acc.merge(others[name])
        return FisherEstimates(
            merged,
            layer_of=self._layer_of,
            estimators=self.estimators,
            layer_types=self._layer_types,
            exact_pass=self.exact_pass,
            label_noise=self.label_noise,
            granularity=self.granularity,
            bounds=self.has_bounds and other.has_bounds,
            block_errors=self.has_block_errors and other.has_block_errors,
            num_outputs=self.num_outputs,
            positions_per_input=(
                self.positions_per_input * self.num_inputs
                + other.positions_per_input * other.num_inputs
            )
            / max(1, self.num_inputs + other.num_inputs),
            skipped=self.skipped + other.skipped,
            generic_layers=tuple(dict.fromkeys(self.generic_layers + other.generic_layers)),
        )

    def has(self, name: str) -> bool:
        """Whether the parameter ``name`` has collected statistics."""
        return name in self._acc

    def fisher(self, estimator: str) -> Diagonal:
        """Running diagonal estimate ``{name: [*param.shape]}``."""
        self._check(estimator)
        return {n: a.fisher(estimator) for n, a in self._acc.items()}

    def variance(self, estimator: str, granularity: Optional[str] = None) -> Diagonal:
        """Label-noise variance of the running estimate (docs/math.md §3, §5, §7d).

        The closed form with the exact pass, else its unbiased estimate from the spread
        among ``mc_samples ≥ 2`` draws (``label_noise`` says which). Zero for ``"exact"``
        and ``"EF"``, which have no label noise.

        Args:
            estimator: The estimator.
            granularity: ``"token"``, ``"input"`` or ``"batch"``: Î₁'s variance had it
                squared the score at that granularity, on the same inputs and passes
                (closed form only; default: the monitor's own).
        """
        self._check(estimator)
        if granularity not in (None, self.granularity):
            return self._variance_at(estimator, granularity)
        if self.label_noise is None:
            raise ValueError(
                "the label-noise variance needs the exact pass ('exact' or 'I2' in "
                "estimators) or mc_samples >= 2 (its estimate from the draws' spread); "
                f"with estimators={self.estimators} use empirical_variance({estimator!r})."
            )
        return {n: a.label_variance(estimator) for n, a in self._acc.items()}

    def _variance_at(self, estimator: str, granularity: str) -> Diagonal:
        """Î₁'s closed-form variance at another granularity (docs/math.md §7d).

        ``v1`` at ``"token"``, plus ``2 x1`` (between an input's positions) at ``"input"``
        and ``"batch"``, plus ``2 xb`` (between a pass's inputs) at ``"batch"``.
        """
        if (
            estimator != "I1"
            or self.label_noise != CLOSED_FORM
            or granularity not in GRANULARITIES
            or self.granularity == "batch"
        ):
            raise ValueError(
                "variance(e, granularity=...) gives Î₁ at granularities 'token', 'input' and "
                "'batch' from the exact pass's closed form (estimators with 'exact' or 'I2', "
                f"granularity 'token' or 'input'); got {estimator!r} at {granularity!r} "
                f"from a monitor at {self.granularity!r} (label noise: {self.label_noise})."
            )
        # +1 where the target squares per input or batch and this monitor per token, −1
        # the other way round (its v1 holds them), else 0
        x1_sign = (granularity != "token") - (self.granularity != "token")

        def at(acc):
            v1, x1 = acc.label_variance("I1"), acc.label_variance_term("x1")
            if x1 is not None:
                v1 = v1 + 2 * x1_sign * x1
            if granularity != "batch":
                return v1
            xb = acc.label_variance_term("xb")
            if xb is None:
                raise ValueError(
                    "the cross terms between inputs were not collected (statistics saved "
                    "by an older version): variance(e, granularity='batch') needs a "
                    "monitor that collected them."
                )
            return v1 + 2 * xb

        return {n: at(a) for n, a in self._acc.items()}

    def bounds(self, estimator: str) -> Tuple[Diagonal, Diagonal]:
        """Lower and upper bounds of docs/math.md §7 (Soen & Sun 2024, Thm 4.1).

        For ``"exact"`` they bound ``fisher("exact")``, for ``"I1"`` and ``"I2"`` their
        ``variance``, entry by entry: per observation ``‖∂ᵢh‖²`` (``‖∂ᵢh‖⁴``,
        ``‖∂²ᵢh‖²``) times the extreme eigenvalues of ``I_h`` (of ``K − I_h⊗I_h``),
        aggregated over inputs and steps with the weights of the quantity they bound.

        Returns:
            ``(lower, upper)``, each ``{name: [*param.shape]}``.
        """
        self._check(estimator)
        term = ESTIMATOR_SPECS[estimator].bounded
        if term is None:
            raise ValueError(f"{estimator!r} has no bounds; they are for 'exact', 'I1', 'I2'.")
        if not self.has_bounds:
            raise ValueError(
                "bounds were not collected: create the FisherMonitor with bounds=True."
            )
        lower, upper = (
            {n: a.bound(bound_term(term, side)) for n, a in self._acc.items()}
            for side in BOUND_SIDES
        )
        return lower, upper

    def frobenius_error(self, estimator: str, structure: str = "block") -> Dict[str, float]:
        """Expected squared Frobenius error of each layer's running estimate (docs/math.md §6).

        Label noise only, like ``variance``: ``structure="diag"`` gives ``Σ_i variance(e)_i``
        over the layer's entries (its diagonal's error); ``structure="block"`` that of the
        layer's full block (weight and bias together), ``E‖Î_B − I_B‖²_F``, per step
        ``(1/(N²M)) Σ_n (E_y‖s_B‖⁴ − ‖I_B(x_n)‖²_F)`` and combined over steps with ``w_t²``.
        The block needs ``block_errors=True`` on the monitor and the chain path; Î₂'s block
        is known (zero) only where nothing above the layer is curved.

        Returns:
            ``{layer path: error}``.
        """
        self._check(estimator)
        if not label_sampled(estimator) or not self.exact_pass:
            raise ValueError(
                "frobenius_error is the label noise of 'I1' or 'I2' and needs the exact pass "
                f"('exact' or 'I2' in estimators); got {estimator!r} with {self.estimators}."
            )
        if structure == "diag":
            return {
                layer: sum(self._acc[n].label_variance(estimator).sum().item() for n in names)
                for layer, names in self._layers().items()
            }
        if structure != "block":
            raise ValueError(f"structure must be 'block' or 'diag', got {structure!r}.")
        if not self.has_block_errors:
            raise ValueError(
                "block errors were not collected: create the FisherMonitor with block_errors=True."
            )
        return {
            layer: self._block_error(estimator, layer, names)
            for layer, names in self._layers().items()
        }

    def _block_error(self, estimator: str, layer: str, names: List[str]) -> float:
        def found(term):
            values = [self._acc[n].label_variance_term(term) for n in names]
            return [value for value in values if value is not None]

        values = found(ESTIMATOR_SPECS[estimator].block)
        if not values:
            reason = (
                "block errors are collected on the chain path only (models that are a "
                "chain of supported layers, one observation per input)"
                if not found("block_v1")
                else "Î₂'s block error needs the block's Hessian, known only where nothing "
                "above the layer is curved (then it is zero)"
            )
            raise ValueError(
                f"no block error of {estimator!r} for layer '{layer}': {reason}. "
                "structure='diag' is available."
            )
        return values[0].item()

    def empirical_fisher_bias(self) -> Diagonal:
        """``EF − exact`` per entry: the bias of the empirical Fisher (docs/math.md §7b).

        Both are running averages over the same inputs and steps; its noise is
        ``empirical_variance("EF")`` (the empirical Fisher has no label noise).
        """
        self._check("EF")
        if not self.exact_pass:
            raise ValueError("the bias of 'EF' needs 'exact' or 'I2' in estimators.")
        return {n: a.fisher("EF") - a.fisher("exact") for n, a in self._acc.items()}

    def data_variance(self) -> Diagonal:
        """Data-noise variance of the running estimate (docs/math.md §4).

        With the exact pass the sample variance of ``exact``; with the draws' spread
        (``label_noise == "draws"``) the empirical variance of the first sampled estimator
        less its label-noise variance, clamped at zero.
        """
        self._check_collected()
        self._check_per_input("data_variance")
        if self.exact_pass:
            return {n: a.sample_variance("exact") for n, a in self._acc.items()}
        sampled = [e for e in self.estimators if label_sampled(e)]
        if self.label_noise is None or not sampled:
            raise ValueError(
                "data_variance needs 'exact' or 'I2' in estimators, or 'I1' with mc_samples >= 2."
            )
        return {
            n: (self._variances(sampled[0], a)[1] - a.label_variance(sampled[0])).clamp_min(0)
            for n, a in self._acc.items()
        }

    def empirical_variance(self, estimator: str) -> Diagonal:
        """Sample variance of the per-input summands over ``N`` (docs/math.md §4)."""
        self._check(estimator)
        self._check_per_input("empirical_variance")
        return {n: a.sample_variance(estimator) for n, a in self._acc.items()}

    def layer_statistics(self, target: float = DEFAULT_TARGET) -> Dict[str, dict]:
        """Per-layer scalars, in model order (the JSON log's ``layers`` entry).

        For each collected estimator: ``trace``; ``rse``, the relative standard error
        ``sqrt(Σ_i Var_i) / ‖F‖`` with ``Var`` = label + data noise (empirical variance
        without the exact pass); ``label_share`` and ``data_share`` of that variance;
        ``inputs_needed``, the inputs that reach ``target`` at this monitor's label draws
        and ``draws_suggested`` (``guidance``); ``rse_histogram``, counts of the per-entry
        relative standard errors over ``RSE_BINS``; with bounds, ``bound_tightness`` and
        ``bound_lower``: the layer's sum of the upper (lower) bounds over the sum of what
        they bound (``bounds``; ``inf``/``nan`` where that is zero); for the empirical
        Fisher with the exact pass, ``bias`` and ``trace_bias`` (``_bias``); for Î₁ with
        the exact pass, per granularity (``{"token", "input", "batch": ...}``, docs/math.md
        §7d): ``rse_by_granularity`` on the same inputs, ``vectors_by_granularity`` backpropagated per pass
        and ``rse_at_same_cost``, the rse had it spent this monitor's vectors. Per layer
        also ``params``, ``zero_v2`` (entries of Î₂ without label noise), ``recommended``:
        the unbiased estimator reaching ``target`` with the fewest backpropagated vectors,
        and with the granularities' rse ``recommended_granularity``: Î₁'s of least
        ``rse² × vectors``.
        """
        self._check_collected()
        return {layer: self._layer_stats(names, target) for layer, names in self._layers().items()}

    def relative_errors(self) -> Dict[str, Dict[str, float]]:
        """``{layer: {estimator: rse}}``, the ``rse`` of ``layer_statistics`` alone (cheaper)."""
        self._check_collected()
        errors = {}
        for layer, names in self._layers().items():
            errors[layer] = {}
            for e in self.estimators:
                sq_norm = sum((self._acc[n].fisher(e) ** 2).sum().item() for n in names)
                variance = sum(self._variances(e, self._acc[n])[1].sum().item() for n in names)
                errors[layer][e] = math.sqrt(variance / sq_norm) if sq_norm > 0 else math.inf
        return errors

    def _layer_stats(self, names: List[str], target: float) -> dict:
        accs = [self._acc[n] for n in names]
        # per parameter: one frozen during the run has seen fewer inputs than its layer
        n_eff = [a.effective_inputs() for a in accs]
        draws = accs[0].mc_samples
        stats = {
            "module": self._layer_types.get(self._layer_of[names[0]], ""),
            "params": sum(a.fisher(self.estimators[0]).numel() for a in accs),
        }
        costs = {}
        for e in self.estimators:
            fisher = _cat(a.fisher(e) for a in accs)
            variances = [self._variances(e, a) for a in accs]
            total = _cat(t for _, t in variances)
            total_sum = total.sum().item()
            sums = [
                (t.sum().item(), 0.0 if label is None else label.sum().item())
                for label, t in variances
            ]
            label_sum = sum(label for _, label in sums)
            # the noise of one input: each parameter's variance times its own input count
            per_input = [(t * n, label * n) for (t, label), n in zip(sums, n_eff)]
            label_noise, data_noise = _noises(per_input, draws, self.label_noise, self.granularity)
            sq_norm = (fisher * fisher).sum().item()
            needed = inputs_needed(label_noise, data_noise, sq_norm, target, draws)
            costs[e] = needed * cost_per_input(e, draws, self.num_outputs)
            share = None
            if math.isfinite(data_noise) and self.label_noise is not None:
                share = total_sum and label_sum / total_sum
                share = 1.0 if share > 1.0 else share
            stats[e] = {
                "trace": fisher.sum().item(),
                "rse": math.sqrt(total_sum / sq_norm) if sq_norm > 0 else math.inf,
                "label_share": share,
                "data_share": None if share is None else 1.0 - share,
                "inputs_needed": needed,
                "draws_suggested": draws_suggested(label_noise, data_noise)
                if self.label_noise is not None and label_sampled(e)
                else None,
                "rse_histogram": _rse_histogram(fisher, total),
            }
            if e == "I1" and any(a.label_variance_term("xb") is not None for a in accs):
                stats[e].update(self._granularities(names, sq_norm, draws))
                stats["recommended_granularity"] = recommended_granularity(
                    stats[e]["rse_by_granularity"], stats[e]["vectors_by_granularity"]
                )
            if self.has_bounds and ESTIMATOR_SPECS[e].bounded:
                stats[e].update(_bound_ratios(e, accs))
            if ESTIMATOR_SPECS[e].needs_data_labels and self.exact_pass:
                stats[e].update(_bias(fisher, _cat(a.fisher("exact") for a in accs)))
        curved = [e for e in self.estimators if ESTIMATOR_SPECS[e].needs_curvature]
        if curved and self.exact_pass:
            stats["zero_v2"] = int(sum((a.label_variance(curved[0]) == 0).sum() for a in accs))
        unbiased = [e for e in costs if ESTIMATOR_SPECS[e].unbiased] or list(costs)
        # at equal cost, the estimator without label noise
        stats["recommended"] = min(unbiased, key=lambda e: (costs[e], label_sampled(e)))
        return stats

    def _granularities(self, names: List[str], sq_norm: float, draws: int) -> dict:
        """A layer's Î₁ at each granularity on the same inputs: rse, cost, rse at equal cost."""
        data = sum(self._acc[n].sample_variance("exact").sum().item() for n in names)
        rse = {}
        for granularity in GRANULARITIES:
            label = self.variance("I1", granularity=granularity)
            total = data + sum(label[n].sum().item() for n in names)
            rse[granularity] = math.sqrt(total / sq_norm) if sq_norm > 0 else math.inf
        vectors = {g: vectors_per_pass(g, draws, self.positions_per_input) for g in GRANULARITIES}
        return {
            "rse_by_granularity": rse,
            "vectors_by_granularity": vectors,
            "rse_at_same_cost": rse_at_same_cost(rse, vectors, self.granularity),
        }

    def standard_errors(self, estimator: str) -> Diagonal:
        """Standard error of each entry of the running estimate, ``sqrt(label + data)``.

        The empirical variance stands in for both without the exact pass.
        """
        self._check(estimator)
        return {n: self._variances(estimator, a)[1].sqrt() for n, a in self._acc.items()}

    def _variances(self, estimator: str, acc: RunningDiagonal):
        """``(label, label + data)`` variances of a parameter's running estimate (docs/math.md §4).

        Without the exact pass: ``(None, empirical variance)``, which holds both noises,
        or with the draws' spread ``(its label-noise estimate, empirical variance)``.
        The empirical Fisher has no label noise: ``(0, its empirical variance)``.
        """
        known = self.label_noise is not None
        if self.granularity == "batch":  # the label noise alone is known
            label = acc.label_variance(estimator) if known else None
            return label, label if known else torch.full_like(acc.fisher(estimator), math.nan)
        if ESTIMATOR_SPECS[estimator].needs_data_labels:
            empirical = acc.sample_variance(estimator)
            return (torch.zeros_like(empirical) if known else None), empirical
        if not self.exact_pass:
            empirical = acc.sample_variance(estimator)
            return (acc.label_variance(estimator) if known else None), empirical
        label = acc.label_variance(estimator)
        return label, label + acc.sample_variance("exact")

    def kronecker_factors(self, kind: str) -> Dict[str, tuple]:
        """Running Kronecker factors ``(A, G)`` by Linear layer path (docs/math.md §6).

        Args:
            kind: ``"sampled"`` (BackPACK's KFAC, Î₁-type) or ``"exact"`` (its KFLR, the
                expectation of Î₂).

        Returns:
            ``{layer: (A [in(+1), in(+1)], G [out, out])}``, per observation; empty unless a
            ``FisherPreconditioner`` with ``structure="kfac"`` asked the monitor for them.
        """
        key = f"kron_G_{kind}"
        factors = {}
        for name, acc in self._acc.items():
            if acc.has(key):
                factors[self._layer_of[name]] = (acc.fisher("kron_A"), acc.fisher(key))
        return factors

    def summary(self, target: float = DEFAULT_TARGET) -> str:
        """Per-layer table: traces, relative standard errors, noise shares, guidance."""
        return summary_table(self, target)

    def _layers(self) -> Dict[str, List[str]]:
        layers: Dict[str, List[str]] = {}
        for name, layer in self._layer_of.items():  # model order
            if name in self._acc:
                layers.setdefault(layer, []).append(name)
        return layers

    def _check(self, estimator: str) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose from {ESTIMATORS}.")
        if estimator not in self.estimators:
            raise ValueError(
                f"{estimator!r} was not collected; the monitor computes {self.estimators}."
            )
        self._check_collected()

    def _check_per_input(self, what: str) -> None:
        if self.granularity == "batch":
            raise ValueError(
                f"{what} is undefined at granularity 'batch': its steps square the "
                "batch's score, so there are no per-input summands to vary across inputs. "
                "Use granularity 'input' or 'token' for the data noise."
            )

    def _check_collected(self) -> None:
        if not self._acc:
            raise RuntimeError("no batch has been collected yet.")

    def __repr__(self) -> str:
        return (
            f"FisherEstimates(estimators={self.estimators}, num_inputs={self.num_inputs}, "
            f"parameters={len(self._acc)}, skipped={self.skipped})"
        )


#: Log10-spaced bin edges of the per-entry relative standard error histograms.
BINS_PER_DECADE = 4
RSE_BINS = [
    10 ** (k / BINS_PER_DECADE) for k in range(-3 * BINS_PER_DECADE, 3 * BINS_PER_DECADE + 1)
]


def _noises(per_input: list, draws: int, label_noise, granularity: str) -> Tuple[float, float]:
    """A layer's label noise of one input and one draw, and its data noise of one input.

    Args:
        per_input: ``[(label + data, label)]`` variances of one input, per parameter.
        draws: ``M``.
        label_noise: ``FisherEstimates.label_noise``.
        granularity: ``"batch"`` has no data noise (NaN).
    """
    if label_noise is None:  # the empirical variance holds both noises at the current draws
        return 0.0, sum(t for t, _ in per_input)
    label = sum(v for _, v in per_input) * draws
    if granularity == "batch":
        return label, math.nan
    data = sum(t - v for t, v in per_input)
    if label_noise != CLOSED_FORM and data < 0:  # the draws' estimate is noisy
        data = 0.0
    return label, data


def _rse_histogram(fisher: Tensor, variance: Tensor) -> List[int]:
    """Counts of per-entry ``sqrt(Var_i) / |F_i|`` in ``RSE_BINS`` (outliers in end bins)."""
    keep = fisher != 0
    rse = variance[keep].clamp_min(0).sqrt() / fisher[keep].abs()
    bins = len(RSE_BINS) - 1
    index = ((rse.log10() + 3) * BINS_PER_DECADE).floor().nan_to_num(0).clamp(0, bins - 1)
    return torch.bincount(index.long(), minlength=bins).tolist()


def _bound_ratios(estimator: str, accs: List[RunningDiagonal]) -> dict:
    """A layer's summed lower and upper bounds over the summed quantity they bound."""
    term = ESTIMATOR_SPECS[estimator].bounded

    def total(values) -> float:
        return sum(v.sum().item() for v in values)

    if label_sampled(estimator):
        actual = total(a.label_variance(estimator) for a in accs)
    else:  # it bounds the estimate itself
        actual = total(a.fisher(estimator) for a in accs)
    ratios = {}
    for key, side in (("bound_lower", "lower"), ("bound_tightness", "upper")):
        bound = total(a.bound(bound_term(term, side)) for a in accs)
        ratios[key] = bound / actual if actual > 0 else (math.nan if bound == 0 else math.inf)
    return ratios


def _bias(empirical: Tensor, exact: Tensor) -> dict:
    """The empirical Fisher's bias over a layer, relative to the exact diagonal.

    ``bias``: ``‖EF − exact‖ / ‖exact‖`` (comparable with an ``rse``); ``trace_bias``:
    ``(tr EF − tr exact) / tr exact``.
    """
    norm, trace = exact.norm().item(), exact.sum().item()
    return {
        "bias": (empirical - exact).norm().item() / norm if norm > 0 else math.inf,
        "trace_bias": (empirical.sum().item() - trace) / trace if trace > 0 else math.inf,
    }


def _cat(tensors) -> Tensor:
    return torch.cat([t.flatten() for t in tensors])
