"""``estimate``: one pass of a ``FisherMonitor`` over a batch or an iterable of batches."""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from fimhooks.estimates import FisherEstimates
from fimhooks.fisher.quantities import any_needs
from fimhooks.monitor import FisherMonitor

Batch = Union[Tensor, tuple, dict]


def estimate(
    model: nn.Module,
    likelihood: Union[str, nn.Module],
    data: Union[Batch, Iterable[Batch]],
    *,
    loss: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    progress: bool = True,
    target_rse: Optional[float] = None,
    max_inputs: Optional[int] = None,
    layers: Optional[Sequence[str]] = None,
    **options,
) -> FisherEstimates:
    """Diagonal Fisher estimates over ``data`` in one shot.

    Args:
        model: The network (left unchanged: ``p.grad`` is not touched).
        likelihood: A likelihood name or the loss that encodes it (see ``FisherMonitor``).
        data: One batch or an iterable of batches (a list counts as an iterable). A batch is
            a tensor ``x``, a tuple ``(x, y, ...)`` whose first entry is the input, or a dict
            of keyword arguments of the model (``model(**batch)``). Î₁ and Î₂ never use the
            labels ``y``: the monitor draws its own. ``"EF"`` needs them: every batch must
            then be a tuple ``(x, y, ...)``.
        loss: With ``"EF"``: the loss ``loss(output, y)`` whose gradient at the output gives
            the data's labels (default: the likelihood's negative log-likelihood, i.e. the
            loss module given as ``likelihood``, or cross-entropy with the class axis last
            for ``"categorical"``, binary cross-entropy with logits for ``"bernoulli"``).
        progress: Show a tqdm progress bar.
        target_rse: Stop once every layer's relative standard error (``relative_errors``,
            label and data noise) is at most this, for every collected estimator; a
            warning names the layers that have not reached it when the data runs out.
        max_inputs: Stop once this many inputs are collected.
        layers: The layers (module paths) ``target_rse`` looks at (default: all).
        **options: ``FisherMonitor`` options (``mc_samples``, ``estimators``, ...).

    Returns:
        The estimates after all batches (cumulative average unless ``ema_decay``).

    Raises:
        ValueError: if no parameter of ``model`` requires grad; with ``"EF"``, for a batch
            without labels; ``loss`` without ``"EF"``.
    """
    if isinstance(model, nn.Module) and not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"fimhooks.estimate: no parameter of this {type(model).__name__} requires grad "
            "(all are frozen), so there is nothing to estimate; set requires_grad=True on "
            "the parameters whose Fisher you want."
        )
    _check_stopping(target_rse, max_inputs, layers)
    batches = [data] if isinstance(data, (Tensor, tuple, dict)) else data
    monitor = FisherMonitor(model, likelihood, **options)
    try:
        empirical = any_needs(monitor.estimators, "needs_data_labels")
        if loss is not None and not empirical:
            raise ValueError(
                "fimhooks.estimate: loss= only gives 'EF' the data's labels (Î₁, Î₂ and exact "
                "draw theirs from the model); add 'EF' to estimators or leave loss out."
            )
        loss = _negative_log_likelihood(likelihood) if loss is None else loss
        with torch.enable_grad():
            for batch in tqdm(batches, desc="fimhooks", disable=not progress, leave=False):
                labels = _labels(batch) if empirical else None
                output = _forward(model, batch)
                if options.get("output") is not None:
                    output = options["output"](output)
                with monitor:  # a backward to the output is all the monitor needs
                    scalar = output.sum() if labels is None else loss(output, labels)
                    # not backward(inputs=[output]): nested backward passes from a
                    # tensor whose .grad that backward fills fail in torch
                    torch.autograd.grad(scalar, output)
                if target_rse is not None and _reached(monitor, target_rse, layers):
                    return monitor.estimates()
                if max_inputs is not None and monitor.live_estimates().num_inputs >= max_inputs:
                    break
        est = monitor.estimates()
        if target_rse is not None:
            _warn_unreached(est, target_rse, layers)
        return est
    finally:
        monitor.remove()


def _check_stopping(target_rse, max_inputs, layers) -> None:
    if target_rse is not None and not (isinstance(target_rse, (int, float)) and target_rse > 0):
        raise ValueError(f"target_rse must be a positive number, got {target_rse!r}.")
    if max_inputs is not None and not (isinstance(max_inputs, int) and max_inputs >= 1):
        raise ValueError(f"max_inputs must be a positive integer, got {max_inputs!r}.")
    if layers is not None and target_rse is None:
        raise ValueError("layers= names the layers that target_rse looks at: pass target_rse.")


def _worst_errors(est: FisherEstimates, layers) -> Dict[str, float]:
    """Each looked-at layer's largest rse over the estimators (NaN: not known yet)."""
    errors = est.relative_errors()
    if layers is not None:
        unknown = sorted(set(layers) - set(errors))
        if unknown:
            raise ValueError(
                f"layers {unknown} have no collected parameters; the layers are {sorted(errors)}."
            )
        errors = {layer: errors[layer] for layer in layers}
    return {layer: max(rse.values()) for layer, rse in errors.items()}


def _reached(monitor: FisherMonitor, target: float, layers) -> bool:
    if not monitor.collected_steps:
        return False
    return all(rse <= target for rse in _worst_errors(monitor.live_estimates(), layers).values())


def _warn_unreached(est: FisherEstimates, target: float, layers) -> None:
    if not est.num_inputs:
        return
    missed = {k: v for k, v in _worst_errors(est, layers).items() if not v <= target}
    if missed:
        worst = max(missed, key=lambda k: missed[k] if missed[k] == missed[k] else float("inf"))
        warnings.warn(
            f"fimhooks.estimate: target_rse={target} not reached after {est.num_inputs} "
            f"inputs on {len(missed)} layer(s), the worst '{worst}' at {missed[worst]:.3g}: "
            "pass more data (or more label draws, mc_samples, where label noise dominates).",
            RuntimeWarning,
            stacklevel=3,
        )


def _negative_log_likelihood(likelihood: Union[str, nn.Module]) -> Callable:
    """The loss whose output gradient ``'EF'`` reads the labels from, for tuple batches."""
    if isinstance(likelihood, nn.Module):
        return likelihood
    if likelihood == "categorical":
        return lambda h, y: F.cross_entropy(h.movedim(-1, 1), y, reduction="sum")
    # "gaussian" by name with "EF" is refused by FisherMonitor: it needs the nn.MSELoss
    return lambda h, y: F.binary_cross_entropy_with_logits(h, y.to(h.dtype), reduction="sum")


def _labels(batch) -> Tensor:
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], Tensor):
        return batch[1]
    raise ValueError(
        "fimhooks.estimate: 'EF' squares the gradient of the negative log-likelihood at the "
        f"data's labels, and this batch ({type(batch).__name__}) has none: pass batches "
        "(x, y), leave 'EF' out of estimators, or collect it with a FisherMonitor around "
        "your own backward pass."
    )


def _forward(model: nn.Module, batch):
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return model(batch[0])
    raise TypeError(
        f"a batch must be a tensor, a tuple (x, ...) or a dict of the model's keyword "
        f"arguments; got {type(batch).__name__}."
    )
