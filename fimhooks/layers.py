"""Per-input parameter gradients of one layer call: one declaration per layer type.

A rule maps a recorded call (``recording.Call``) and the vectors backpropagated to its
output, ``grad_out [D, n, *out]`` for the inputs ``samples``, to per-input gradients
``{local parameter name: [D, n, *param.shape]}``: the part of ``∂(V_dᵀ h_n)/∂θ`` that flows
through that call. A parameter used by several calls (tied weights) sums them.

Layers without a declaration use ``generic_grads``: ``torch.func`` on one input at a time
(exact, bounded memory, slower).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
from backpack.utils.conv import unfold_by_conv
from torch import Tensor, nn
from torch.func import functional_call, vjp

from fimhooks.recording import batch_axis, first_tensor

Grads = Dict[str, Tensor]


@dataclass(frozen=True)
class LayerRule:
    """How fimhooks handles one layer type on the general path.

    Attributes:
        grads: ``(call, names, grad_out [D, n, *out], samples) -> {name: [D, n, *P]}``.
        affine: The output is affine in each of the layer's parameters, so Î₂ of the
            layer needs no curvature of the layer itself.
        rank_one: Per-input weight Jacobians are outer products on ``[N, in]`` inputs
            (Linear): batch sums are products of output terms and input powers.
    """

    grads: Callable
    affine: bool
    rank_one: bool = False


def _linear_grads(call, names, grad_out: Tensor, samples: slice) -> Grads:
    x = call.args[0][samples]
    g = grad_out.reshape(*grad_out.shape[:2], -1, grad_out.shape[-1])  # [D, n, L, out]
    out = {}
    if "weight" in names:
        out["weight"] = torch.einsum("dnlo,nli->dnoi", g, x.reshape(x.shape[0], -1, x.shape[-1]))
    if "bias" in names:
        out["bias"] = g.sum(2)
    return out


def _embedding_grads(call, names, grad_out: Tensor, samples: slice) -> Grads:
    module = call.module
    index = call.args[0][samples]
    one_hot = nn.functional.one_hot(index.reshape(index.shape[0], -1), module.num_embeddings)
    g = grad_out.reshape(*grad_out.shape[:2], -1, grad_out.shape[-1])  # [D, n, L, dim]
    weight = torch.einsum("dnle,nlv->dnve", g, one_hot.to(g.dtype))
    if module.padding_idx is not None:  # torch leaves that row without gradient
        weight[:, :, module.padding_idx] = 0
    return {"weight": weight}


def _conv_grads(call, names, grad_out: Tensor, samples: slice) -> Grads:
    """Convolutions with ``groups=1`` and zero padding: weights from the unfolded input."""
    module = call.module
    out = {}
    if "weight" in names:
        patches = unfold_by_conv(call.args[0][samples], module)  # [n, in·k, positions]
        products = torch.einsum("dnop,nip->dnoi", grad_out.flatten(3), patches)
        out["weight"] = products.reshape(*grad_out.shape[:2], *module.weight.shape)
    if "bias" in names:
        out["bias"] = grad_out.flatten(3).sum(3)
    return out


def generic_grads(call, names: Sequence[str], grad_out: Tensor, samples: slice) -> Grads:
    """Any module: ``torch.func`` vector-Jacobian products on one input at a time.

    Positional tensor arguments are batched along the module's batch axis (``batch_axis``);
    keyword tensors whose first axis has the batch size are batched along it.
    """
    module = call.module
    params = {n: p.detach() for n, p in module.named_parameters() if n in names}
    axis, size = batch_axis(module), call.batch_size
    args = [a[_slice_at(axis, samples)] if _batched(a, axis, size) else a for a in call.args]
    arg_dims = [axis if _batched(a, axis, size) else None for a in call.args]
    kwargs = {k: v[samples] if _batched(v, 0, size) else v for k, v in call.kwargs.items()}
    kw_dims = {k: 0 if _batched(v, 0, size) else None for k, v in call.kwargs.items()}

    def one_input(args_n, kwargs_n, g_n):
        def output(p):
            batched = [a if d is None else a.unsqueeze(d) for a, d in zip(args_n, arg_dims)]
            kw = {k: v if kw_dims[k] is None else v.unsqueeze(0) for k, v in kwargs_n.items()}
            out = functional_call(module, p, tuple(batched), kw)
            return first_tensor(out).select(axis, 0)

        _, pull_back = vjp(output, params)
        return torch.vmap(pull_back)(g_n)[0]

    per_input = torch.vmap(one_input, in_dims=(arg_dims, kw_dims, 1))(args, kwargs, grad_out)
    return {n: value.transpose(0, 1) for n, value in per_input.items()}


def _batched(value, axis: int, size: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > axis and value.shape[axis] == size


def _slice_at(axis: int, samples: slice) -> tuple:
    return (slice(None),) * axis + (samples,)


_GENERIC_AFFINE = LayerRule(generic_grads, affine=True)
RULES: Dict[type, LayerRule] = {
    nn.Linear: LayerRule(_linear_grads, affine=True, rank_one=True),
    nn.Embedding: LayerRule(_embedding_grads, affine=True),
    nn.LayerNorm: _GENERIC_AFFINE,
    nn.GroupNorm: _GENERIC_AFFINE,
    nn.BatchNorm1d: _GENERIC_AFFINE,
    nn.BatchNorm2d: _GENERIC_AFFINE,
    nn.BatchNorm3d: _GENERIC_AFFINE,
    nn.ConvTranspose1d: _GENERIC_AFFINE,
    nn.ConvTranspose2d: _GENERIC_AFFINE,
    nn.ConvTranspose3d: _GENERIC_AFFINE,
    nn.EmbeddingBag: _GENERIC_AFFINE,
}
if hasattr(nn, "RMSNorm"):
    RULES[nn.RMSNorm] = _GENERIC_AFFINE
_CONV_RULE = LayerRule(_conv_grads, affine=True)
_GENERIC = LayerRule(generic_grads, affine=False)


def rule_for(module: nn.Module, names: Sequence[str]) -> LayerRule:
    """The rule for a module, given the parameter names it is responsible for."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        plain = module.groups == 1 and module.padding_mode == "zeros"
        return _CONV_RULE if plain and not isinstance(module.padding, str) else _GENERIC_AFFINE
    rule = RULES.get(type(module))
    if rule is None or not set(names) <= {n for n, _ in module.named_parameters(recurse=False)}:
        return _GENERIC
    return rule


def random_inside(module: nn.Module) -> Optional[str]:
    """Why the generic rule cannot replay ``module``'s forward, or ``None``."""
    if isinstance(module, nn.MultiheadAttention) and module.training and module.dropout > 0:
        return f"its attention dropout ({module.dropout}) is active in training mode"
    for path, sub in module.named_modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0:
            return f"its dropout '{path}' is active in training mode"
    return None
