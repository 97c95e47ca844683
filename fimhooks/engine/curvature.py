"""Residual curvature sources for Î₂: ``∂²(V_kᵀh)/∂θ_i²`` through curved activations.

For a scalar ``φ_k = V_kᵀ h`` and an activation ``a = σ(z)``, the curvature that ``σ''``
adds at ``z`` is ``diag(c_k)`` with ``c_k = σ''(z) ⊙ ∂φ_k/∂a``. Pulled back to any tensor
``u`` below it, it contributes ``Σ_s c_ks (∂z_s/∂u_f)²`` to ``∂²φ_k/∂u_f²``: only the
squared Jacobian of ``z`` with respect to ``u`` is needed, for all ``K`` directions at once.

A ``CurvatureSource`` keeps that Jacobian ``J [S, N, F]`` (``S`` entries of ``z``, ``F``
of ``u`` per input) structured: the identity where it starts, then
``J[s, n, f] = jac[s, f] · scale[n, f]`` through element-wise activations (``scale``) and
one Linear layer (``jac``). Below that, ``J`` differs per input; the chain path then pulls
it down a chunk of its ``S`` rows at a time (``chain.ChainPass.spill``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class CurvatureSource:
    """Curvature entering at one activation input, seen from the current tensor.

    Attributes:
        coefficients: ``[K, N, S]`` the residual coefficients ``c_k`` at the activation.
        jac: ``[S, F]`` shared by all inputs (``None``: the identity).
        scale: ``[N, F]`` per-input column scaling of ``jac`` (``None``: ones).
    """

    coefficients: Tensor
    jac: Optional[Tensor] = None
    scale: Optional[Tensor] = None

    def dense(self, shape, rows=slice(None), samples=slice(None)) -> Tensor:
        """The Jacobian's ``rows`` per input, ``[r, n, *shape[1:]]`` for the inputs ``samples``."""
        c = self.coefficients
        if self.jac is None:
            jac = torch.eye(c.shape[2], dtype=c.dtype, device=c.device)[rows]
        else:
            jac = self.jac[rows]
        jac = jac.unsqueeze(1)
        n = len(range(shape[0])[samples])
        if self.scale is not None:
            jac = jac * self.scale[samples].unsqueeze(0)
        return jac.expand(jac.shape[0], n, jac.shape[2]).reshape(jac.shape[0], n, *shape[1:])

    def through_elementwise(self, derivative: Tensor) -> "CurvatureSource":
        """Pulled back through an element-wise map with derivative ``[N, *shape]``."""
        d = derivative.flatten(1)
        return replace(self, scale=d if self.scale is None else self.scale * d)

    def through_linear_keeps_structure(self) -> bool:
        """Whether a Linear layer keeps the Jacobian shared by all inputs."""
        return self.scale is None

    def through_linear(self, weight: Tensor) -> "CurvatureSource":
        """Pulled back through ``x ↦ weight x`` on ``[N, in]`` inputs (no ``scale`` yet)."""
        return replace(self, jac=weight if self.jac is None else self.jac @ weight)

    def squared_contraction(self) -> Tensor:
        """``Σ_s c_ks J_snf²``: the source's part of ``∂²φ_k/∂u_f²``, ``[K, N, F]``."""
        c = self.coefficients
        D = c if self.jac is None else c @ (self.jac * self.jac)
        return D if self.scale is None else D * (self.scale * self.scale)
