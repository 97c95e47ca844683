"""Where the score is squared: per observation, per input or per batch (docs/math.md §7d).

Pure functions on tensors. Notation, per parameter entry (trailing axes ``*P``):

* ``scores`` ``[M, N, T, *P]``: the score entries ``a = ∂ᵢ log p(y | x)`` of ``M`` label
  draws at each of an input's ``T`` positions (observations);
* ``weights`` ``[N, T]``: a position's weight in its input's summand, ``1/T_n`` (``0`` where
  masked), so that an input's summand is the mean over its observations;
* ``g``, ``v`` ``[N, T, *P]``: per observation ``E a² = g`` and ``Var a² = v`` (the exact
  pass's ``exact`` and ``v1`` of one position).

Every granularity squares a weighted sum of scores, with the weights' square roots
``s = √w``, so that all three have the same expectation ``Σ_t w_t g_t`` per input:

* ``"token"``: an input's summand is ``Σ_t w_t a_t²`` (one square per observation);
* ``"input"``: ``(Σ_t s_t a_t)²`` (one square per input);
* ``"batch"``: the batch's sum is ``(Σ_{n,t} s_nt a_nt)²`` (one square per step).

Labels are drawn independently per observation given the inputs, so the cross terms
``a_o a_o'`` have mean zero; they add variance, ``2[(Σ w g)² − Σ w² g²]``.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from fimhooks.fisher.diagonal_terms import BatchSums

#: The granularities, finest first.
GRANULARITIES: Tuple[str, ...] = ("token", "input", "batch")


def _spread(weights: Tensor, like: Tensor) -> Tensor:
    """``weights [N, T]`` broadcast against ``like [..., N, T, *P]``."""
    return weights.reshape(*weights.shape, *[1] * (like.dim() - weights.dim()))


def vectors_per_pass(granularity: str, draws: int, positions: float) -> float:
    """Vectors Î₁ backpropagates through a pass at ``granularity`` (its cost, docs/math.md §7d).

    ``"token"`` one per position and draw (``T·M``, each position's score needs its own),
    ``"input"`` and ``"batch"`` one per draw (``M``, each input's positions summed first);
    ``"batch"`` saves the per-input parameter-sized tensors, which vectors do not count.
    """
    return draws * (positions if granularity == "token" else 1)


def summands(scores: Tensor, weights: Tensor, granularity: str) -> Tensor:
    """Each draw's summands: ``[M, N, *P]`` per input, or ``[M, *P]`` for ``"batch"``.

    The step's estimate is the mean over draws of the summands' sum, divided by ``N``.
    """
    w = _spread(weights, scores[0]).to(scores.dtype)
    if granularity == "token":
        return (w * scores * scores).sum(2)
    scaled = (w.sqrt() * scores).sum(2)  # [M, N, *P]
    if granularity == "batch":
        scaled = scaled.sum(1)
    return scaled * scaled


def label_variance(g: Tensor, v: Tensor, weights: Tensor, granularity: str) -> Tensor:
    """Closed-form label-noise variance of one draw's summand, from per-observation moments.

    Args:
        g: ``[N, T, *P]`` the observations' ``E a²``.
        v: ``[N, T, *P]`` their ``Var a²``.
        weights: ``[N, T]``.
        granularity: One of ``GRANULARITIES``.

    Returns:
        ``[N, *P]`` per input (``"token"``, ``"input"``), ``[*P]`` for ``"batch"``:
        ``Σ w² v``, plus ``2[(Σ w g)² − Σ w² g²]`` over an input's (the batch's)
        observations for the coarser two.
    """
    w = _spread(weights, g).to(g.dtype)
    w2 = w * w
    squares = (w2 * v).sum(1)
    if granularity == "token":
        return squares
    mean, mean_sq = (w * g).sum(1), (w2 * g * g).sum(1)
    if granularity == "batch":
        squares, mean, mean_sq = squares.sum(0), mean.sum(0), mean_sq.sum(0)
    return squares + 2 * (mean * mean - mean_sq)


def draw_variance(draws: Tensor) -> Tensor:
    """Unbiased estimate of one draw's label-noise variance from ``M ≥ 2`` draws ``[M, ...]``.

    The sample variance among independent draws of the same summand (same inputs): its
    expectation is the closed form of ``label_variance``, on any model.
    """
    if draws.shape[0] < 2:
        raise ValueError("the spread among label draws needs mc_samples >= 2.")
    return draws.var(0, unbiased=True)


def weighted_scores(scores: Tensor, weights: Tensor) -> Tensor:
    """``Σ_t s_t a_t`` over some positions: ``scores [M, t, n, *P]``, ``weights [n, t]``.

    Returns:
        ``[M, n, *P]``, to be added over an input's chunks of positions.
    """
    s = weights.sqrt().T.to(scores.dtype)  # [t, n]
    return torch.einsum("tn,mtn...->mn...", s, scores)


def squared_weighted_fisher(g: Tensor, weights: Tensor) -> Tensor:
    """``Σ_t w_t² g_t²`` over some positions: ``g [t, n, *P]``, ``weights [n, t]`` → ``[n, *P]``."""
    w2 = (weights * weights).T.to(g.dtype)
    return torch.einsum("tn,tn...->n...", w2, g * g)


def input_terms(terms: Dict[str, Tensor], scores, squared: Tensor) -> Dict[str, Tensor]:
    """An input's terms at granularity ``"input"`` from those at ``"token"`` (and ``x1``).

    Args:
        terms: ``{term: [n, *P]}`` added over positions (``diagonal_terms.add_positions``):
            ``exact = Σ w g``, ``v1 = Σ w² v``, ...
        scores: ``[M, n, *P]`` ``Σ_t s_t a_t`` of each draw (``weighted_scores``), or
            ``None`` to keep the ``"token"`` terms.
        squared: ``[n, *P]`` ``Σ_t w_t² g_t²`` (``squared_weighted_fisher``).

    Returns:
        The terms with ``x1``, the cross terms ``(Σ w g)² − Σ w² g²``, and (given
        ``scores``) ``I1`` the mean over draws of ``(Σ_t s_t a_t)²`` and ``v1`` with
        ``2 x1`` added.
    """
    out = dict(terms)
    if scores is not None and "I1" in terms:
        out["I1"] = (scores * scores).mean(0)
    cross = terms["exact"] * terms["exact"] - squared
    if scores is not None and "v1" in terms:
        out["v1"] = terms["v1"] + 2 * cross
    out["x1"] = cross
    return out


def batch_terms(scores: Tensor, terms) -> Dict[str, Tensor]:
    """A step's sums at granularity ``"batch"`` from each draw's weighted batch score.

    Args:
        scores: ``[M, *P]`` ``Σ_o s_o a_o`` over the step's observations, per draw.
        terms: The terms wanted: ``"I1"`` and, with ``M ≥ 2``, ``"v1"``.

    Returns:
        ``{"I1": mean over draws of the square, "v1": its spread among the draws}``, the
        step's sums (the estimate is ``I1 / N``).
    """
    squares = scores * scores
    mean = squares[0] if len(squares) == 1 else squares.mean(0)
    out = {"I1": mean} if "I1" in terms else {}
    if "v1" in terms:
        out["v1"] = draw_variance(squares)
    return out


def cross_terms_between_inputs(total: Tensor, squares: Tensor) -> Tensor:
    """``(Σ_n e_n)² − Σ_n e_n²`` from a pass's batch sums of ``exact``: ``total``, ``squares``.

    What squaring the score summed over the pass's inputs adds (halved) to the label-noise
    variance of the sum of their ``"input"`` summands; ``≥ 0`` (rounding clamped).
    """
    return (total * total - squares).clamp_min(0.0)


def with_cross_terms_between_inputs(sums: Dict[str, BatchSums]) -> Dict[str, BatchSums]:
    """One backward pass's batch sums with ``xb`` added where ``exact``'s are there."""
    out = {}
    for name, batch in sums.items():
        dense = batch.dense()
        if "exact" in dense:
            xb = cross_terms_between_inputs(dense["exact"], dense["exact_sq"])
            batch = BatchSums({**batch.sums, "xb": xb}, batch.rank_ones, batch.aliases)
        out[name] = batch
    return out
