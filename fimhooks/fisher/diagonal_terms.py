"""Per-input diagonal terms of docs/math.md §2-§3 and their batch sums, as pure tensor functions.

Notation (per parameter entry ``i`` and input ``n``):

* ``U``: ``[K, N, *P]`` Jacobian-transposed images of the backpropagated directions.
* ``W``: ``[K, N, *P]`` diagonal second derivatives ``∂²(V_kᵀ h)/∂θ_i²``; ``None`` where
  the network is piecewise linear (then all of them vanish).
* ``weights`` ``[N, K]``, ``fourth_weights`` ``[N, K]``, ``kappa``: see ``likelihoods``.
* ``coefficients`` ``[N, M, K]``: sampled residuals in the directions' basis.
* ``factors`` ``[N, 5]``: the observations' bound factors (``bounds.bound_factors``).
* ``data_weights`` ``[N, K]``: 1 for the direction of the data's residual (the empirical
  Fisher's), 0 for the others (``observations.with_data_residuals``).

The terms are ``g`` (exact), ``v1``, ``v2`` (label-noise variances of one summand),
``I1`` (``ā``: the score summand averaged over the M labels) and ``I2`` (``b̄``), ``EF``
(the squared gradient at the data's label), and the bounds of ``g``, ``v1`` and ``v2``
(docs/math.md §7): ``exact_lower``, ``exact_upper``, ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from fimhooks.fisher.bounds import CENTRING, FISHER_MAX, FISHER_MIN, FOURTH_MAX, FOURTH_MIN
from fimhooks.fisher.quantities import BOUND_SIDES, TERMS, bound_term, bound_terms


def per_input_terms(
    U: Tensor,
    W: Optional[Tensor],
    weights: Optional[Tensor],
    fourth_weights: Optional[Tensor],
    kappa: float,
    coefficients: Optional[Tensor],
    wanted: Iterable[str],
    factors: Optional[Tensor] = None,
    data_weights: Optional[Tensor] = None,
) -> Dict[str, Tensor]:
    """Per-input diagonal terms.

    With ``weights=None`` the directions are the sampled residuals themselves (Î₁ only):
    ``I1`` is then the mean of ``U²`` over the ``K = M`` directions, and ``v1`` (with
    ``M ≥ 2``) the unbiased sample variance of ``U²`` among them. With ``W=None`` (no
    curvature) ``I2`` is ``exact`` itself (the same tensor) and ``v2`` and its bounds are
    left out: zero.

    Returns:
        ``{term: [N, *P]}`` for each wanted term among ``exact, v1, v2, I1, I2``, ``EF``
        (needs ``data_weights``) and the bound terms (need ``factors``).
    """
    partial = direction_sums(U, W, weights, fourth_weights, coefficients, wanted, data_weights)
    return finish_terms(partial, kappa, wanted, U.shape[0], factors)


def direction_sums(
    U, W, weights, fourth_weights, coefficients, wanted, data_weights=None
) -> Dict[str, Tensor]:
    """Sums over some of the ``K`` directions, from which ``finish_terms`` makes the terms.

    Every term is a function of sums over directions, so directions can be taken a chunk
    at a time and their sums added (``add_sums``). Arguments as in ``per_input_terms``,
    restricted to the chunk's directions.

    Returns:
        ``{"g": Σ w U², "fourth": Σ w4 U⁴, "scores": Σ R U [M, N, *P], "W2": Σ w W²,
        "residuals": Σ R W [M, N, *P]}``, those the wanted terms need; ``{"U2": Σ U²}``
        when the directions are the sampled residuals, with ``{"U4": Σ U⁴}`` for ``v1``
        (their spread). For bounds also ``"sq_u": Σ U²``,
        ``"sum_u": Σ U`` and, with curvature, ``"sq_w"``, ``"sum_w"`` (over the
        likelihood's directions); for ``EF``, ``"ef": Σ d U²`` (``d = data_weights``).
    """
    wanted = set(wanted)
    U2 = U * U

    def over_basis(values):  # Σ over the likelihood's (or sampled) directions only
        if data_weights is None:
            return values[0] if len(values) == 1 else values.sum(0)
        return _weighted_sum(1 - data_weights, values)

    out = {"ef": _weighted_sum(data_weights, U2)} if "EF" in wanted else {}
    if weights is None:
        if "I1" in wanted:
            out["U2"] = over_basis(U2)
        if "v1" in wanted:  # the spread among the draws (docs/math.md §7d)
            out["U4"] = over_basis(U2 * U2)
        return out
    out["g"] = _weighted_sum(weights, U2)
    if "v1" in wanted:
        out["fourth"] = _weighted_sum(fourth_weights, U2 * U2)
    if "I1" in wanted:
        out["scores"] = torch.einsum("nmk,kn...->mn...", coefficients, U)
    if "I2" in wanted and W is not None:
        out["W2"] = _weighted_sum(weights, W * W)
        out["residuals"] = torch.einsum("nmk,kn...->mn...", coefficients, W)
    if bound_terms(wanted):
        out["sq_u"], out["sum_u"] = over_basis(U2), over_basis(U)
        if W is not None:
            out["sq_w"], out["sum_w"] = over_basis(W * W), over_basis(W)
    return out


#: Entries per column block of ``sampled_square_sums`` (its temporaries stay in cache).
COLUMN_BLOCK = 1024


def sampled_square_sums(U: Tensor, wanted) -> Dict[str, Tensor]:
    """Batch sums of Î₁ from the sampled residuals' images, one observation per input.

    The numbers of ``batch_sums(finish_terms(direction_sums(U, None, None, ...)))`` for
    held residuals (no data's direction): ``I1``, the mean over the ``M`` draws of ``U²``,
    summed over inputs with its squares (``I1_sq``), and with ``v1`` the spread of ``U²``
    among the draws. Formed ``COLUMN_BLOCK`` entries at a time: no ``[n, *P]``
    temporary is allocated, which costs more than the arithmetic on large parameters.

    Args:
        U: ``[M, n, *P]``.
        wanted: The terms wanted (``"I1"``, ``"v1"``).

    Returns:
        ``{"I1", "I1_sq"[, "v1"]: [*P]}``.
    """
    M, n = U.shape[:2]
    flat = U.reshape(M, n, -1)
    keys = ("I1", "I1_sq") + (("v1",) if "v1" in wanted else ())
    out = {key: flat.new_empty(flat.shape[2]) for key in keys}
    for start in range(0, flat.shape[2], COLUMN_BLOCK):
        block = slice(start, start + COLUMN_BLOCK)
        squares = flat[:, :, block].square()  # [M, n, w]
        mean = squares[0] if M == 1 else squares.mean(0)
        torch.sum(mean, 0, out=out["I1"][block])
        torch.sum(mean * mean, 0, out=out["I1_sq"][block])
        if "v1" in out:
            total = squares.sum(0)
            spread = (squares.square().sum(0) - total * total / M) / (M - 1)
            torch.sum(spread, 0, out=out["v1"][block])
    return {key: value.reshape(U.shape[2:]) for key, value in out.items()}


def add_sums(a: Optional[Dict[str, Tensor]], b: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Direction sums of two chunks of directions together."""
    return dict(b) if a is None else {key: a[key] + value for key, value in b.items()}


def finish_terms(
    sums: Dict[str, Tensor], kappa: float, wanted, directions: int, factors=None
) -> dict:
    """The terms from the sums over all directions (``direction_sums``).

    Args:
        sums: Direction sums over all ``K`` directions.
        kappa: The likelihood's ``κ``.
        wanted: The terms to return.
        directions: ``K`` (the number of sampled residuals when ``"U2"`` is given, the
            data's direction included when ``"ef"`` is).
        factors: ``[N, 5]`` bound factors, needed when bound terms are wanted.
    """
    out = {"EF": sums["ef"]} if "ef" in sums else {}
    if "g" not in sums:  # the directions are the sampled residuals (and the data's)
        draws = directions - ("ef" in sums)
        if "U2" in sums:
            out["I1"] = sums["U2"] if draws == 1 else sums["U2"] / draws
        if "U4" in sums:  # the unbiased sample variance of U² among the draws
            out["v1"] = (sums["U4"] - sums["U2"] * sums["U2"] / draws) / (draws - 1)
        return out
    g = sums["g"]
    out["exact"] = g
    if "fourth" in sums:
        out["v1"] = sums["fourth"] + kappa * g * g
    if "scores" in sums:
        out["I1"] = (sums["scores"] * sums["scores"]).mean(0)
    if "I2" in wanted:
        if "W2" not in sums:
            out["I2"] = g
        else:
            out["v2"] = sums["W2"]
            out["I2"] = g - sums["residuals"].mean(0)
    if "sq_u" in sums:
        out.update(bounds_from_norms(sums, factors, wanted))
    return out


def bounds_from_norms(sums: Dict[str, Tensor], factors: Tensor, wanted) -> dict:
    """Bound terms of docs/math.md §7 from the squared norms of ``∂ᵢh`` and ``∂²ᵢh`` (``bounds``).

    Args:
        sums: Direction sums with ``sq_u, sum_u`` (and ``sq_w, sum_w`` with curvature),
            ``[N, *P]`` each.
        factors: ``[N, 5]``.
        wanted: The terms to return.

    Returns:
        ``{bound term: [N, *P]}``; the bounds of ``v2`` only with curvature.
    """
    f = factors.T.reshape(factors.shape[1], -1, *[1] * (sums["sq_u"].dim() - 1))

    def squared_norm(key):  # Σ_a (∂h_a)², centred for the categorical (c = 1/C)
        return (sums["sq_" + key] - f[CENTRING] * sums["sum_" + key] ** 2).clamp_min(0)

    u2 = squared_norm("u")
    pairs = {
        "exact": (u2 * f[FISHER_MIN], u2 * f[FISHER_MAX]),
        "v1": (u2 * u2 * f[FOURTH_MIN], u2 * u2 * f[FOURTH_MAX]),
    }
    if "sq_w" in sums:
        w2 = squared_norm("w")
        pairs["v2"] = (w2 * f[FISHER_MIN], w2 * f[FISHER_MAX])
    out = {}
    for term, pair in pairs.items():
        for side, value in zip(BOUND_SIDES, pair):
            if bound_term(term, side) in wanted:
                out[bound_term(term, side)] = value
    return out


def add_positions(total: Dict[str, Tensor], terms: Dict[str, Tensor], weights: Tensor) -> dict:
    """``total + Σ_t weights[n, t] · terms[t, n]`` (``weights²`` for variances), aliases kept.

    An input's summand is the mean over its positions (docs/math.md §7c), so a position of input
    ``n`` enters with ``weights[n, t] = 1/T_n`` and its label-noise variance with ``1/T_n²``.

    Args:
        total: ``{term: [n, *P]}`` so far (empty at first).
        terms: ``{term: [t, n, *P]}`` of some positions, from ``per_input_terms``.
        weights: ``[n, t]``.
    """
    out = {}
    whole = weights.shape[1] == 1 and bool((weights == 1).all())  # one position of weight 1
    for name, value in terms.items():
        twin = next((k for k in out if terms[k] is value), None)
        if twin is not None:
            out[name] = out[twin]
            continue
        if whole:
            out[name] = total[name] + value[0] if name in total else value[0]
            continue
        w = weights * weights if TERMS[name].label_variance else weights
        scaled = torch.einsum("nt,tn...->n...", w.to(value.dtype), value)
        out[name] = total[name] + scaled if name in total else scaled
    return out


@dataclass
class RankOne:
    """Batch sums of a weight ``z = θ x`` whose per-input Jacobians are outer products.

    Entry ``(j, k)`` of a term's batch sum is ``Σ_n t[n, j] x[n, k]^p``, ``p`` the term's
    input power (``quantities.Term``); a summand's sum of squares ``{key}_sq`` is
    ``Σ_n t[n, j]² x[n, k]⁴``. Only the output terms and the inputs are kept, O(batch ×
    width) instead of the weight's size; the products are formed where they are absorbed.

    Attributes:
        keys: The terms, those of input power 2 first.
        outputs: ``[N, len(keys)·out]`` per-input output terms, one block per key.
        inputs: ``[N, in]`` the layer's inputs.
    """

    keys: Tuple[str, ...]
    outputs: Tensor
    inputs: Tensor

    def products(self) -> List[Tuple[Tuple[str, ...], Tensor, Tensor]]:
        """``(keys, left, right)``: ``left.T @ right`` are the sums of ``keys``, one block each.

        The terms of input power 2 with ``x²``; those of power 4 and the summands' squares
        with ``x⁴``.
        """
        width = self.outputs.shape[1] // len(self.keys)
        blocks = dict(zip(self.keys, self.outputs.split(width, dim=1)))
        second = tuple(k for k in self.keys if TERMS[k].input_power == 2)
        fourth = self.keys[len(second) :]
        squared = tuple(k for k in second if TERMS[k].summand)
        x2 = self.inputs * self.inputs
        out = [(second, self.outputs[:, : len(second) * width], x2)] if second else []
        if fourth or squared:
            left = [blocks[k] for k in fourth] + [blocks[k] * blocks[k] for k in squared]
            keys = fourth + tuple(k + "_sq" for k in squared)
            out.append((keys, torch.cat(left, dim=1), x2 * x2))
        return out


@dataclass
class BatchSums:
    """Batch sums of one parameter's terms (``{name}`` and ``{name}_sq``), ``[*P]`` each.

    Attributes:
        sums: Sums already formed, by key.
        rank_ones: Sums of a rank-one weight not yet multiplied out (several passes or
            chunks of inputs: one each); the running sums absorb them in one ``addmm``.
        aliases: Keys whose sums are those of another key (``I2`` is ``exact`` where
            the network is piecewise linear).
    """

    sums: Dict[str, Tensor] = field(default_factory=dict)
    rank_ones: List[RankOne] = field(default_factory=list)
    aliases: Dict[str, str] = field(default_factory=dict)

    def products(self) -> List[Tuple[Tuple[str, ...], Tensor, Tensor]]:
        """The rank-one sums as ``(keys, left, right)`` (``RankOne.products``)."""
        return [p for rank_one in self.rank_ones for p in rank_one.products()]

    def dense(self) -> Dict[str, Tensor]:
        """All sums by key, aliases included, with the products multiplied out."""
        sums = dict(self.sums)
        for keys, left, right in self.products():
            for key, block in zip(keys, (left.T @ right).split(left.shape[1] // len(keys))):
                sums[key] = sums[key] + block if key in sums else block
        sums.update({key: sums[twin] for key, twin in self.aliases.items()})
        return sums

    def add(self, other: "BatchSums") -> "BatchSums":
        """Sums over the inputs of both (same parameter and terms)."""
        sums = {key: value + other.sums[key] for key, value in self.sums.items()}
        return BatchSums(sums, self.rank_ones + other.rank_ones, self.aliases)

    def dtype(self) -> torch.dtype:
        """The precision the sums arrive in."""
        first = next(iter(self.sums.values()), None)
        return first.dtype if first is not None else self.rank_ones[0].outputs.dtype

    def totals(self) -> List[Tensor]:
        """Scalars that are finite iff every sum and every factor of a product is.

        The factors of a rank-one sum hold squared output terms and the inputs' fourth
        powers: finite iff the largest output term squared and input to the fourth are.
        """
        totals = [t.sum() for t in self.sums.values()]
        for r in self.rank_ones:
            if r.outputs.numel() and r.inputs.numel():  # empty factors are finite
                totals += [r.outputs.abs().amax() ** 2, r.inputs.abs().amax() ** 4]
        return totals


def rank_one_sum_keys(keys: Tuple[str, ...]) -> Tuple[str, ...]:
    """Keys of a ``RankOne``'s batch sums: its terms, then the summands' squares."""
    return keys + tuple(k + "_sq" for k in keys if TERMS[k].summand)


def batch_sums(terms: Dict[str, Tensor]) -> BatchSums:
    """Sums over the batch axis of per-input terms ``{term: [N, *P]}``, squares included."""
    summands, aliases = _summands(terms)
    return BatchSums({key: t.sum(0) for key, t in summands.items()}, aliases=aliases)


def rank_one_batch_sums(output_terms: Dict[str, Tensor], inputs: Tensor) -> BatchSums:
    """Batch sums for a weight whose per-input Jacobian is an outer product.

    For ``z = θ x`` (a Linear layer without extra dimensions) every term of entry
    ``(j, k)`` is the term of output ``j`` times ``x_k²`` (``exact, I1, I2``) or ``x_k⁴``
    (``v1, v2`` and squared terms), so batch sums are two matrix products and no
    per-input tensor of the weight's size is formed (``RankOne``).

    Args:
        output_terms: ``{term: [N, out]}`` per-input terms of the layer output.
        inputs: ``[N, in]`` the layer input.
    """
    distinct, aliases = _distinct(output_terms)
    if not distinct:
        return BatchSums(aliases=aliases)
    keys = tuple(sorted(distinct, key=lambda k: TERMS[k].input_power))
    outputs = torch.cat([distinct[k] for k in keys], dim=1)
    return BatchSums(rank_ones=[RankOne(keys, outputs, inputs)], aliases=aliases)


def _distinct(terms: Dict[str, Tensor]):
    """Terms that are distinct tensors ``{key: tensor}`` and the keys aliased to them."""
    distinct, aliases = {}, {}
    for name, t in terms.items():
        twin = next((k for k, other in distinct.items() if other is t), None)
        if twin is None:
            distinct[name] = t
            continue
        aliases[name] = twin
        if TERMS[name].summand:
            aliases[name + "_sq"] = twin + "_sq"
    return distinct, aliases


def _summands(terms: Dict[str, Tensor]):
    """Distinct per-input summands ``{key: tensor}``, squares included, and aliased keys."""
    distinct, aliases = _distinct(terms)
    summands = dict(distinct)
    for name, t in distinct.items():
        if TERMS[name].summand:
            summands[name + "_sq"] = t * t
    return summands, aliases


def _weighted_sum(weights: Tensor, values: Tensor) -> Tensor:
    """``Σ_k weights[n, k] values[k, n, ...]``: ``[N, K]``, ``[K, N, *P]`` to ``[N, *P]``."""
    return torch.einsum("nk,kn...->n...", weights, values)
