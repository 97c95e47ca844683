"""Exponential-family likelihoods of docs/math.md §1 as pure functions of the model output.

Each likelihood describes, for a batch of network outputs ``h`` of shape ``[N, C]``:

* ``directions(h)``: ``K`` vectors per input in output space, ``[K, N, C]``, that are
  backpropagated through the network. Their Jacobian-transposed images ``U = Jᵀ V`` give
  every diagonal quantity of docs/math.md §2-§3.
* ``weights(h)``: ``[N, K]`` weights ``w`` with ``g = Σ_k w_k U_k²`` (exact diagonal) and
  ``v₂ = Σ_k w_k W_k²``, where ``W_k = ∂²(V_kᵀ h)/∂θ_i²``.
* ``fourth_weights(h)`` and ``kappa``: ``v₁ = Σ_k w4_k U_k⁴ + κ g²``.
* ``sample_coefficients(h, M)``: ``[N, M, K]`` coefficients ``R`` of sampled residuals
  ``t(ŷ) − η = Σ_k R_k V_k`` (labels drawn from the model), so that the score is
  ``s = Σ_k R_k U_k`` and the Hessian residual is ``r = Σ_k R_k W_k``.
* ``sampled_residuals(h, M)``: ``[M, N, C]`` the residual vectors themselves, used when
  only Î₁ is collected (then ``M`` vectors are backpropagated instead of ``C``).
* ``data_residuals(h, grad, scale)``: ``[N, C]`` the gradient ``η − t(y)`` of the negative
  log-likelihood at the data's labels ``y``, read from the training loss's gradient
  ``grad`` at ``h`` (for the empirical Fisher, docs/math.md §7b).

All numbers are per observation: nothing here depends on a loss's reduction or scale.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn


class Likelihood:
    """Base class: a likelihood ``p(y | h)`` with outputs flattened to ``[N, C]``."""

    name: str = ""
    kappa: float = 0.0
    #: ``(α, β)`` of the block error's Gram form (``blocks``); ``α + β = κ``.
    gram_pairing = (1.0, 1.0)

    def directions(self, h: Tensor, chosen: slice = slice(None)) -> Tensor:
        """Backpropagated directions ``chosen`` among the ``K = C``. Returns ``[k, N, C]``."""
        n, c = h.shape
        eye = torch.eye(c, dtype=h.dtype, device=h.device)[chosen]
        return eye.unsqueeze(1).expand(eye.shape[0], n, c)

    def weights(self, h: Tensor) -> Tensor:
        """Weights of ``g`` and ``v₂``. Returns ``[N, K]``."""
        raise NotImplementedError

    def fourth_weights(self, h: Tensor) -> Tensor:
        """Weights of the ``U⁴`` term of ``v₁``. Returns ``[N, K]``."""
        raise NotImplementedError

    def sample_coefficients(
        self, h: Tensor, mc_samples: int, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Coefficients of sampled residuals in the directions. Returns ``[N, M, K]``."""
        raise NotImplementedError

    def sampled_residuals(
        self, h: Tensor, mc_samples: int, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Sampled residuals ``t(ŷ) − η``. Returns ``[M, N, C]``."""
        coefficients = self.sample_coefficients(h, mc_samples, generator)
        return self.combine_directions(h, coefficients).transpose(0, 1)

    def combine_directions(self, h: Tensor, coefficients: Tensor) -> Tensor:
        """``Σ_k R_k V_k`` for coefficients ``[N, M, K]`` (identity directions). ``[N, M, C]``."""
        return coefficients

    def data_residuals(self, h: Tensor, grad: Tensor, scale: Optional[float]) -> Tensor:
        """``η − t(y)`` at the data's labels, from the loss's gradient ``grad`` ``[N, C]``.

        Args:
            h: ``[N, C]`` outputs.
            grad: ``[N, C]`` the training loss's gradient at ``h``, a positive multiple of
                ``η − t(y)`` per observation.
            scale: That multiple where the labels cannot be read from the gradient's signs
                (Gaussian): ``grad = scale · σ² · (η − t(y))``.
        """
        raise NotImplementedError


class Categorical(Likelihood):
    """Categorical likelihood on logits (``nn.CrossEntropyLoss``).

    Directions are ``e_c − p`` for every class ``c``, so the score of a sampled label ``ŷ``
    is the direction ``ŷ`` itself.
    """

    name = "categorical"
    kappa = -1.0
    gram_pairing = (0.0, -1.0)

    def directions(self, h: Tensor, chosen: slice = slice(None)) -> Tensor:  # noqa: D102
        p = torch.softmax(h, dim=1)
        eye = torch.eye(h.shape[1], dtype=h.dtype, device=h.device)[chosen]
        return eye.unsqueeze(1) - p.unsqueeze(0)

    def weights(self, h: Tensor) -> Tensor:  # noqa: D102
        return torch.softmax(h, dim=1)

    def combine_directions(self, h: Tensor, coefficients: Tensor) -> Tensor:  # noqa: D102
        p = torch.softmax(h, dim=1).unsqueeze(1)
        return coefficients - coefficients.sum(2, keepdim=True) * p

    def fourth_weights(self, h: Tensor) -> Tensor:  # noqa: D102
        return torch.softmax(h, dim=1)

    def sample_coefficients(self, h, mc_samples, generator=None):  # noqa: D102
        labels = categorical_labels(torch.softmax(h.detach(), dim=1), mc_samples, generator)
        return nn.functional.one_hot(labels, h.shape[1]).to(h.dtype)

    def sampled_residuals(self, h, mc_samples, generator=None):
        """``e_ŷ − p``, ``[M, N, C]``, formed in the probabilities' own memory where ``M = 1``."""
        p = torch.softmax(h.detach(), dim=1)
        labels = categorical_labels(p, mc_samples, generator)  # [N, M]
        residuals = p.neg_().unsqueeze(0)
        if mc_samples > 1:
            residuals = residuals.repeat(mc_samples, 1, 1)
        draws = torch.arange(mc_samples, device=p.device).unsqueeze(1)
        residuals[draws, torch.arange(len(p), device=p.device), labels.T] += 1
        return residuals

    def data_residuals(self, h, grad, scale=None):  # noqa: D102
        # p − e_y: the label's entry is the only negative one (or 0 where p_y rounds to
        # 1), whatever the reduction
        labels = nn.functional.one_hot(grad.argmin(1), h.shape[1]).to(h.dtype)
        return torch.softmax(h, dim=1) - labels


#: Entries of the cumulative sums formed at once when drawing categorical labels.
_CDF_CHUNK = 1 << 22


def categorical_labels(p: Tensor, draws: int, generator=None) -> Tensor:
    """``[N, draws]`` labels drawn from the rows of ``p`` ``[N, C]`` (sum 1 each).

    By inverting each row's cumulative sum (float64, a chunk of rows at a time: memory
    ``O(chunk)``) at uniforms from ``generator``; a class of probability 0 is never drawn.
    ``torch.multinomial`` is an order of magnitude slower for one draw on CPU.
    """
    n, c = p.shape
    u = torch.rand(n, draws, dtype=torch.float64, device=p.device, generator=generator)
    labels = torch.empty(n, draws, dtype=torch.long, device=p.device)
    rows = max(1, _CDF_CHUNK // max(c, 1))
    for start in range(0, n, rows):
        cdf = p[start : start + rows].to(torch.float64).cumsum(1)
        at = u[start : start + rows] * cdf[:, -1:]
        labels[start : start + rows] = torch.searchsorted(cdf, at, right=True)
    return labels.clamp_max_(c - 1)


class Bernoulli(Likelihood):
    """Independent Bernoulli per output on logits (``nn.BCEWithLogitsLoss``)."""

    name = "bernoulli"
    kappa = 2.0

    def weights(self, h: Tensor) -> Tensor:  # noqa: D102
        p = torch.sigmoid(h)
        return p * (1 - p)

    def fourth_weights(self, h: Tensor) -> Tensor:  # noqa: D102
        q = self.weights(h)
        return q * (1 - 6 * q)

    def sample_coefficients(self, h, mc_samples, generator=None):  # noqa: D102
        p = torch.sigmoid(h)
        probs = p.unsqueeze(1).expand(-1, mc_samples, -1)
        draws = torch.bernoulli(probs.detach(), generator=generator)
        return draws - probs

    def data_residuals(self, h, grad, scale=None):  # noqa: D102
        # p − y: negative exactly where the label is 1, whatever the reduction, or 0
        # where p rounds to the label (then the label is the side p is on)
        p = torch.sigmoid(h)
        return p - ((grad < 0) | ((grad == 0) & (p > 0.5))).to(h.dtype)


class Gaussian(Likelihood):
    """Gaussian with mean ``f`` (the network output) and fixed ``sigma`` (``nn.MSELoss``)."""

    name = "gaussian"
    kappa = 2.0

    def __init__(self, sigma: float = 1.0):
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}.")
        self.sigma = float(sigma)

    def weights(self, h: Tensor) -> Tensor:  # noqa: D102
        return torch.full_like(h, 1.0 / self.sigma**2)

    def fourth_weights(self, h: Tensor) -> Tensor:  # noqa: D102
        return torch.zeros_like(h)

    def sample_coefficients(self, h, mc_samples, generator=None):  # noqa: D102
        shape = (h.shape[0], mc_samples, h.shape[1])
        noise = torch.randn(shape, dtype=h.dtype, device=h.device, generator=generator)
        return noise / self.sigma

    def data_residuals(self, h, grad, scale=None):  # noqa: D102
        # (f − y)/σ²; the loss's gradient is scale · (f − y) (MSELoss: 2 or 2/numel)
        return grad / (scale * self.sigma**2)


#: Likelihood names accepted by ``FisherMonitor`` instead of a loss module.
LIKELIHOOD_NAMES = ("categorical", "bernoulli", "gaussian")
SUPPORTED_LOSSES = "nn.CrossEntropyLoss, nn.BCEWithLogitsLoss, nn.MSELoss"


def likelihood_from(spec: Union[str, nn.Module], sigma: Optional[float] = None) -> Likelihood:
    """The likelihood named by ``spec`` or encoded by a PyTorch loss module (docs/math.md §1).

    Args:
        spec: ``"categorical"``, ``"bernoulli"``, ``"gaussian"``, or an
            ``nn.CrossEntropyLoss``, ``nn.BCEWithLogitsLoss`` or ``nn.MSELoss``. Class
            weights, ``pos_weight`` and label smoothing change the loss, not the model's
            likelihood: they are accepted and play no part.
        sigma: Gaussian noise level (default 1). It is a parameter of the likelihood, not
            implied by the loss's factor 2.

    Raises:
        ValueError: for another name or loss, or ``sigma`` with a non-Gaussian likelihood.
    """
    name = spec if isinstance(spec, str) else _LOSS_NAMES.get(type(spec))
    if name not in LIKELIHOOD_NAMES:
        given = repr(spec) if isinstance(spec, str) else f"loss {type(spec).__name__}"
        raise ValueError(
            f"Unsupported likelihood: {given}. fimhooks supports the names "
            f"{', '.join(map(repr, LIKELIHOOD_NAMES))} or the losses {SUPPORTED_LOSSES}."
        )
    if name == "gaussian":
        return Gaussian(1.0 if sigma is None else sigma)
    if sigma is not None:
        raise ValueError(
            f"sigma is a parameter of the Gaussian likelihood only; got sigma={sigma!r} "
            f"with the {name} likelihood."
        )
    return Categorical() if name == "categorical" else Bernoulli()


_LOSS_NAMES = {
    nn.CrossEntropyLoss: "categorical",
    nn.BCEWithLogitsLoss: "bernoulli",
    nn.MSELoss: "gaussian",
}
