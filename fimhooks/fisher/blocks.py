"""Expected squared Frobenius error of a full-block Î₁ (docs/math.md §6), from Gram matrices.

For one observation and a block ``B`` of parameters (a layer's weight and bias), write
``U_k = J_Bᵀ V_k`` for the likelihood's directions ``V_k`` and ``Ĝ_kl = U_k · U_l`` for
their Gram matrix (``V_kᵀ J_B J_Bᵀ V_l``, ``K × K``: no ``P_B × P_B`` matrix is formed). The
block's score is ``s_B = J_Bᵀ ρ`` with ``ρ = t(y) − η``, and

    E_y ‖s_B s_Bᵀ − I_B(x)‖²_F = E_y (ρᵀ J_B J_Bᵀ ρ)² − ‖I_B(x)‖²_F
                              = Σ_k w4_k Ĝ_kk² + α (Σ_k w_k Ĝ_kk)² + β Σ_kl w_k w_l Ĝ_kl²

with the likelihood's weights ``w`` and fourth weights ``w4`` (``likelihoods``) and its
``gram_pairing`` ``(α, β)``:

* categorical (``ρ = V e_y``, ``I_h = V diag(p) Vᵀ``): ``E (ρᵀGρ)² = Σ_y p_y Ĝ_yy²`` and
  ``‖I_B‖²_F = Σ_ab p_a p_b Ĝ_ab²``: ``(0, −1)``;
* Bernoulli and Gaussian (independent coordinates, Isserlis' pairings): ``(1, 1)``.

For a single entry (``Ĝ = U Uᵀ``) this is ``v₁`` of docs/math.md §3 (``α + β = κ``).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def gram(U: Tensor) -> Tensor:
    """Per-input Gram matrices of the directions' images: ``[K, N, *P]`` to ``[N, K, K]``."""
    flat = U.flatten(2)
    return torch.einsum("knp,lnp->nkl", flat, flat)


def block_label_variance(
    grams: Tensor, weights: Tensor, fourth_weights: Tensor, pairing: Tuple[float, float]
) -> Tensor:
    """``E_y ‖s_B s_Bᵀ − I_B(x)‖²_F`` per input.

    Args:
        grams: ``[N, K, K]`` Gram matrices of the block (``gram``, summed over its parameters).
        weights: ``[N, K]`` the likelihood's weights.
        fourth_weights: ``[N, K]`` its fourth weights.
        pairing: The likelihood's ``(α, β)``.

    Returns:
        ``[N]``.
    """
    alpha, beta = pairing
    diagonal = grams.diagonal(dim1=1, dim2=2)
    fourth = (fourth_weights * diagonal * diagonal).sum(1)
    trace = (weights * diagonal).sum(1)
    weighted = weights.unsqueeze(2) * grams * weights.unsqueeze(1)
    return fourth + alpha * trace * trace + beta * (weighted * grams).sum((1, 2))
