"""Damped solves with diagonal and Kronecker-factored Fisher estimates (docs/math.md §6, §8).

Pure functions on tensors. A Kronecker-factored Fisher of a Linear layer with weight
``[out, in]`` (and bias, appended as a last input column of ones) is ``A ⊗ G`` with
``A = E[x̃ x̃ᵀ]`` (``[in(+1), in(+1)]``) and ``G = E[g gᵀ]`` (``[out, out]``), where ``g`` is
the score with respect to the layer's output.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def diagonal_denominator(
    fisher: Tensor,
    damping: float,
    std: Optional[Tensor] = None,
    uncertainty_damping: float = 0.0,
) -> Tensor:
    """``max(fisher, 0) + λ + κ · std``: the preconditioned gradient is ``grad`` over it.

    The Fisher is positive semi-definite, but a sampled Î₂ entry can be negative: it is
    clipped at zero, so that no entry flips the gradient's sign or divides by zero.

    Args:
        fisher: Diagonal Fisher estimate, ``[*P]``.
        damping: ``λ``.
        std: Standard error of each entry of ``fisher`` (needed when ``κ > 0``).
        uncertainty_damping: ``κ``: an entry is damped more where its estimate is noisier.
    """
    denominator = fisher.clamp_min(0.0) + damping
    if uncertainty_damping:
        denominator = denominator + uncertainty_damping * std
    return denominator


def split_damping(A: Tensor, G: Tensor, damping: float) -> Tuple[float, float]:
    """Damping of each factor, ``(π√λ, √λ/π)`` with ``π² = (tr A / dim A) / (tr G / dim G)``.

    The factored damping of Martens & Grosse (2015): ``(A + π√λ I) ⊗ (G + √λ/π I)`` adds
    ``λ I`` plus cross terms balanced between the factors.
    """
    mean_a = torch.diagonal(A).mean().item()
    mean_g = torch.diagonal(G).mean().item()
    pi = math.sqrt(mean_a / mean_g) if mean_a > 0 and mean_g > 0 else 1.0
    root = math.sqrt(damping)
    return pi * root, root / pi


def damped_kronecker_inverses(A: Tensor, G: Tensor, damping: float) -> Tuple[Tensor, Tensor]:
    """``((A + d_A I)⁻¹, (G + d_G I)⁻¹)`` with ``split_damping``."""
    damping_a, damping_g = split_damping(A, G, damping)
    eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.inv(A + damping_a * eye_a), torch.linalg.inv(G + damping_g * eye_g)


def kronecker_solve(grad: Tensor, A_inverse: Tensor, G_inverse: Tensor) -> Tensor:
    """``(A ⊗ G)⁻¹ vec(grad)`` for a gradient ``[out, in(+1)]``: ``G⁻¹ grad A⁻¹``."""
    return G_inverse @ grad @ A_inverse
