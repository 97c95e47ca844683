"""BatchNorm in training mode, with the batch's statistics held constant.

In training mode BatchNorm normalises each input with the mean and variance of the whole
batch, so an output depends on every input and per-input quantities are undefined. With
``batchnorm="frozen-batch-stats"`` the monitor treats the batch's mean and (biased)
variance as constants of every input's map: exactly eval mode with the running statistics
set to the batch's. The user's own backward pass is untouched (it differentiates through
the statistics, as training does); only the monitor's backward passes see the frozen map.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor, nn

from fimhooks.engine.layers import spec_for

#: The ``batchnorm=`` options of ``FisherMonitor``.
REFUSE, FROZEN_BATCH_STATS = "error", "frozen-batch-stats"
OPTIONS = (REFUSE, FROZEN_BATCH_STATS)


def normalises_with_batch(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer (or a subclass) using the batch's statistics now."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or module.running_mean is None
    )


def batch_statistics(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x [N, C, *]`` over all but the channels."""
    values = x.detach().transpose(0, 1).flatten(1)
    values = values.float() if values.element_size() < 4 else values  # mixed precision
    return values.mean(1), values.var(1, unbiased=False)


def frozen(module: nn.Module, x: Tensor, y: Tensor, statistics, active: Callable) -> Tensor:
    """``y`` (the layer's output on ``x``), whose backward is the frozen map while ``active()``.

    Args:
        module: The BatchNorm layer.
        x: Its input ``[N, C, *]``.
        y: Its output on ``x``.
        statistics: ``(mean, var)`` of the batch (``batch_statistics``).
        active: Whether a backward pass is the monitor's.
    """
    scale = torch.rsqrt(statistics[1] + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach()
    scale = scale.reshape(1, -1, *[1] * (x.dim() - 2)).to(y.dtype)
    return _FrozenStatistics.apply(x, y, scale, active)


class _FrozenStatistics(torch.autograd.Function):
    """Identity on ``y``, except in the monitor's backward: ``x ↦ scale · x`` instead.

    The output is a copy, not a view of ``y``, so that in-place operations after the layer
    (``nn.ReLU(inplace=True)``) keep this backward.
    """

    @staticmethod
    def forward(ctx, x, y, scale, active):  # noqa: D102
        ctx.save_for_backward(scale)
        ctx.active = active
        return y.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if ctx.active():
            (scale,) = ctx.saved_tensors
            return grad * scale, None, None, None
        return None, grad, None, None


def record(recording, module: nn.Module, path: str, call: tuple, option: str, active):
    """Record one call in ``recording``; a layer normalising with the batch is marked.

    Args:
        recording: The ``ForwardRecord`` being filled.
        module: The called module.
        path: Its path in the model.
        call: Its ``(args, kwargs, output)``.
        option: The monitor's ``batchnorm``.
        active: Whether the monitor runs its own backward pass now (``frozen``).

    Returns:
        The output with frozen statistics where ``option`` freezes them, else ``None``.
    """
    args, kwargs, output = call
    if normalises_with_batch(module):
        recording.batch_statistics = path
        if option == FROZEN_BATCH_STATS:
            statistics = batch_statistics(args[0])
            output = frozen(module, args[0], output, statistics, active)
            recording.add(module, path, args, kwargs, output, statistics)
            return output
    recording.add(module, path, args, kwargs, output)
    return None


def check_model(model: nn.Module, option: str) -> None:
    """A clear error for a BatchNorm layer that ``option`` does not cover."""
    for path, module in model.named_modules():
        if not normalises_with_batch(module):
            continue
        if option == FROZEN_BATCH_STATS:
            if spec_for(module).grads is not None:
                continue
            raise ValueError(
                f"BatchNorm layer '{path}' ({type(module).__name__}) overrides the "
                "forward pass of torch's BatchNorm (timm's BatchNormAct2d also applies "
                "its activation), so batchnorm='frozen-batch-stats', which holds the "
                "statistics of torch's own BatchNorm layers, does not apply to it. Put "
                "it in eval mode (module.eval()) while monitoring."
            )
        mode = "is in training mode" if module.training else "tracks no running statistics"
        raise ValueError(
            f"BatchNorm layer '{path}' {mode}, so it normalises with the batch's "
            "statistics: per-input quantities are undefined there because each "
            "output depends on the whole batch. Put it in eval mode (module.eval()) "
            "while monitoring, or pass batchnorm='frozen-batch-stats' to treat each "
            "batch's statistics as constants of every input's map."
        )
