"""How a model output is read as observations, and where labels are drawn (docs/math.md §1, §7c).

An output ``h`` is read as ``[N, T, C]``: ``N`` inputs, ``T`` positions per input, ``C``
natural parameters per position. Each position is one observation with its own label
draw; an input's summand is the mean over its unmasked positions.

* categorical: the class axis is last (``[N, *, C]``), or axis 1 for an
  ``nn.CrossEntropyLoss`` module's ``[N, C, *]`` layout; every other axis is a position.
* bernoulli, gaussian: all non-batch entries of an input are one observation (``T = 1``).

``LabelDraw`` holds what one collected step draws: the backpropagated directions, their
weights and the sampled coefficients, per position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from fimhooks.fisher.bounds import bound_factors
from fimhooks.fisher.likelihoods import Categorical, Likelihood


def read_positions(h: Tensor, likelihood: Likelihood, class_axis: int) -> Tensor:
    """``h`` as ``[N, T, C]`` (a view where the layout allows)."""
    if h.dim() == 0:
        raise ValueError("the model output is a scalar; fimhooks needs a batch axis first.")
    if not isinstance(likelihood, Categorical):
        return h.reshape(h.shape[0], 1, -1)
    if h.dim() < 2:
        raise ValueError(
            f"categorical outputs need a class axis: got shape {tuple(h.shape)}; expected "
            "logits [N, C] or [N, *, C]."
        )
    return h.movedim(class_axis, -1).reshape(h.shape[0], -1, h.shape[class_axis])


def to_output_layout(g: Tensor, h: Tensor, likelihood: Likelihood, class_axis: int) -> Tensor:
    """Inverse of ``read_positions`` for ``[D, N, T, C]`` vectors: ``[D, *h.shape]``."""
    if not isinstance(likelihood, Categorical):
        return g.reshape(g.shape[0], *h.shape)
    moved = list(h.movedim(class_axis, -1).shape)
    return g.reshape(g.shape[0], *moved).movedim(-1, class_axis % h.dim() + 1)


def position_mask(mask: Optional[Tensor], h: Tensor, positions: Tensor, class_axis: int) -> Tensor:
    """``[N, T]`` boolean: which positions are observed.

    Args:
        mask: ``None`` (all), or a boolean/0-1 tensor shaped like the output without its
            class axis (categorical), or ``[N]`` (one flag per input).
        h: The model output.
        positions: ``h`` read as ``[N, T, C]``.
        class_axis: The class axis of ``h``.
    """
    n, t = positions.shape[:2]
    if mask is None:
        return torch.ones(n, t, dtype=torch.bool, device=h.device)
    mask = torch.as_tensor(mask, device=h.device)
    position_shape = tuple(s for i, s in enumerate(h.shape) if i != class_axis % h.dim())
    if t > 1 and tuple(mask.shape) == position_shape:
        return mask.reshape(n, t).bool()
    if tuple(mask.shape) == (n,):
        return mask.reshape(n, 1).expand(n, t).bool()
    expected = f"{position_shape} or ({n},)" if t > 1 else f"({n},)"
    raise ValueError(
        f"mask has shape {tuple(mask.shape)}; for a model output of shape {tuple(h.shape)} "
        f"it must be {expected}: True where a position is observed."
    )


class Directions:
    """The ``[K, N, T, C]`` vectors a collected step backpropagates, formed where indexed.

    The likelihood's own directions (the exact pass: ``C`` per position) are computed from
    the outputs for the directions and inputs indexed, ``[k, n, ...]`` with slices ``k``
    and ``n``, so that all ``K·N·T·C`` entries never exist at once (many classes). Vectors
    given explicitly (sampled residuals: few) are held, and come after them.

    Args:
        positions: ``[N, T, C]`` model output, detached.
        observed: ``[N, T]`` boolean; directions are zero at the other positions.
        likelihood: Whose ``directions`` come first (``None``: none).
        held: ``[K', N, T, C]`` vectors that follow (``None``: none).
        dtype: The precision of what indexing returns.
    """

    def __init__(self, positions, observed, likelihood=None, held=None, dtype=None):
        self.positions, self.observed = positions, observed
        self.likelihood, self.held = likelihood, held
        self.dtype = positions.dtype if dtype is None else dtype
        self.basis = positions.shape[2] if likelihood is not None else 0
        given = 0 if held is None else len(held)
        self.shape = torch.Size((self.basis + given, *positions.shape))

    def __getitem__(self, index) -> Tensor:
        index = index if isinstance(index, tuple) else (index,)
        chosen = range(self.shape[0])[index[0] if index else slice(None)]
        samples = index[1] if len(index) > 1 else slice(None)
        first, last, parts = chosen.start, chosen.stop, []
        if first < self.basis:
            parts.append(self._basis(slice(first, min(last, self.basis)), samples))
        if last > self.basis:
            held = self.held[max(first, self.basis) - self.basis : last - self.basis, samples]
            parts.append(held.to(self.dtype))
        chunk = parts[0] if len(parts) == 1 else torch.cat(parts)
        return chunk[(slice(None), slice(None)) + index[2:]]

    def _basis(self, chosen: slice, samples: slice) -> Tensor:
        h = self.positions[samples]
        n, T, C = h.shape
        d = self.likelihood.directions(h.reshape(n * T, C), chosen).reshape(-1, n, T, C)
        observed = self.observed[samples][None, :, :, None]
        return torch.where(observed, d, torch.zeros((), dtype=d.dtype)).to(self.dtype)

    def to(self, dtype: torch.dtype) -> "Directions":
        """The same directions in another precision."""
        return Directions(self.positions, self.observed, self.likelihood, self.held, dtype)

    def followed_by(self, vectors: Tensor) -> "Directions":
        """These directions with ``vectors`` ``[k, N, T, C]`` after them."""
        held = vectors if self.held is None else torch.cat([self.held, vectors.to(self.held)])
        return Directions(self.positions, self.observed, self.likelihood, held, self.dtype)


@dataclass
class LabelDraw:
    """Directions and labels of one collected step (see ``likelihoods``).

    Attributes:
        directions: ``[K, N, T, C]`` vectors to backpropagate, zero at masked positions
            (``Directions``: formed for the chunk indexed).
        weights: ``[N, T, K]`` (``None`` when only Î₁ is collected: then the directions
            are the ``K = M`` sampled residuals themselves).
        fourth_weights: ``[N, T, K]``.
        coefficients: ``[N, T, M, K]`` sampled residuals in the directions' basis.
        position_weights: ``[N, T]``: ``1/T_n`` at the observed positions of input ``n``.
        num_inputs: Inputs with at least one observed position.
        bound_factors: ``[N, T, 5]`` factors of the bounds (``bounds.bound_factors``), or
            ``None`` when no bounds are collected.
        data_weights: ``[N, T, K]``, 1 at the direction of the data's residual (the last,
            for the empirical Fisher; ``with_data_residuals``), else 0; ``None`` without it.
        gram_pairing: The likelihood's ``(α, β)`` of ``blocks`` when block errors are
            collected, else ``None``.
        scaled: Whether the held residuals are already times ``√(1/T_n)``
            (``draw_labels(scaled=True)``).
    """

    directions: Directions
    weights: Optional[Tensor]
    fourth_weights: Optional[Tensor]
    coefficients: Optional[Tensor]
    position_weights: Tensor
    num_inputs: int
    bound_factors: Optional[Tensor] = None
    data_weights: Optional[Tensor] = None
    gram_pairing: Optional[Tuple[float, float]] = None
    scaled: bool = False

    def to(self, dtype: torch.dtype) -> "LabelDraw":
        """The same draw in another precision."""

        def cast(x):
            return None if x is None else x.to(dtype)

        tensors = (self.weights, self.fourth_weights, self.coefficients)
        return LabelDraw(
            self.directions.to(dtype),
            *map(cast, tensors),
            cast(self.position_weights),
            num_inputs=self.num_inputs,
            bound_factors=cast(self.bound_factors),
            data_weights=cast(self.data_weights),
            gram_pairing=self.gram_pairing,
            scaled=self.scaled,
        )


def draw_labels(
    likelihood: Likelihood,
    positions: Tensor,
    observed: Tensor,
    mc_samples: int,
    generator: torch.Generator,
    exact_pass: bool,
    bounds: bool = False,
    block_errors: bool = False,
    scaled: bool = False,
) -> LabelDraw:
    """Draw labels for a step; masked positions are not counted (and their vectors are 0).

    Args:
        likelihood: The likelihood.
        positions: ``[N, T, C]`` model output, detached.
        observed: ``[N, T]`` boolean.
        mc_samples: Label draws per observation (``M``).
        generator: The monitor's generator.
        exact_pass: Backpropagate ``C`` directions per position (else the ``M`` residuals).
        bounds: Also the factors of the bounds (docs/math.md §7; needs ``exact_pass``).
        block_errors: Also the likelihood's Gram pairing of the block errors (``blocks``).
        scaled: Without the exact pass, hold each position's residuals times the square
            root of its weight, ``√(1/T_n)`` (``scaled_residuals``; granularities
            ``"input"`` and ``"batch"``).
    """
    counts = observed.sum(1)
    position_weights = observed / counts.clamp_min(1).unsqueeze(1).to(positions.dtype)
    if not exact_pass:  # drawn at every position in place, masked ones then zeroed
        N, T, C = positions.shape
        if not observed.all():  # a masked position's output may be anything
            positions = positions.masked_fill(~observed[..., None], 0)
        flat = positions.reshape(N * T, C)
        residuals = likelihood.sampled_residuals(flat, mc_samples, generator)
        held = residuals.reshape(mc_samples, N, T, C)
        if scaled:
            held.mul_(position_weights.sqrt().to(held.dtype)[None, :, :, None])
        held.masked_fill_(~observed[None, :, :, None], 0)
        return LabelDraw(
            Directions(positions, observed, held=held),
            None,
            None,
            None,
            position_weights=position_weights.to(positions.dtype),
            num_inputs=int((counts > 0).sum()),
            scaled=scaled,
        )
    h = positions[observed]  # [P, C]
    directions = Directions(positions, observed, likelihood)
    weights, fourth = likelihood.weights(h), likelihood.fourth_weights(h)
    coefficients = likelihood.sample_coefficients(h, mc_samples, generator)
    per_position = [_scatter(weights, observed), _scatter(fourth, observed)]
    per_position.append(_scatter(coefficients, observed))
    return LabelDraw(
        directions,
        *per_position,
        position_weights=position_weights.to(positions.dtype),
        num_inputs=int((counts > 0).sum()),
        bound_factors=_scatter(bound_factors(likelihood, h), observed) if bounds else None,
        gram_pairing=likelihood.gram_pairing if block_errors else None,
    )


def data_residuals(
    grad: Tensor,
    h: Tensor,
    positions: Tensor,
    observed: Tensor,
    likelihood: Likelihood,
    class_axis: int,
    reduction: Optional[str],
) -> Tensor:
    """``[N, T, C]`` NLL gradients at the data's labels, from the loss's gradient at ``h``.

    Categorical and Bernoulli labels are read from the gradient's signs, whatever the
    loss's reduction and weights; a Gaussian's residual is the gradient over the
    ``nn.MSELoss``'s own scale (2, or 2/numel for ``reduction='mean'``).

    Args:
        grad: The training loss's gradient at the model output ``h``.
        h: The model output.
        positions: ``h`` read as ``[N, T, C]``, detached.
        observed: ``[N, T]`` boolean.
        likelihood: The likelihood.
        class_axis: ``h``'s class axis (``read_positions``).
        reduction: The loss module's ``reduction`` (``None``: a likelihood name was given).
    """
    grad = grad.detach().to(positions.dtype)
    at = read_positions(grad, likelihood, class_axis)[observed]
    # the label's entry is the smallest (zero where the model is certain of it)
    ambiguous = ((at < 0).sum(-1) > 1) | (at == 0).all(-1)
    if likelihood.name == "categorical" and ambiguous.any():
        raise RuntimeError(
            "fimhooks: 'EF' reads the data's labels from the loss's gradient, which is "
            "negative at the label only; at an observed position it singles out no "
            "label. A label the loss ignores (ignore_index): leave those positions out "
            "with `with monitor(mask=...)`. Label smoothing or soft targets: 'EF' "
            "needs the plain loss at hard labels."
        )
    scale = 2.0 / h.numel() if reduction == "mean" else 2.0
    residuals = torch.zeros_like(positions)
    residuals[observed] = likelihood.data_residuals(positions[observed], at, scale)
    return residuals


def with_data_residuals(draw: LabelDraw, residuals: Tensor, sampled: bool) -> LabelDraw:
    """The draw with the data's residuals appended as its last direction (docs/math.md §7b).

    The new direction has weight and coefficient 0 in every other term; ``data_weights``
    marks it.

    Args:
        draw: The step's draw.
        residuals: ``[N, T, C]`` gradients ``η − t(y)`` of the negative log-likelihood at
            the data's labels, zero at masked positions.
        sampled: Keep the draw's directions; ``False`` when they serve no other
            estimator (only the empirical Fisher is collected).
    """
    given = draw.directions
    kept = given if sampled else Directions(given.positions, given.observed, dtype=given.dtype)
    directions = kept.followed_by(residuals.unsqueeze(0))

    def padded(x):  # [..., K] -> [..., K + 1], zero for the data's direction
        return None if x is None else torch.cat([x, torch.zeros_like(x[..., :1])], -1)

    data_weights = residuals.new_zeros(*residuals.shape[:2], directions.shape[0])
    data_weights[..., -1] = 1
    return dataclasses.replace(
        draw,
        directions=directions,
        weights=padded(draw.weights),
        fourth_weights=padded(draw.fourth_weights),
        coefficients=padded(draw.coefficients),
        data_weights=data_weights,
    )


def scaled_residuals(draw: LabelDraw) -> Tensor:
    """``[M, N, T, C]`` sampled residuals, each position's times ``√(1/T_n)`` (0 if masked).

    Their backpropagated image is an input's (or, summed, the batch's) score weighted so
    that its square has the per-observation Fisher as its mean (docs/math.md §7d).

    Args:
        draw: A draw without the exact pass (its directions are the sampled residuals).
    """
    held = draw.directions[:]
    if draw.scaled:
        return held
    return held * draw.position_weights.sqrt()[None, :, :, None].to(held.dtype)


def summed_over_positions(draw: LabelDraw) -> LabelDraw:
    """A sampled-residuals draw as one observation per input (granularity ``"input"``).

    Each input's direction is its residuals at all ``T`` positions, each scaled by the
    square root of its position weight, ``√(1/T_n)``, as ``[M, N, 1, T·C]``: its
    backpropagated image is the input's score summed over its positions, and the square
    of that, ``(1/T)(Σ_t a_t)²``, is the input's summand (docs/math.md §7d). Map vectors
    back to the output's layout by reshaping ``[D, N, 1, T·C]`` to ``[D, N, T, C]``.

    Args:
        draw: A draw without the exact pass (``weights is None``) nor the data's labels.
    """
    given = draw.directions
    M, N, T, C = given.shape
    held = scaled_residuals(draw).reshape(M, N, 1, T * C)
    observed = draw.position_weights.sum(1, keepdim=True) > 0
    positions = given.positions.reshape(N, 1, T * C)
    return dataclasses.replace(
        draw,
        directions=Directions(positions, observed, held=held, dtype=given.dtype),
        position_weights=observed.to(draw.position_weights.dtype),
    )


def _scatter(values: Tensor, observed: Tensor) -> Tensor:
    """``[P, *rest]`` values at the observed positions to ``[N, T, *rest]`` (zeros elsewhere)."""
    out = values.new_zeros(*observed.shape, *values.shape[1:])
    out[observed] = values
    return out
