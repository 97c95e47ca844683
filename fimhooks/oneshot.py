"""``estimate``: one pass of a ``FisherMonitor`` over a batch or an iterable of batches."""

from __future__ import annotations

from typing import Iterable, Union

from torch import Tensor, nn
from tqdm.auto import tqdm

from fimhooks.estimates import FisherEstimates
from fimhooks.monitor import FisherMonitor

Batch = Union[Tensor, tuple, list]


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
        model: The network (left unchanged: its gradients and hooks are restored).
        likelihood: A likelihood name or the loss that encodes it (see ``FisherMonitor``).
        data: One batch (a tensor ``x`` or a pair ``(x, y)``) or an iterable of them.
            Labels are never used for the Fisher: the monitor samples its own.
        progress: Show a tqdm progress bar.
        **options: ``FisherMonitor`` options (``mc_samples``, ``estimators``, ...).

    Returns:
        The estimates after all batches (cumulative average unless ``ema_decay``).
    """
    batches = [data] if _is_batch(data) else data
    saved_grads = {p: p.grad for p in model.parameters()}
    monitor = FisherMonitor(model, likelihood, **options)
    try:
        for batch in tqdm(batches, desc="fimhooks", disable=not progress, leave=False):
            x = batch if isinstance(batch, Tensor) else batch[0]
            output = model(x)
            if options.get("output") is not None:
                output = options["output"](output)
            with monitor:  # any scalar of the output starts the backward the monitor needs
                output.sum().backward()
            for p in model.parameters():
                p.grad = None
        return monitor.estimates()
    finally:
        monitor.remove()
        for p, grad in saved_grads.items():
            p.grad = grad


def _is_batch(data) -> bool:
    if isinstance(data, Tensor):
        return True
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
        and len(data[0]) == len(data[1])
    )
