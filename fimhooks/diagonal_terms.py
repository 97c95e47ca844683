"""Per-input diagonal terms of SPEC §2-§3 and their batch sums, as pure tensor functions.

Notation (per parameter entry ``i`` and input ``n``):

* ``U``: ``[K, N, *P]`` Jacobian-transposed images of the backpropagated directions.
* ``W``: ``[K, N, *P]`` diagonal second derivatives ``∂²(V_kᵀ h)/∂θ_i²``; ``None`` where
  the network is piecewise linear (then all of them vanish).
* ``weights`` ``[N, K]``, ``fourth_weights`` ``[N, K]``, ``kappa``: see ``likelihoods``.
* ``coefficients`` ``[N, M, K]``: sampled residuals in the directions' basis.

The terms are ``g`` (exact), ``v1``, ``v2`` (label-noise variances of one summand),
``I1`` (``ā``: the score summand averaged over the M labels) and ``I2`` (``b̄``).
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import Tensor

#: Terms whose per-input values are needed squared too (sample variances across inputs).
SQUARED_TERMS = ("exact", "I1", "I2")


def per_input_terms(
    U: Tensor,
    W: Optional[Tensor],
    weights: Optional[Tensor],
    fourth_weights: Optional[Tensor],
    kappa: float,
    coefficients: Optional[Tensor],
    wanted: Iterable[str],
) -> Dict[str, Tensor]:
    """Per-input diagonal terms.

    With ``weights=None`` the directions are the sampled residuals themselves (Î₁ only):
    ``I1`` is then the mean of ``U²`` over the ``K = M`` directions.

    Returns:
        ``{term: [N, *P]}`` for each wanted term among ``exact, v1, v2, I1, I2``.

    """
    wanted = set(wanted)
    out = {}
    if weights is None:
        out["I1"] = (U**2).mean(0)
        return out
    w = _broadcast(weights, U)
    g = (w * U**2).sum(0)
    if "exact" in wanted or "I2" in wanted:
        out["exact"] = g
    if "v1" in wanted:
        out["v1"] = (_broadcast(fourth_weights, U) * U**4).sum(0) + kappa * g**2
    if "v2" in wanted:
        out["v2"] = torch.zeros_like(g) if W is None else (w * W**2).sum(0)
    if "I1" in wanted:
        scores = torch.einsum("nmk,kn...->mn...", coefficients, U)
        out["I1"] = (scores**2).mean(0)
    if "I2" in wanted:
        if W is None:
            out["I2"] = g
        else:
            residuals = torch.einsum("nmk,kn...->mn...", coefficients, W)
            out["I2"] = g - residuals.mean(0)
    return out


def batch_sums(terms: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Sums over the batch axis of per-input terms, with sums of squares where needed.

    Returns:
        ``{name: [*P]}``; squared sums under ``name + "_sq"``.

    """
    sums = {name: t.sum(0) for name, t in terms.items()}
    for name in SQUARED_TERMS:
        if name in terms:
            sums[name + "_sq"] = (terms[name] ** 2).sum(0)
    return sums


#: Power of the layer input with which each term scales for a rank-one (Linear) weight.
INPUT_POWER = {"exact": 2, "I1": 2, "I2": 2, "v1": 4, "v2": 4}


def rank_one_batch_sums(output_terms: Dict[str, Tensor], inputs: Tensor) -> Dict[str, Tensor]:
    """Batch sums for a weight whose per-input Jacobian is an outer product.

    For ``z = θ x`` (a Linear layer without extra dimensions) every term of entry
    ``(j, k)`` is the term of output ``j`` times ``x_k²`` (``exact, I1, I2``) or ``x_k⁴``
    (``v1, v2``), so batch sums are matrix products and no per-input tensor of the
    weight's size is formed.

    Args:
        output_terms: ``{term: [N, out]}`` per-input terms of the layer output.
        inputs: ``[N, in]`` the layer input.

    Returns:
        ``{name: [out, in]}`` as ``batch_sums`` of the weight's per-input terms.

    """
    x2 = inputs**2
    x4 = x2**2
    powers = {2: x2, 4: x4}
    sums = {}
    for name, t in output_terms.items():
        sums[name] = t.T @ powers[INPUT_POWER[name]]
        if name in SQUARED_TERMS:
            sums[name + "_sq"] = (t**2).T @ x4
    return sums


def _broadcast(per_input: Tensor, like: Tensor) -> Tensor:
    """``[N, K]`` to ``[K, N, 1, ...]`` to broadcast against ``[K, N, *P]``."""
    shape = per_input.T.shape + (1,) * (like.dim() - 2)
    return per_input.T.reshape(shape)
