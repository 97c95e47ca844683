"""``estimate``: one pass of a ``FisherMonitor`` over a batch or an iterable of batches."""

from __future__ import annotations

from typing import Iterable, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fimhooks.estimates import FisherEstimates
from fimhooks.monitor import FisherMonitor

Batch = Union[Tensor, tuple, list]


def estimate(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Union[Batch, Iterable[Batch]],
    *,
    progress: bool = True,
    **options,
) -> FisherEstimates:
    """Diagonal Fisher estimates over ``data`` in one shot.

    Args:
        model: The network (left unchanged: its gradients and hooks are restored).
        loss_fn: The loss that encodes the likelihood (see ``FisherMonitor``).
        data: One batch (a tensor ``x`` or a pair ``(x, y)``) or an iterable of them.
            Labels are never used for the Fisher: the monitor samples its own.
        progress: Show a tqdm progress bar.
        **options: ``FisherMonitor`` options (``mc_samples``, ``estimators``, ...).

    Returns:
        The estimates after all batches (cumulative average unless ``ema_decay``).
    """
    batches = [data] if _is_batch(data) else data
    saved_grads = {p: p.grad for p in model.parameters()}
    monitor = FisherMonitor(model, loss_fn, **options)
    try:
        for batch in tqdm(batches, desc="fimhooks", disable=not progress, leave=False):
            x = batch if isinstance(batch, Tensor) else batch[0]
            output = model(x)
            loss = loss_fn(output, _placeholder_target(loss_fn, output))
            with monitor:
                loss.backward()
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


def _placeholder_target(loss_fn: nn.Module, output: Tensor) -> Tensor:
    """A target of the right shape: the loss needs one, the Fisher does not use it."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return torch.zeros(output.shape[0], dtype=torch.long, device=output.device)
    return torch.zeros_like(output).detach()
