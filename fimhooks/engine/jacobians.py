"""Per-input transposed Jacobian products of layer weights, as pure tensor functions.

Each maps vectors at a layer's output, ``[D, n, *out]`` for ``n`` inputs, to per-input
parameter gradients ``[D, n, *param.shape]``: ``Σ`` over the layer's positions of the
output vector times the input.
"""

from __future__ import annotations

import math
from typing import Optional

from backpack.utils.conv import unfold_by_conv
from torch import Tensor, einsum, nn


def linear_weight(vectors: Tensor, x: Tensor) -> Tensor:
    """``x [n, *L, in]``, ``vectors [D, n, *L, out]`` to ``[D, n, out, in]``."""
    g = vectors.reshape(*vectors.shape[:2], -1, vectors.shape[-1])
    return einsum("dnlo,nli->dnoi", g, x.reshape(x.shape[0], -1, x.shape[-1]))


def embedding_weight(vectors: Tensor, index: Tensor, num_embeddings: int) -> Tensor:
    """``index [n, *L]``, ``vectors [D, n, *L, dim]`` to ``[D, n, num_embeddings, dim]``."""
    one_hot = nn.functional.one_hot(index.reshape(index.shape[0], -1), num_embeddings)
    g = vectors.reshape(*vectors.shape[:2], -1, vectors.shape[-1])
    return einsum("dnle,nlv->dnve", g, one_hot.to(g.dtype))


def conv_weight(vectors: Tensor, x: Tensor, module: nn.Module) -> Tensor:
    """A convolution with ``groups=1`` and zero padding, from its unfolded input.

    Faster than BackPACK's grouped-convolution route for many vectors.
    """
    if isinstance(module, nn.Conv2d):  # im2col, much faster than a one-hot convolution
        patches = nn.functional.unfold(
            x, module.kernel_size, module.dilation, module.padding, module.stride
        )
    else:
        patches = unfold_by_conv(x, module)  # [n, in·k, positions]
    products = einsum("dnop,nip->dnoi", vectors.flatten(3), patches)
    return products.reshape(*vectors.shape[:2], *module.weight.shape)


def scale_and_shift(vectors: Tensor, normalized: Tensor, start: int, dims: int) -> tuple:
    """Weight and bias of ``y = x̂ ⊙ w + b`` (LayerNorm, GroupNorm, RMSNorm).

    Args:
        vectors: ``[D, n, *out]``.
        normalized: ``x̂``, ``[n, *out]``.
        start: First axis of ``out`` that the parameters cover.
        dims: Number of axes they cover.

    Returns:
        ``([D, n, *P], [D, n, *P])``.
    """
    out = normalized.shape[1:]
    covered = out[start : start + dims]
    sizes = (math.prod(out[:start]), math.prod(covered), math.prod(out[start + dims :]))
    g = vectors.reshape(*vectors.shape[:2], *sizes)
    x = normalized.reshape(normalized.shape[0], *sizes)
    weight = einsum("dnlps,nlps->dnp", g, x).reshape(*vectors.shape[:2], *covered)
    return weight, g.sum((2, 4)).reshape(*vectors.shape[:2], *covered)


def unfold_unsupported(module: nn.Module) -> Optional[str]:
    """Why ``conv_weight`` does not compute ``module``'s products, or ``None``.

    It unfolds ungrouped convolutions padded with zeros by explicit amounts.
    """
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return f"{type(module).__name__} is not a convolution"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    if isinstance(module.padding, str):
        return f"padding={module.padding!r}"
    return f"groups={module.groups}" if module.groups != 1 else None
