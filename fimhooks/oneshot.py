"""``estimate``: one pass of a ``FisherMonitor`` over a batch or an iterable of batches."""

from __future__ import annotations

from typing import Iterable, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fimhooks.estimates import FisherEstimates
from fimhooks.monitor import FisherMonitor

Batch = Union[Tensor, tuple, dict]


def estimate(
    model: nn.Module,
    likelihood: Union[str, nn.Module],
    data: Union[Batch, Iterable[Batch]],
    *,
    progress: bool = True,
    **options,
) -> FisherEstimates:
    """Diagonal Fisher estimates over ``data`` in one shot.

    Args:
        model: The network (left unchanged: ``p.grad`` is not touched).
        likelihood: A likelihood name or the loss that encodes it (see ``FisherMonitor``).
        data: One batch or an iterable of batches (a list counts as an iterable). A batch is
            a tensor ``x``, a tuple ``(x, ...)`` whose first entry is the input, or a dict of
            keyword arguments of the model (``model(**batch)``). Labels are never used for
            the Fisher: the monitor samples its own.
        progress: Show a tqdm progress bar.
        **options: ``FisherMonitor`` options (``mc_samples``, ``estimators``, ...).

    Returns:
        The estimates after all batches (cumulative average unless ``ema_decay``).
    """
    batches = [data] if isinstance(data, (Tensor, tuple, dict)) else data
    monitor = FisherMonitor(model, likelihood, **options)
    try:
        for batch in tqdm(batches, desc="fimhooks", disable=not progress, leave=False):
            output = _forward(model, batch)
            if options.get("output") is not None:
                output = options["output"](output)
            with monitor:  # a backward to the output is all the monitor needs
                # (not backward(inputs=[output]): nested backward passes from a tensor
                # whose .grad that backward fills fail in torch)
                torch.autograd.grad(output.sum(), output)
        return monitor.estimates()
    finally:
        monitor.remove()


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
