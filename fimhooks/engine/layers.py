"""One declaration per layer type: how each path of fimhooks handles it.

A ``LayerSpec`` says, for one ``nn.Module`` type:

* ``chain``: its rule on the chain path (BackPACK's derivatives, ``chain``); layers
  without one send a forward pass to the general path;
* ``grads``: its per-input rule on the general path. It maps a recorded call
  (``recording.Call``) and the vectors backpropagated to its output, ``grad_out
  [D, n, *out]`` (the batch axis moved next to ``D``) for the inputs ``samples``, to
  per-input gradients ``{local parameter name: [D, n, *param.shape]}``. Without one,
  ``generic_grads`` replays the module on one input at a time with ``torch.func``
  (exact, bounded memory, slower);
* ``any_batch_axis``: the per-input rule acts on trailing axes only, so the batch may be
  any leading axis (Linear, Embedding, LayerNorm); other rules need it first;
* ``affine``: its output is affine in each of its parameters, so Î₂ of the layer needs no
  curvature of the layer itself;
* ``rank_one``: per-input weight Jacobians are outer products on ``[N, in]`` inputs;
* ``kfac``: it has Kronecker factors (``FisherPreconditioner(structure="kfac")``);
* ``chain_unsupported``, ``grads_unsupported``: the options of a module that the chain
  rule, or the per-input rule, does not implement (a reason, or ``None``), such as a
  convolution's ``padding_mode``; such a module takes the general path, or the generic
  rule.

A declaration covers a module only where it is proven to apply: the module's type is the
declared one, or a subclass that overrides none of the methods its forward pass runs
(``forward``, a convolution's ``_conv_forward``), and is not parametrized
(``torch.nn.utils.parametrize``: its parameters are then the parametrization's). Any
other module (timm's norm-act layers, weight-standardised convolutions, ...) takes the
generic rule, never its parent's. Whether a module normalises with the batch's statistics
(``batchnorm.normalises_with_batch``) is read from its class, subclasses included:
refusing is safe.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from backpack.core.derivatives.batchnorm_nd import BatchNormNdDerivatives
from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.conv3d import Conv3DDerivatives
from backpack.core.derivatives.conv_transpose1d import ConvTranspose1DDerivatives
from backpack.core.derivatives.conv_transpose2d import ConvTranspose2DDerivatives
from backpack.core.derivatives.conv_transpose3d import ConvTranspose3DDerivatives
from backpack.core.derivatives.dropout import DropoutDerivatives
from backpack.core.derivatives.elu import ELUDerivatives
from backpack.core.derivatives.flatten import FlattenDerivatives
from backpack.core.derivatives.leakyrelu import LeakyReLUDerivatives
from backpack.core.derivatives.linear import LinearDerivatives
from backpack.core.derivatives.logsigmoid import LogSigmoidDerivatives
from backpack.core.derivatives.maxpool1d import MaxPool1DDerivatives
from backpack.core.derivatives.maxpool2d import MaxPool2DDerivatives
from backpack.core.derivatives.maxpool3d import MaxPool3DDerivatives
from backpack.core.derivatives.relu import ReLUDerivatives
from backpack.core.derivatives.selu import SELUDerivatives
from backpack.core.derivatives.sigmoid import SigmoidDerivatives
from backpack.core.derivatives.tanh import TanhDerivatives
from backpack.core.derivatives.zeropad2d import ZeroPad2dDerivatives
from torch import Tensor, nn
from torch.func import functional_call, vjp
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves, tree_map

from fimhooks.engine import jacobians
from fimhooks.engine.chain import Elementwise, LinearOpDerivatives, Parameterized, PassThrough
from fimhooks.engine.recording import first_tensor

Grads = Dict[str, Tensor]


@dataclass(frozen=True)
class LayerSpec:
    """How fimhooks handles one layer type (see the module docstring)."""

    chain: Optional[PassThrough] = None
    grads: Optional[Callable] = None
    any_batch_axis: bool = False
    affine: bool = False
    rank_one: bool = False
    kfac: bool = False
    chain_unsupported: Optional[Callable[[nn.Module], Optional[str]]] = None
    grads_unsupported: Optional[Callable[[nn.Module], Optional[str]]] = None

    def chain_rule(self, module: nn.Module) -> Optional[PassThrough]:
        """The chain rule where it implements ``module``'s options, else ``None``."""
        if self.chain is None or (self.chain_unsupported and self.chain_unsupported(module)):
            return None
        return self.chain


def _linear_grads(call, names, grad_out: Tensor, samples: slice) -> Grads:
    out = {}
    if "weight" in names:
        out["weight"] = jacobians.linear_weight(grad_out, call.first_input(samples))
    if "bias" in names:
        out["bias"] = grad_out.reshape(*grad_out.shape[:2], -1, grad_out.shape[-1]).sum(2)
    return out


def _transposed_linear_grads(call, names, grad_out: Tensor, samples: slice) -> Grads:
    """Hugging Face's ``Conv1D``: ``y = x @ weight + bias`` with ``weight [in, out]``."""
    grads = _linear_grads(call, names, grad_out, samples)
    if "weight" in grads:
        grads["weight"] = grads["weight"].transpose(-1, -2)
    return grads


def _embedding_grads(call, names, grad_out: Tensor, samples: slice) -> Grads:
    module = call.module
    if module.scale_grad_by_freq:
        raise ValueError(
            f"Embedding '{call.path}' has scale_grad_by_freq=True: its gradient depends on "
            "the whole batch, so per-input gradients are undefined."
        )
    weight = jacobians.embedding_weight(grad_out, call.first_input(samples), module.num_embeddings)
    if module.padding_idx is not None:  # torch leaves that row without gradient
        weight[:, :, module.padding_idx] = 0
    return {"weight": weight}


def _conv_grads(call, names, grad_out: Tensor, samples: slice) -> Grads:
    module = call.module
    out = {}
    if "weight" in names:
        out["weight"] = jacobians.conv_weight(grad_out, call.first_input(samples), module)
    if "bias" in names:
        out["bias"] = grad_out.flatten(3).sum(3)
    return out


def _norm_grads(call, names, grad_out: Tensor, samples: slice) -> Grads:
    """Normalisation layers: ``y = x̂ ⊙ weight + bias`` with ``x̂`` from the input.

    BatchNorm normalises with its running statistics, or with the batch's held constant.
    """
    module, x = call.module, call.first_input(samples)
    if isinstance(module, nn.GroupNorm):
        normalized = nn.functional.group_norm(x, module.num_groups, eps=module.eps)
        start, dims = 0, 1  # channels
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        mean, var = call.statistics or (module.running_mean, module.running_var)
        normalized = nn.functional.batch_norm(x, mean, var, training=False, eps=module.eps)
        start, dims = 0, 1
    else:
        shape = module.normalized_shape
        normalize = nn.functional.layer_norm
        if not isinstance(module, nn.LayerNorm):
            normalize = nn.functional.rms_norm
        normalized = normalize(x, shape, eps=module.eps)
        start, dims = x.dim() - 1 - len(shape), len(shape)
    weight, bias = jacobians.scale_and_shift(grad_out, normalized, start, dims)
    return {"weight": weight, "bias": bias}


def generic_grads(call, names: Sequence[str], grad_out, samples: slice) -> Grads:
    """Any module: ``torch.func`` vector-Jacobian products on one input at a time.

    ``grad_out`` is a tuple for a call with further output tensors (``Call.others``).

    Positional tensor arguments are batched along the call's input axis (``Call.input_dim``)
    where they have the batch size there; keyword tensors along their first axis.
    """
    module = call.module
    params = {n: p.detach() for n, p in module.named_parameters() if n in names}
    axis, size = call.batch_dim, call.batch_size

    def dims(values, at):  # the batch axis of each tensor in a (nested) argument, or None
        return tree_map(lambda v: at if _batched(v, at, size) else None, values)

    def rows(values, at):
        return tree_map(lambda v: v[_slice_at(at, samples)] if _batched(v, at, size) else v, values)

    kwargs = tree_map(_without_history, call.kwargs)
    arg_dims, kw_dims = list(dims(call.args, call.input_dim)), dims(kwargs, 0)
    args, kwargs = list(rows(call.args, call.input_dim)), rows(kwargs, 0)

    def one_input(args_n, kwargs_n, g_n):
        def output(p):
            batched = tree_map(_unsqueezed, args_n, arg_dims, is_leaf=_is_none)
            kw = tree_map(_unsqueezed, kwargs_n, kw_dims, is_leaf=_is_none)
            out = functional_call(module, p, tuple(batched), kw)
            if not call.others:
                return first_tensor(out).select(axis, 0)
            tensors = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
            rest = tuple(tensors[o.index].select(call.other_axis(o), 0) for o in call.others)
            return (tensors[0].select(axis, 0),) + rest

        _, pull_back = vjp(output, params)
        try:
            return torch.vmap(pull_back)(g_n)[0]
        except RuntimeError:  # no batching rule for its backward: one direction at a time
            count = tree_leaves(g_n)[0].shape[0]
            return _stacked([pull_back(tree_map(_index(d), g_n))[0] for d in range(count)])

    with warnings.catch_warnings():  # torch's note that an op is batched by a loop
        warnings.filterwarnings("ignore", message="There is a performance drop because")
        try:
            per_input = torch.vmap(one_input, in_dims=(arg_dims, kw_dims, 1))(
                args, kwargs, grad_out
            )
        except (RuntimeError, ValueError):  # no batching rule (recurrent layers): a loop
            try:
                per_input = _stacked(
                    [
                        one_input(
                            tree_map(_selected(n), args, arg_dims, is_leaf=_is_none),
                            tree_map(_selected(n), kwargs, kw_dims, is_leaf=_is_none),
                            tree_map(_index(slice(None), n), grad_out),
                        )
                        for n in range(tree_leaves(grad_out)[0].shape[1])
                    ]
                )
            except (RuntimeError, ValueError) as error:
                raise RuntimeError(
                    f"fimhooks: layer '{call.path}' ({type(module).__name__}) cannot be "
                    f"replayed on one input at a time ({error}). Per-input gradients need "
                    "every input's output to depend on that input only: batch statistics "
                    "computed inside the forward pass (F.batch_norm with training=True) mix "
                    "the inputs."
                ) from error
    return {n: value.transpose(0, 1) for n, value in per_input.items()}


def _stacked(grads: List[Grads]) -> Grads:
    """``[{name: tensor}]`` to ``{name: stacked tensor}`` (a new leading axis)."""
    return {name: torch.stack([g[name] for g in grads]) for name in grads[0]}


def _unsqueezed(value, dim: Optional[int]):
    return value if dim is None else value.unsqueeze(dim)


def _selected(n: int) -> Callable:
    return lambda value, dim: value if dim is None else value.select(dim, n)


def _index(*index) -> Callable:
    return lambda value: value[index]


def _is_none(value) -> bool:
    return value is None


def _batched(value, axis: int, size: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > axis and value.shape[axis] == size


def _without_history(value):
    return value.detach() if isinstance(value, Tensor) else value


def _slice_at(axis: int, samples: slice) -> tuple:
    return (slice(None),) * axis + (samples,)


def _activation(derivatives) -> LayerSpec:
    return LayerSpec(chain=Elementwise(derivatives()))


def _linear_op(derivatives) -> LayerSpec:
    return LayerSpec(chain=PassThrough(derivatives()))


def _weighted(derivatives, grads=None, **flags) -> LayerSpec:
    return LayerSpec(chain=Parameterized(derivatives()), grads=grads, affine=True, **flags)


def _conv_options(module) -> Optional[str]:
    """BackPACK's convolutions pad with zeros, by explicit amounts."""
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    if isinstance(module.padding, str):
        return f"padding={module.padding!r}"
    if any(getattr(module, "output_padding", (0,))):
        return f"output_padding={module.output_padding}"
    return None


def _batchnorm_options(module) -> Optional[str]:
    return None if module.affine else "affine=False"


def _flatten_options(module) -> Optional[str]:
    return None if module.start_dim >= 1 else f"start_dim={module.start_dim}"  # keeps the batch


_AFFINE = LayerSpec(affine=True)
_batchnorm = _weighted(BatchNormNdDerivatives, _norm_grads, chain_unsupported=_batchnorm_options)
_CONV_OPTIONS = {
    "chain_unsupported": _conv_options,
    "grads_unsupported": jacobians.unfold_unsupported,
}
LAYERS: Dict[type, LayerSpec] = {
    nn.Dropout: _activation(DropoutDerivatives),
    nn.ReLU: _activation(ReLUDerivatives),
    nn.LeakyReLU: _activation(LeakyReLUDerivatives),
    nn.Tanh: _activation(TanhDerivatives),
    nn.Sigmoid: _activation(SigmoidDerivatives),
    nn.ELU: _activation(ELUDerivatives),
    nn.SELU: _activation(SELUDerivatives),
    nn.LogSigmoid: _activation(LogSigmoidDerivatives),
    nn.MaxPool1d: _linear_op(MaxPool1DDerivatives),
    nn.MaxPool2d: _linear_op(MaxPool2DDerivatives),
    nn.MaxPool3d: _linear_op(MaxPool3DDerivatives),
    nn.AvgPool1d: _linear_op(LinearOpDerivatives),
    nn.AvgPool2d: _linear_op(LinearOpDerivatives),
    nn.AvgPool3d: _linear_op(LinearOpDerivatives),
    nn.AdaptiveAvgPool1d: _linear_op(LinearOpDerivatives),
    nn.AdaptiveAvgPool2d: _linear_op(LinearOpDerivatives),
    nn.AdaptiveAvgPool3d: _linear_op(LinearOpDerivatives),
    nn.Identity: _linear_op(LinearOpDerivatives),
    nn.ZeroPad2d: _linear_op(ZeroPad2dDerivatives),
    nn.Flatten: LayerSpec(PassThrough(FlattenDerivatives()), chain_unsupported=_flatten_options),
    nn.Linear: _weighted(
        LinearDerivatives, _linear_grads, any_batch_axis=True, rank_one=True, kfac=True
    ),
    nn.Conv1d: _weighted(Conv1DDerivatives, _conv_grads, **_CONV_OPTIONS),
    nn.Conv2d: _weighted(Conv2DDerivatives, _conv_grads, **_CONV_OPTIONS),
    nn.Conv3d: _weighted(Conv3DDerivatives, _conv_grads, **_CONV_OPTIONS),
    nn.ConvTranspose1d: _weighted(ConvTranspose1DDerivatives, **_CONV_OPTIONS),
    nn.ConvTranspose2d: _weighted(ConvTranspose2DDerivatives, **_CONV_OPTIONS),
    nn.ConvTranspose3d: _weighted(ConvTranspose3DDerivatives, **_CONV_OPTIONS),
    nn.BatchNorm1d: _batchnorm,
    nn.BatchNorm2d: _batchnorm,
    nn.BatchNorm3d: _batchnorm,
    nn.Embedding: LayerSpec(grads=_embedding_grads, any_batch_axis=True, affine=True),
    nn.EmbeddingBag: _AFFINE,
    nn.LayerNorm: LayerSpec(grads=_norm_grads, any_batch_axis=True, affine=True),
    nn.GroupNorm: LayerSpec(grads=_norm_grads, affine=True),
}
if hasattr(nn, "RMSNorm"):
    LAYERS[nn.RMSNorm] = LayerSpec(grads=_norm_grads, any_batch_axis=True, affine=True)
#: Layers of other libraries, by class name (so that fimhooks need not import them).
LAYERS_BY_NAME: Dict[str, LayerSpec] = {
    "Conv1D": LayerSpec(
        grads=_transposed_linear_grads, any_batch_axis=True, affine=True
    ),  # transformers' GPT-2
}
_UNDECLARED = LayerSpec()


#: Methods a declared layer's forward pass runs: a subclass overriding one is not covered.
_FORWARD_METHODS = ("forward", "_conv_forward")


def spec_for(module: nn.Module) -> LayerSpec:
    """The declaration that covers ``module`` (see the module docstring), or an empty one."""
    kind = type(module)
    declared = next((c for c in kind.__mro__ if c in LAYERS), None)
    if declared is None:
        if kind.__module__.startswith("transformers.") and kind.__name__ in LAYERS_BY_NAME:
            return LAYERS_BY_NAME[kind.__name__]
        return _UNDECLARED
    same_forward = all(
        getattr(kind, name, None) is getattr(declared, name, None) for name in _FORWARD_METHODS
    )
    if not same_forward or parametrize.is_parametrized(module):
        return _UNDECLARED
    return LAYERS[declared]


def per_input_rule(call, names: Sequence[str]) -> Callable:
    """The general path's rule for the parameters ``names`` of a call's module.

    A module's own rule covers the parameters it declares; parameters of submodules used
    inside its forward (``nn.MultiheadAttention.out_proj``) take the generic rule, and so
    does a call whose own rule failed a verification (``Call.generic``).
    """
    module = call.module
    own = {n for n, _ in module.named_parameters(recurse=False)}
    spec = spec_for(module)
    if call.generic or call.others or spec.grads is None or not set(names) <= own:
        return generic_grads
    if call.batch_dim != 0 and not spec.any_batch_axis:
        return generic_grads
    if spec.grads_unsupported is not None and spec.grads_unsupported(module):
        return generic_grads
    return spec.grads


def affine_in(module: nn.Module, names: Sequence[str]) -> bool:
    """Whether ``module``'s output is affine in each of the parameters ``names``."""
    own = {n for n, _ in module.named_parameters(recurse=False)}
    return spec_for(module).affine and set(names) <= own


def random_inside(module: nn.Module) -> Optional[str]:
    """Why the generic rule cannot replay ``module``'s forward, or ``None``."""
    if isinstance(module, nn.MultiheadAttention) and module.training and module.dropout > 0:
        return f"its attention dropout ({module.dropout}) is active in training mode"
    for path, sub in module.named_modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0:
            return f"its dropout '{path}' is active in training mode"
    return None
