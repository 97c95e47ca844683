"""Residual curvature sources for Î₂: ``∂²(V_kᵀh)/∂θ_i²`` through curved activations.

For a scalar ``φ_k = V_kᵀ h`` and an activation ``a = σ(z)``, the curvature that ``σ''``
adds at ``z`` is ``diag(c_k)`` with ``c_k = σ''(z) ⊙ ∂φ_k/∂a``. Pulled back to any tensor
``u`` below it, it contributes ``Σ_s c_ks (∂z_s/∂u_f)²`` to ``∂²φ_k/∂u_f²``: only the
squared Jacobian of ``z`` with respect to ``u`` is needed, for all ``K`` directions at once.

A ``CurvatureSource`` keeps that Jacobian ``J [S, N, F]`` (``S`` entries of ``z``, ``F``
of ``u`` per input) structured as long as it can: the identity where it starts, then
``J[s, n, f] = jac[s, f] · scale[n, f]`` through element-wise activations (``scale``) and
one Linear layer (``jac``). Only a second Linear layer, or any other layer, makes it
per input, ``[S, N, *shape]``: that is what a deep curved network costs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class CurvatureSource:
    """Curvature entering at one activation input, seen from the current tensor.

    Attributes:
        coefficients: ``[K, N, S]`` the residual coefficients ``c_k`` at the activation.
        jac: ``[S, F]`` shared by all inputs (``None``: the identity), or ``[S, N, *shape]``
            per input when ``per_input``.
        scale: ``[N, F]`` per-input column scaling of a shared ``jac`` (``None``: ones).
        per_input: Whether ``jac`` is per input.
    """

    coefficients: Tensor
    jac: Optional[Tensor] = None
    scale: Optional[Tensor] = None
    per_input: bool = False

    def dense(self, shape, samples=slice(None)) -> Tensor:
        """The Jacobian per input, ``[S, n, *shape[1:]]`` for the inputs ``samples``."""
        if self.per_input:
            return self.jac[:, samples]
        c = self.coefficients
        S = c.shape[2]
        n = len(range(shape[0])[samples])
        jac = torch.eye(S, dtype=c.dtype, device=c.device) if self.jac is None else self.jac
        jac = jac.unsqueeze(1)
        if self.scale is not None:
            jac = jac * self.scale[samples].unsqueeze(0)
        return jac.expand(S, n, jac.shape[2]).reshape(S, n, *shape[1:])

    def shaped_like(self, output: Tensor) -> "CurvatureSource":
        """The same source for a view of ``output`` (structured ones are flat already)."""
        if not self.per_input:
            return self
        return replace(self, jac=self.jac.reshape(self.jac.shape[0], *output.shape))

    def through_elementwise(self, derivative: Tensor, jac_t: Callable) -> "CurvatureSource":
        """Pull back through an element-wise map with derivative ``[N, *shape]``."""
        if self.per_input:
            return replace(self, jac=jac_t(self.jac))
        d = derivative.flatten(1)
        return replace(self, scale=d if self.scale is None else self.scale * d)

    def through_linear(self, weight: Tensor, jac_t: Callable, shape) -> "CurvatureSource":
        """Pull back through ``x ↦ weight x`` on ``[N, in]`` inputs."""
        if not self.per_input and self.scale is None:
            jac = weight if self.jac is None else self.jac @ weight
            return replace(self, jac=jac)
        return self.through_module(jac_t, shape)

    def through_module(self, jac_t: Callable, shape) -> "CurvatureSource":
        """Pull back through any module, given its transposed Jacobian on ``[S, N, *out]``."""
        return CurvatureSource(self.coefficients, jac_t(self.dense(shape)), per_input=True)

    def squared_contraction(self) -> Tensor:
        """``Σ_s c_ks J_snf²``: the source's part of ``∂²φ_k/∂u_f²``, ``[K, N, F]``."""
        c = self.coefficients
        if self.per_input:
            J = self.jac.flatten(2)
            return torch.einsum("kns,snf->knf", c, J * J)
        D = c if self.jac is None else c @ (self.jac * self.jac)
        return D if self.scale is None else D * (self.scale * self.scale)
