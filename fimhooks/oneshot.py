"""``estimate``: one pass of a ``FisherMonitor`` over a batch or an iterable of batches."""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

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
        return monitor.estimates()
    finally:
        monitor.remove()


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
