"""Self-verification: the per-input gradients that a path's rules produce, against autograd.

A random direction ``v_n`` is placed at one observed position of each of a few inputs
(zero elsewhere). The path in use reduces ``Σ_n (∂(v_nᵀ h_n)/∂θ)²`` with its own rules,
from the batched forward pass (its ``I1`` term for such held directions), over the first
rows of the batch, one more than the directed inputs so that a gradient that leaks to
another input counts too. Autograd gives each directed input's gradient by a backward of
its direction alone; where every input's output depends on that input only, that is the
per-input gradient, whatever the rules assume about layers or batch axes. A parameter
whose two sums differ beyond the rounding of the model's precision has a rule that does
not apply to it. Each call's batch axis is read from the data flow the same way
(``batch_axes``).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from fimhooks.engine.general import batched_grad
from fimhooks.engine.observations import Directions, LabelDraw
from fimhooks.fisher.diagonal_terms import BatchSums

#: Inputs given a direction in a verification.
VERIFIED_INPUTS = 2
#: What ``FisherMonitor(verify=...)`` accepts.
OPTIONS = ("first", "always", "off")


def verification_draw(
    positions: Tensor, observed: Tensor, generator: torch.Generator
) -> Tuple[LabelDraw, int]:
    """Directions at the last observed position of the first ``VERIFIED_INPUTS`` inputs.

    Args:
        positions: ``[N, T, C]`` model output, detached.
        observed: ``[N, T]`` boolean.
        generator: A generator of the directions' device, used for nothing else.

    Returns:
        The draw (one held direction ``[1, N, T, C]``, position weights 1) and the number
        of leading rows the path must reduce.
    """
    N, T, C = positions.shape
    directed = observed.any(1).nonzero().flatten()[:VERIFIED_INPUTS]
    last = T - 1 - observed.flip(1).int().argmax(1)  # last observed position of each input
    vectors = positions.new_zeros(1, N, T, C)
    noise = torch.randn(len(directed), C, generator=generator, device=generator.device)
    vectors[0, directed, last[directed]] = noise.to(positions)
    draw = LabelDraw(
        Directions(positions, observed, held=vectors),
        weights=None,
        fourth_weights=None,
        coefficients=None,
        position_weights=observed.to(positions.dtype),
        num_inputs=len(directed),
    )
    rows = min(N, int(directed[-1]) + 2) if len(directed) else 0
    return draw, rows


def batch_axes(
    output: Tensor, to_output: Callable, positions: Tensor, observed: Tensor, calls, generator
) -> Dict[int, Optional[int]]:
    """Each call's batch axis, read from where one input's gradient flows.

    A random direction at every observed position of one input is backpropagated to the
    outputs of the calls: along a call's batch axis its gradient is zero everywhere but at
    that input, whatever the sizes of the other axes (sequence-first layouts, ``T == N``).

    Args:
        output: The model output ``h``.
        to_output: ``[D, N, T, C] -> [D, *h.shape]``.
        positions: ``[N, T, C]`` model output, detached.
        observed: ``[N, T]`` boolean.
        calls: The recorded calls (``recording.Call``).
        generator: A generator of the output's device, used for nothing else.

    Returns:
        ``{index of a call: its batch axis, or None where none holds the inputs apart}``
        for the calls that the direction reaches; the others are left out.
    """
    N = positions.shape[0]
    directed = observed.any(1).nonzero().flatten()
    reached = [i for i, c in enumerate(calls) if c.edge is not None]
    if not len(directed) or not reached:
        return {}
    n = int(directed[0])
    vector = positions.new_zeros(1, *positions.shape)
    noise = torch.randn(positions.shape[1:], generator=generator, device=generator.device)
    vector[0, n] = noise.to(positions) * observed[n, :, None]
    grads = batched_grad(
        output, [calls[i].edge for i in reached], to_output(vector).to(output.dtype)
    )
    axes = {}
    for i, grad in zip(reached, grads):
        if grad is None or not grad.ne(0).any():
            continue  # nothing flows there: no evidence
        found = []
        for axis, size in enumerate(grad.shape[1:]):
            if size != N:
                continue
            mass = grad[0].abs().movedim(axis, 0).flatten(1).sum(1)
            if mass[n] > 0 and int(mass.ne(0).sum()) == 1:
                found.append(axis)
        axes[i] = found[0] if len(found) == 1 else None
    return axes


def autograd_squares(
    output: Tensor, to_output: Callable, draw: LabelDraw, params: Dict[str, Tensor]
) -> Dict[str, Tensor]:
    """``Σ_n (∂(v_nᵀ h)/∂θ)²`` per parameter, by one backward of each input's direction.

    Args:
        output: The model output ``h`` whose history is kept.
        to_output: ``[D, N, T, C] -> [D, *h.shape]``, the output's layout.
        draw: From ``verification_draw``.
        params: ``{name: parameter}``.
    """
    vectors = draw.directions[:]  # [1, N, T, C]
    directed = vectors[0].flatten(1).ne(0).any(1).nonzero().flatten()
    per_input = vectors.new_zeros(len(directed), *vectors.shape[1:])
    per_input[torch.arange(len(directed)), directed] = vectors[0, directed]
    grad_outputs = to_output(per_input).to(output.dtype)
    names, tensors = list(params), list(params.values())
    grads = batched_grad(output, tensors, grad_outputs)
    out = {}
    for name, param, grad in zip(names, tensors, grads):
        grad = torch.zeros_like(param)[None] if grad is None else grad.detach()
        grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
        out[name] = (grad * grad).sum(0)
    return out


def disagreements(
    sums: Dict[str, BatchSums], truth: Dict[str, Tensor], tolerance: float, eps: float
) -> Dict[str, float]:
    """``{parameter: relative error}`` where the path's sums differ from autograd's.

    The error is the largest entry's difference over the largest entry of autograd's sum;
    a parameter the path has no sums for counts as zero. Differences below ``eps`` times
    the largest entry of any parameter are rounding (a gradient that vanishes exactly,
    such as that of an attention key's bias, comes out as noise of that size).
    """
    floor = eps * max((float(t.abs().max()) for t in truth.values() if t.numel()), default=0.0)
    out = {}
    for name, expected in truth.items():
        found = sums.get(name)
        value = torch.zeros_like(expected) if found is None else found.dense()["I1"]
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        error = float((value.to(expected) - expected).abs().max()) if expected.numel() else 0.0
        if error > max(tolerance * scale, floor):
            out[name] = error / scale if scale else float("inf")
    return out


def tolerance(dtypes) -> Tuple[float, float]:
    """Relative rounding allowed at the lowest of ``dtypes``' precisions, and its ``eps``."""
    eps = max(torch.finfo(d).eps for d in dtypes)
    return max(1e-6, min(5e-2, 1e4 * eps)), eps


def describe(errors: Dict[str, float], layer_of: Optional[Callable] = None) -> str:
    """``"'name' (layer 'path'): 12%"``, the largest first, at most five."""
    worst = sorted(errors.items(), key=lambda item: -item[1])[:5]

    def where(name):
        return f" (layer '{layer_of(name) or '<model>'}')" if layer_of is not None else ""

    return ", ".join(f"'{name}'{where(name)}: {error:.2g}" for name, error in worst)
