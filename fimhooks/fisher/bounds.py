"""Per-observation bound factors of docs/math.md §7 (Soen & Sun 2024, Thm 4.1, 5.2, Prop 5.1).

For one observation with natural parameters ``h [C]``, ``u = ∂ᵢh`` and ``w = ∂²ᵢh``:

    ‖u‖² λ_min(I_h) ≤ g_i  ≤ ‖u‖² λ_max(I_h)
    ‖u‖⁴ λ̃_min(M)   ≤ v₁,i ≤ ‖u‖⁴ λ̃_max(M)      M = K_h − I_h ⊗ I_h
    ‖w‖² λ_min(I_h) ≤ v₂,i ≤ ‖w‖² λ_max(I_h)

with ``λ̃`` the extremes of ``M · u⊗u⊗u⊗u`` over unit ``u``. ``bound_factors`` gives, per
observation, the four eigenvalue factors and how ``‖u‖²`` is read from the backpropagated
directions; ``diagonal_terms`` multiplies them with the norms.

* Gaussian (``I_h = I/σ²``, ``v₁ = 2g²``): ``λ = 1/σ²``, ``λ̃ = 2/σ⁴``; every bound is an
  equality (Prop 5.1).
* Bernoulli (``I_h = diag(q)``, ``q = p(1−p)``): ``λ(I_h)`` are the extremes of ``q``.
  With ``z = u²`` on the simplex, ``M · u⁴ = zᵀ A z`` where ``A = diag(q(1−4q)) + 2qqᵀ``
  off the diagonal (``μ₄ = q(1−3q)``); all of ``A`` is non-negative, so
  ``λ̃_max ≤ max_ab A_ab`` and ``λ̃_min ≥ 1 / Σ_a 1/A_aa`` (the minimum of the diagonal part
  alone). Both are equalities for one output.
* Categorical: ``I_h 1 = 0`` and ``t(y) − η ⊥ 1``, so ``g``, ``v₁`` and ``v₂`` do not change
  when ``u`` (``w``) is replaced by its projection onto ``1⊥`` (logits are defined up to a
  common shift). The bounds use that projection, the centred ``u − ū1``, whose norm is at
  most ``‖u‖``: they are at least as tight as the paper's. On ``1⊥`` the extremes of
  ``I_h = diag(p) − ppᵀ`` are its largest and second-smallest eigenvalues (``eigvalsh``
  for up to ``EXACT_CLASSES`` classes); with more classes, the closed bounds
  ``λ_max ≤ m(x) = min(max_c p_c, 1 − ‖p‖²)`` (Thm 5.2) and ``λ_min ≥ min_c p_c``
  (eigenvalues of a rank-one downdate interlace with ``p``). ``λ̃_min(M) = 0`` and
  ``λ̃_max(M) ≤ 2 m(x)`` (Thm 5.2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fimhooks.fisher.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood

#: Classes up to which the categorical ``λ(I_h)`` are exact eigenvalues.
EXACT_CLASSES = 64
#: Columns of ``bound_factors``.
CENTRING, FISHER_MIN, FISHER_MAX, FOURTH_MIN, FOURTH_MAX = range(5)


def bound_factors(likelihood: Likelihood, h: Tensor) -> Tensor:
    """The bound factors of each observation.

    Args:
        likelihood: The likelihood.
        h: ``[P, C]`` natural parameters of ``P`` observations.

    Returns:
        ``[P, 5]``: ``c`` with ``‖u‖² = Σ_k U_k² − c (Σ_k U_k)²`` for the likelihood's
        directions ``U_k`` (``1/C`` for the categorical's centring, else 0), then
        ``λ_min(I_h), λ_max(I_h), λ̃_min(M), λ̃_max(M)``.
    """
    if isinstance(likelihood, Categorical):
        return _categorical(torch.softmax(h, dim=1))
    if isinstance(likelihood, Bernoulli):
        p = torch.sigmoid(h)
        return _bernoulli(p * (1 - p))
    if isinstance(likelihood, Gaussian):
        precision = torch.full_like(h[:, 0], likelihood.sigma**-2)
        zero = torch.zeros_like(precision)
        return torch.stack([zero, precision, precision, 2 * precision**2, 2 * precision**2], 1)
    raise TypeError(f"no bounds for the likelihood {type(likelihood).__name__}.")


def _categorical(p: Tensor) -> Tensor:
    """Factors for class probabilities ``p [P, C]``."""
    m = torch.minimum(p.max(1).values, 1 - (p * p).sum(1))
    if p.shape[1] <= EXACT_CLASSES:
        fisher = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
        eigenvalues = torch.linalg.eigvalsh(fisher).clamp_min(0)
        # 1 is the eigenvector of the smallest eigenvalue, 0; the others span 1⊥
        smallest = eigenvalues[:, 1] if p.shape[1] > 1 else torch.zeros_like(m)
        largest = eigenvalues[:, -1]
    else:
        smallest, largest = p.min(1).values, m
    centring = torch.full_like(m, 1.0 / p.shape[1])
    zero = torch.zeros_like(m)
    return torch.stack([centring, smallest, largest, zero, 2 * m], 1)


def _bernoulli(q: Tensor) -> Tensor:
    """Factors for variances ``q = p(1−p)`` ``[P, C]``."""
    diagonal = (q * (1 - 4 * q)).clamp_min(0)  # A_aa ≥ 0 since q ≤ 1/4
    largest_off = torch.zeros_like(q[:, 0])
    if q.shape[1] > 1:
        top = q.topk(2, dim=1).values
        largest_off = 2 * top[:, 0] * top[:, 1]
    fourth_max = torch.maximum(diagonal.max(1).values, largest_off)
    fourth_min = 1 / (1 / diagonal).sum(1)  # 0 where some A_aa = 0
    zero = torch.zeros_like(fourth_max)
    return torch.stack([zero, q.min(1).values, q.max(1).values, fourth_min, fourth_max], 1)
