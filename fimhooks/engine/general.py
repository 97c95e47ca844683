"""Batch sums on any graph autograd can differentiate: the general path.

The label directions ``V [K, N, T, C]`` are backpropagated by autograd itself, in one
batched backward (``is_grads_batched``) per chunk of positions and directions, from the
model output to the output of every watched call (its gradient edge, recorded in the
forward pass). Each layer's rule (``layers``) turns those vectors into per-input parameter
gradients ``U [k, n, *P]``, summed over the calls that use a parameter (tied weights), and
``diagonal_terms`` reduces them to direction sums, then per position and input to terms,
then to batch sums.

Memory is bounded by the budget (``memory.Budget``): half of it for the vectors one
batched backward holds at the watched outputs, a quarter for the per-input tensors of a
parameter's size, formed a chunk of inputs at a time, whatever the number of classes,
positions or inputs.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from fimhooks.engine.chain import outer_products
from fimhooks.engine.layers import per_input_rule, spec_for
from fimhooks.engine.memory import COPIES, Budget
from fimhooks.engine.observations import LabelDraw, summed_over_positions
from fimhooks.engine.recording import Call
from fimhooks.fisher.diagonal_terms import (
    BatchSums,
    add_positions,
    add_sums,
    batch_sums,
    direction_sums,
    finish_terms,
    rank_one_batch_sums,
    sampled_square_sums,
)
from fimhooks.fisher.granularity import input_terms, squared_weighted_fisher, weighted_scores

#: One use of a parameter: a call and the parameter's name inside the called module.
Use = Tuple[Call, str]


def general_batch_sums(
    output: Tensor,
    to_output: callable,
    draw: LabelDraw,
    uses: Dict[str, List[Use]],
    kappa: float,
    terms: frozenset,
    budget: Budget,
    rows: Optional[int] = None,
    granularity: str = "token",
) -> Dict[str, BatchSums]:
    """Batch sums of every parameter in ``uses`` for one collected step.

    Args:
        output: The model output ``h`` whose history is backpropagated.
        to_output: ``[D, N, T, C] -> [D, *h.shape]``, the output's layout.
        draw: Directions, weights and coefficients of the step.
        uses: ``{parameter name: [(call, local name), ...]}``.
        kappa: The likelihood's ``κ`` (``v₁ = Σ w4 U⁴ + κ g²``).
        terms: The terms to reduce (``diagonal_terms``).
        budget: Memory for the step's extra tensors.
        rows: Reduce the first ``rows`` inputs only (default: all).
        granularity: ``"token"`` or ``"input"``: where Î₁ squares the score
            (docs/math.md §7d). Without the exact pass, ``"input"`` backpropagates each
            input's residuals at all its positions together, one vector per draw.

    Returns:
        ``{parameter name: BatchSums}``.
    """
    square_inputs = granularity == "input" and draw.directions.shape[2] > 1
    if square_inputs and draw.weights is None:
        T, C = draw.directions.shape[2:]
        draw, square_inputs = summed_over_positions(draw), False
        to_output = _from_summed(to_output, T, C)
    calls = list({id(c): c for use in uses.values() for c, _ in use}.values())
    K, N, T = draw.directions.shape[:3]
    largest = max(p.numel() for p in _parameters(uses).values())
    watched = sum(c.output.numel() for c in calls)
    itemsize = max(4, output.element_size())  # vectors are captured in float32 at least
    elements = int(budget.entries(itemsize, share=0.25) / COPIES)
    capture = int(budget.entries(itemsize, share=0.5))
    # directions per backward, then inputs per chunk (every chunk of inputs repeats the
    # backward of all positions), then positions per backward when all K directions fit
    per_backward = max(1, min(K, elements // largest, capture // max(1, watched)))
    step = min(N, max(1, elements // (per_backward * largest)))
    if per_backward == K:
        per_chunk = min(T, capture // (K * watched), elements // (K * step * largest))
        per_chunk = max(1, per_chunk)
        chunks = [(range(t, min(T, t + per_chunk)), range(K)) for t in range(0, T, per_chunk)]
    else:  # chunks of one position's directions
        chunks = [
            (range(t, t + 1), range(k, min(K, k + per_backward)))
            for t in range(T)
            for k in range(0, K, per_backward)
        ]
    totals: Dict[str, BatchSums] = {}
    N = N if rows is None else rows
    for start in range(0, N, step):
        samples = slice(start, min(N, start + step))
        sums = _input_chunk_sums(
            output, to_output, draw, uses, calls, chunks, samples, kappa, terms, square_inputs
        )
        for name, value in sums.items():
            totals[name] = totals[name].add(value) if name in totals else value
    return totals


def _input_chunk_sums(
    output, to_output, draw, uses, calls, chunks, samples, kappa, terms, square_inputs
):
    """Batch sums over the inputs ``samples``, a chunk of positions and directions at a time.

    Direction sums of a position are added over its chunks of directions and turned into
    terms after the last one; terms are added over positions with the positions' weights.
    With ``square_inputs`` (granularity ``"input"`` with the exact pass) each draw's
    weighted scores are added over positions too, and squared once per input.
    """
    K = draw.directions.shape[0]
    # rank-one layers (weight and bias of a Linear): terms of the layer's output, per call
    rank_one = {name: id(u[0][0]) for name, u in uses.items() if _is_rank_one(u, draw)}
    # an input's cross terms between positions: where it has several and exact is reduced
    cross_terms = "x1" in terms and draw.directions.shape[2] > 1 and draw.weights is not None
    # the sampled residuals alone at one position per input: sums formed straight from U
    fused = draw.weights is None and draw.data_weights is None and draw.directions.shape[2] == 1
    fused = fused and len(chunks) == 1
    direct: Dict[str, BatchSums] = {}
    per_input: Dict[object, dict] = {}  # by parameter name, or by call for rank-one layers
    partial: Dict[object, dict] = {}
    scores: Dict[object, Tensor] = {}  # square_inputs: Σ_t s_t a_t, [M, n, *P]
    squared: Dict[object, Tensor] = {}  # cross_terms: Σ_t w_t² g_t², [n, *P]
    for positions, directions in chunks:
        captured = _backward(output, to_output, draw, positions, directions, samples, calls)
        done = set()  # a rank-one layer's output terms serve its weight and its bias
        for name, param_uses in uses.items():
            key = rank_one.get(name, name)
            if key in done:
                continue
            done.add(key)
            if key != name:
                U = captured[key]
            else:
                grads = [_use_grads(c, local, captured[id(c)], samples) for c, local in param_uses]
                U = grads[0] if len(grads) == 1 else torch.stack(grads).sum(0)
                if fused:
                    direct[name] = BatchSums(sampled_square_sums(U, terms))
                    continue
            sums = _direction_sums(U, draw, positions, directions, samples, terms)
            partial[key] = add_sums(partial.get(key), sums)
        if directions[-1] != K - 1:
            continue
        weights = draw.position_weights[samples][:, positions]
        factors = _folded(draw.bound_factors, samples, positions)
        for key, value in partial.items():
            finished = finish_terms(value, kappa, terms, K, factors)
            position_terms = _by_position(finished, len(positions))
            per_input[key] = add_positions(per_input.get(key, {}), position_terms, weights)
            if square_inputs and "scores" in value:
                at = value["scores"].unflatten(1, (len(positions), -1))
                scores[key] = scores.get(key, 0) + weighted_scores(at, weights)
            if cross_terms:
                g = position_terms["exact"]
                squared[key] = squared.get(key, 0) + squared_weighted_fisher(g, weights)
        partial = {}
    for key in squared:
        per_input[key] = input_terms(per_input[key], scores.get(key), squared[key])
    sums = dict(direct)
    for name, param_uses in uses.items():
        terms_of = per_input.get(rank_one.get(name, name))
        if not terms_of:
            continue
        call, local = param_uses[0]
        if name in rank_one and local == "weight":
            sums[name] = rank_one_batch_sums(terms_of, call.first_input(samples))
        else:
            sums[name] = batch_sums(terms_of)
    return sums


def _backward(output, to_output, draw, positions, directions, samples, calls) -> dict:
    """Vectors at each watched output, ``{id(call): [len(positions)·len(directions), n, *out]}``.

    The batch axis of each output is moved next to the directions' axis. A call with
    further output tensors (``Call.others``) gets a tuple, the first output's first.
    """
    V = draw.directions[directions.start : directions.stop, samples]
    vectors = V.new_zeros(len(positions), len(V), *draw.directions.shape[1:])
    for j, t in enumerate(positions):
        vectors[j, :, samples, t] = V[:, :, t]
    vectors = to_output(vectors.flatten(0, 1)).to(output.dtype)
    # every output tensor of a call with a history: the first, then the others
    outputs = [
        (call, t, edge)
        for call in calls
        for t, edge in [(call.output, call.edge)] + [(o.tensor, o.edge) for o in call.others]
    ]
    edges = [edge for _, _, edge in outputs if edge is not None]
    grads = iter(batched_grad(output, edges, vectors))
    found: Dict[int, list] = {}
    for call, tensor, edge in outputs:
        grad = next(grads) if edge is not None else None
        if grad is None:
            grad = vectors.new_zeros(vectors.shape[0], *tensor.shape)
        found.setdefault(id(call), []).append(grad.detach())
    captured = {}
    for call in calls:
        grads = found[id(call)]
        if call.others and call.edge is not None:
            grads = [grads[0]] + _from_outside(call, grads)
        axes = [call.batch_dim] + [call.other_axis(o) for o in call.others]
        grads = [g.movedim(1 + axis, 1)[:, samples] for g, axis in zip(grads, axes)]
        grads = [g.float() if g.element_size() < 4 else g for g in grads]
        captured[id(call)] = grads[0] if len(grads) == 1 else tuple(grads)
    return captured


def _from_outside(call: Call, grads: list) -> list:
    """The further outputs' gradients less what reaches them through the first output.

    A further output computed on the way to the first (an LSTM cell's ``c`` inside ``h``)
    receives, at its edge, the first output's gradient too; the generic rule must see
    only what enters from outside the call.
    """
    inside = batched_grad(call.output, [o.edge for o in call.others], grads[0])
    return [g if i is None else g - i.detach() for g, i in zip(grads[1:], inside)]


def batched_grad(output: Tensor, inputs: list, vectors: Tensor) -> list:
    """``∂(vᵀ output)/∂inputs`` for each of ``vectors [D, *output.shape]``: ``[D, *input]``.

    One batched backward; where an operation has no batching rule (checkpointing's saved
    tensor hooks, ...), one backward per vector. ``None`` for an input not reached. A
    single vector takes a plain backward (no ``vmap``).
    """
    if len(vectors) == 1:
        grads = torch.autograd.grad(
            [output], inputs, [vectors[0]], retain_graph=True, allow_unused=True
        )
        return [None if g is None else g.unsqueeze(0) for g in grads]
    try:
        return torch.autograd.grad(
            [output], inputs, [vectors], retain_graph=True, allow_unused=True,
            is_grads_batched=True,
        )  # fmt: skip
    except RuntimeError:
        rows = [
            torch.autograd.grad([output], inputs, [v], retain_graph=True, allow_unused=True)
            for v in vectors
        ]
        return [
            None if rows[0][i] is None else torch.stack([r[i] for r in rows])
            for i in range(len(inputs))
        ]


def _from_summed(to_output: callable, T: int, C: int) -> callable:
    """``to_output`` for ``[D, N, 1, T·C]`` vectors (``summed_over_positions``)."""
    return lambda vectors: to_output(vectors.unflatten(-1, (T, C)).squeeze(2))


def _use_grads(call: Call, local: str, grad_out: Tensor, samples: slice) -> Tensor:
    return per_input_rule(call, [local])(call, [local], grad_out, samples)[local]


def _direction_sums(U: Tensor, draw: LabelDraw, positions, directions, samples, terms):
    """Direction sums at each position, ``[t·n, ...]``, from ``U [t·k, n, *P]``.

    Positions are folded into the inputs' axis (positions first) so that
    ``direction_sums`` runs once.
    """
    t, n = len(positions), U.shape[1]
    U = U.unflatten(0, (t, -1)).transpose(0, 1).reshape(-1, t * n, *U.shape[2:])
    chosen = slice(directions.start, directions.stop)

    def at(x):  # [N, T, ..., K] -> [t·n, ..., k]
        return None if x is None else _folded(x[..., chosen], samples, positions)

    weights, fourth, coefficients = at(draw.weights), at(draw.fourth_weights), at(draw.coefficients)
    data = at(draw.data_weights)
    return direction_sums(U, None, weights, fourth, coefficients, terms, data)


def _folded(x, samples, positions):
    """``[N, T, ...]`` at the inputs ``samples`` and ``positions`` as ``[t·n, ...]``."""
    if x is None:
        return None
    return x[samples][:, positions].transpose(0, 1).flatten(0, 1)


def _by_position(terms: Dict[str, Tensor], positions: int) -> Dict[str, Tensor]:
    """``[t·n, *P]`` terms as ``[t, n, *P]``; a term that is another's stays its alias."""
    views: Dict[int, Tensor] = {}
    for value in terms.values():
        views.setdefault(id(value), value.unflatten(0, (positions, -1)))
    return {key: views[id(value)] for key, value in terms.items()}


def _is_rank_one(param_uses: List[Use], draw: LabelDraw) -> bool:
    """A Linear weight or bias used once, on ``[N, in]`` inputs, with one position."""
    if len(param_uses) != 1 or draw.directions.shape[2] != 1:
        return False
    call, _ = param_uses[0]
    rank_one = spec_for(call.module).rank_one and not call.generic
    return rank_one and call.batch_dim == 0 and outer_products(call.module, call.inputs[0])


def _parameters(uses: Dict[str, List[Use]]) -> Dict[str, Tensor]:
    return {name: u[0][0].module.get_parameter(u[0][1]) for name, u in uses.items()}
