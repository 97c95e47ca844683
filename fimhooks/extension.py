"""BackPACK extension that backpropagates label directions and reduces them per module.

One backward pass carries, alongside the gradient, a ``_Backpropagated`` quantity:

* ``first``: ``[K, N, *shape]`` the directions of ``likelihoods`` pulled back to the
  current tensor (``Jᵀ V``), from which exact, Î₁ and v₁ follow.
* ``sources``: for Î₂ only, one ``curvature.CurvatureSource`` for every activation
  ``z ↦ σ(z)`` met so far with ``σ'' ≠ 0``; then ``∂²(V_kᵀh)/∂θ_i²`` is the sum over
  sources of ``Σ_s c_ks (∂z_s/∂θ_i)²``.

Each parameter's quantities are reduced to batch sums (``diagonal_terms``) inside its
module's hook, so per-input tensors exist for one module at a time only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

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
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.module_extension import ModuleExtension
from backpack.utils.conv import unfold_by_conv
from torch import Tensor, nn

from fimhooks.curvature import CurvatureSource
from fimhooks.diagonal_terms import BatchSums, batch_sums, per_input_terms, rank_one_batch_sums
from fimhooks.likelihoods import Likelihood
from fimhooks.observations import LabelDraw

#: Savefield on parameters; the monitor removes it inside the same module hook.
SAVEFIELD = "_fimhooks_sums"

#: Second-order Jacobians handled per chunk at a parameter (bounds peak memory).
_CHUNK = 64
#: Entries of a per-input tensor of a parameter's size formed at once (generic path).
_ELEMENTS = 2**22


@dataclass
class _Backpropagated:
    first: Tensor
    sources: Tuple[CurvatureSource, ...] = ()

    def shaped_like(self, output: Tensor) -> "_Backpropagated":
        """The same quantity for a view of ``output`` (``squeeze``, ``view`` between layers)."""
        first = self.first.reshape(self.first.shape[0], *output.shape)
        return _Backpropagated(first, tuple(s.shaped_like(output) for s in self.sources))


@dataclass
class _LabelContext:
    """What the loss module hands to the parameter reductions of one backward pass."""

    weights: Optional[Tensor]  # [N, K], None when only Î₁ is collected
    fourth_weights: Optional[Tensor]  # [N, K]
    coefficients: Optional[Tensor]  # [N, M, K]
    num_inputs: int
    num_outputs: int


class FisherExtension(BackpropExtension):
    """Backpropagates directions (and Î₂ residual Jacobians) for the diagonal terms.

    Args:
        likelihood: The model's likelihood.
        terms: Which of ``exact, v1, v2, I1, I2`` to reduce per parameter.
        mc_samples: Label draws per input (``M``).
        generator: Callable ``device -> torch.Generator`` for the label draws.
    """

    def __init__(self, likelihood: Likelihood, terms: FrozenSet[str], mc_samples: int, generator):
        super().__init__(savefield=SAVEFIELD, module_exts=_EXTENSIONS)
        self.likelihood = likelihood
        self.terms = terms
        self.exact_pass = bool(terms & {"exact", "I2", "v1", "v2"})
        self.second_order = "I2" in terms
        self.mc_samples = mc_samples
        self.generator = generator
        self.context: Optional[_LabelContext] = None
        self.kronecker = False  # also reduce Kronecker factors of Linear layers
        self._output_terms_of, self._output_terms = None, None

    def expects_backpropagation_quantities(self) -> bool:  # noqa: D102
        return True

    def reset(self) -> None:
        """Forget quantities of an earlier backward pass (keys are data pointers)."""
        self.saved_quantities._saved_quantities.clear()
        self.context = None
        self._output_terms_of, self._output_terms = None, None

    def has_quantity_for(self, tensor: Tensor) -> bool:
        """Whether a quantity was propagated back to ``tensor``."""
        return tensor.data_ptr() in self.saved_quantities._saved_quantities

    def start(self, draw: LabelDraw) -> None:
        """Take the labels of a step whose output has one position per input."""

        def first_position(x):
            return None if x is None else x[:, 0]

        self.context = _LabelContext(
            weights=first_position(draw.weights),
            fourth_weights=first_position(draw.fourth_weights),
            coefficients=first_position(draw.coefficients),
            num_inputs=draw.num_inputs,
            num_outputs=draw.directions.shape[-1],
        )

    def save_start(self, output: Tensor, directions: Tensor) -> None:
        """Backpropagate ``directions [K, *output.shape]`` from the model output."""
        self.saved_quantities._saved_quantities[output.data_ptr()] = _Backpropagated(directions)

    def layer_output_terms(self, module: nn.Module, bp: "_Backpropagated") -> Dict[str, Tensor]:
        """Per-input terms of a Linear layer's output, computed once for weight and bias."""
        if self._output_terms_of is not module:
            self._output_terms = self.output_terms(bp.first, _output_second_derivatives(bp))
            self._output_terms_of = module
        return self._output_terms

    def kronecker_sums(self, U: Tensor, module: nn.Module) -> Dict[str, Tensor]:
        """Batch sums of the Kronecker factors of a Linear layer (see ``preconditioning``).

        ``kron_A``: ``Σ_n x̃ x̃ᵀ``; ``kron_G_sampled``: ``Σ_n mean_m s sᵀ`` for the sampled
        scores ``s`` (BackPACK's KFAC); ``kron_G_exact``: ``Σ_n E_y[s sᵀ]`` (its KFLR).
        """
        ctx = self.context
        x = module.input0.detach()
        if module.bias is not None:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        sums = {"kron_A": x.T @ x}
        if ctx.weights is None:  # the directions are the sampled residuals
            sums["kron_G_sampled"] = torch.einsum("kno,knp->op", U, U) / U.shape[0]
            return sums
        scores = torch.einsum("nmk,kno->mno", ctx.coefficients, U)
        sums["kron_G_sampled"] = torch.einsum("mno,mnp->op", scores, scores) / scores.shape[0]
        sums["kron_G_exact"] = torch.einsum("nk,kno,knp->op", ctx.weights, U, U)
        return sums

    def output_terms(
        self, U: Tensor, W: Optional[Tensor], samples=slice(None)
    ) -> Dict[str, Tensor]:
        """Per-input terms from ``U`` and ``W`` ``[K, N, *P]`` of the inputs ``samples``."""
        ctx = self.context
        return per_input_terms(
            U,
            W,
            None if ctx.weights is None else ctx.weights[samples],
            None if ctx.fourth_weights is None else ctx.fourth_weights[samples],
            self.likelihood.kappa,
            None if ctx.coefficients is None else ctx.coefficients[samples],
            self.terms,
        )


class _PassThrough(ModuleExtension):
    """Multiplies all backpropagated matrices by the module's transposed Jacobian."""

    def __init__(self, derivatives, params=None):
        self.derivatives = derivatives
        super().__init__(params=params)

    def __call__(self, ext, module, g_inp, g_out):  # noqa: D102
        # the next layer may have received a view of this output: restore its shape
        saved = ext.saved_quantities._saved_quantities
        key = module.output.data_ptr()
        if key in saved:
            saved[key] = saved[key].shaped_like(module.output)
        super().__call__(ext, module, g_inp, g_out)

    def backpropagate(self, ext, module, g_inp, g_out, bp: _Backpropagated):  # noqa: D102
        def jac_t(mat: Tensor) -> Tensor:
            return self.derivatives.jac_t_mat_prod(module, g_inp, g_out, mat)

        sources = tuple(self.pull_back(s, module, g_inp, g_out, jac_t) for s in bp.sources)
        return _Backpropagated(jac_t(bp.first), sources)

    def pull_back(self, source: CurvatureSource, module, g_inp, g_out, jac_t):
        """A curvature source seen from the module's input."""
        return source.through_module(jac_t, module.output.shape)


class _LinearOpDerivatives:
    """Transposed Jacobian of a parameter-free linear module, by ``torch.func``.

    Used for average pooling, whose BackPACK derivatives build a float32 transposed
    convolution (failing for float64 models), for adaptive pooling and ``Identity``.
    """

    @staticmethod
    def jac_t_mat_prod(module, g_inp, g_out, mat: Tensor) -> Tensor:
        _, vjp = torch.func.vjp(module.forward, module.input0.detach())
        return torch.vmap(vjp)(mat)[0]


class _Elementwise(_PassThrough):
    """Element-wise map (activation, dropout): adds a curvature source where ``σ'' ≠ 0``."""

    def backpropagate(self, ext, module, g_inp, g_out, bp: _Backpropagated):  # noqa: D102
        out = super().backpropagate(ext, module, g_inp, g_out, bp)
        if not ext.second_order or self.derivatives.hessian_is_zero(module):
            return out
        d2f = self.derivatives.d2f(module, g_inp, g_out)
        coefficients = (d2f.unsqueeze(0) * bp.first).flatten(2)
        return _Backpropagated(out.first, out.sources + (CurvatureSource(coefficients),))

    def pull_back(self, source, module, g_inp, g_out, jac_t):  # noqa: D102
        return source.through_elementwise(self.derivatives.df(module, g_inp, g_out), jac_t)


class _Parameterized(_PassThrough):
    """Module with parameters: reduces per-input terms to batch sums per parameter."""

    def __init__(self, derivatives, params=("weight", "bias")):
        for name in params:
            setattr(self, name, self._make_reduction(name))
        super().__init__(derivatives, params=list(params))

    def _make_reduction(self, name: str):
        def reduce(ext, module, g_inp, g_out, bp: _Backpropagated) -> BatchSums:
            if _is_rank_one(module):
                terms = ext.layer_output_terms(module, bp)
                if name == "bias":
                    return batch_sums(terms)
                sums = rank_one_batch_sums(terms, module.input0.detach())
                if ext.kronecker:
                    sums.sums.update(ext.kronecker_sums(bp.first, module))
                return sums
            return self.generic_sums(ext, module, g_inp, g_out, bp, name)

        return reduce

    def pull_back(self, source, module, g_inp, g_out, jac_t):  # noqa: D102
        if _is_rank_one(module):
            return source.through_linear(module.weight, jac_t, module.output.shape)
        return super().pull_back(source, module, g_inp, g_out, jac_t)

    def generic_sums(self, ext, module, g_inp, g_out, bp, name) -> BatchSums:
        """Batch sums from per-input Jacobian products, a chunk of inputs at a time.

        Any layer; per-input tensors of the parameter's size exist for ``_ELEMENTS``
        entries at most, so memory does not grow with the batch.
        """
        directions, n = bp.first.shape[0], bp.first.shape[1]
        step = max(1, _ELEMENTS // (directions * getattr(module, name).numel()))
        total = None
        for start in range(0, n, step):
            samples = slice(start, min(n, start + step))
            indices = None if step >= n else list(range(n)[samples])  # BackPACK's form
            mat = bp.first[:, samples]
            U = self._per_input_mjp(name, module, g_inp, g_out, mat, samples, indices)
            W = torch.zeros_like(U) if bp.sources else None
            for source in bp.sources:
                jacobians = source.dense(module.output.shape, samples)
                coefficients = source.coefficients[:, samples]
                for first in range(0, jacobians.shape[0], _CHUNK):
                    rows = slice(first, first + _CHUNK)
                    J = self._per_input_mjp(
                        name, module, g_inp, g_out, jacobians[rows], samples, indices
                    )
                    W += torch.einsum("kns,sn...->kn...", coefficients[:, :, rows], J * J)
            sums = batch_sums(ext.output_terms(U, W, samples))
            total = sums if total is None else total.add(sums)
        return total

    def _per_input_mjp(self, name, module, g_inp, g_out, mat, samples, indices) -> Tensor:
        """``[V, n, *param.shape]`` per-input transposed Jacobian products of ``mat``."""
        if name == "weight" and _unfoldable(module):
            return _unfolded_weight_mjp(module, mat, samples)
        return self.derivatives.param_mjp(
            name, module, g_inp, g_out, mat, sum_batch=False, subsampling=indices
        )


def _unfoldable(module: nn.Module) -> bool:
    """A convolution whose per-input weight products are a batched matrix product."""
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _unfolded_weight_mjp(module: nn.Module, mat: Tensor, samples: slice) -> Tensor:
    """Per-input ``Jᵀ mat`` of a convolution's weight from its unfolded input.

    Faster than BackPACK's grouped-convolution route for many vectors ``V``.

    Returns:
        ``[V, n, *weight.shape]``.
    """
    patches = unfold_by_conv(module.input0[samples].detach(), module)  # [n, in·k, positions]
    products = torch.einsum("vnop,nip->vnoi", mat.flatten(3), patches)
    return products.reshape(*mat.shape[:2], *module.weight.shape)


def _is_rank_one(module: nn.Module) -> bool:
    """Linear layer on ``[N, in]`` inputs: per-input weight Jacobians are outer products."""
    return isinstance(module, nn.Linear) and module.input0.dim() == 2


def _output_second_derivatives(bp: _Backpropagated) -> Optional[Tensor]:
    """``[K, N, out]`` second derivatives with respect to a Linear layer's output."""
    if not bp.sources:
        return None
    return sum(source.squared_contraction() for source in bp.sources)


_ELEMENTWISE = {
    nn.Dropout: DropoutDerivatives,
    nn.ReLU: ReLUDerivatives,
    nn.LeakyReLU: LeakyReLUDerivatives,
    nn.Tanh: TanhDerivatives,
    nn.Sigmoid: SigmoidDerivatives,
    nn.ELU: ELUDerivatives,
    nn.SELU: SELUDerivatives,
    nn.LogSigmoid: LogSigmoidDerivatives,
}
_LINEAR_OPS = {
    nn.MaxPool1d: MaxPool1DDerivatives,
    nn.MaxPool2d: MaxPool2DDerivatives,
    nn.MaxPool3d: MaxPool3DDerivatives,
    nn.AvgPool1d: _LinearOpDerivatives,
    nn.AvgPool2d: _LinearOpDerivatives,
    nn.AvgPool3d: _LinearOpDerivatives,
    nn.AdaptiveAvgPool1d: _LinearOpDerivatives,
    nn.AdaptiveAvgPool2d: _LinearOpDerivatives,
    nn.AdaptiveAvgPool3d: _LinearOpDerivatives,
    nn.Identity: _LinearOpDerivatives,
    nn.ZeroPad2d: ZeroPad2dDerivatives,
    nn.Flatten: FlattenDerivatives,
}
_PARAMETERIZED = {
    nn.Linear: LinearDerivatives,
    nn.Conv1d: Conv1DDerivatives,
    nn.Conv2d: Conv2DDerivatives,
    nn.Conv3d: Conv3DDerivatives,
    nn.ConvTranspose1d: ConvTranspose1DDerivatives,
    nn.ConvTranspose2d: ConvTranspose2DDerivatives,
    nn.ConvTranspose3d: ConvTranspose3DDerivatives,
    nn.BatchNorm1d: BatchNormNdDerivatives,
    nn.BatchNorm2d: BatchNormNdDerivatives,
    nn.BatchNorm3d: BatchNormNdDerivatives,
}
#: Module types fimhooks can attach to (leaves of the model).
SUPPORTED_MODULES = tuple(_ELEMENTWISE) + tuple(_LINEAR_OPS) + tuple(_PARAMETERIZED)


def _module_extensions() -> Dict[type, ModuleExtension]:
    exts = {}
    exts.update({cls: _Elementwise(d()) for cls, d in _ELEMENTWISE.items()})
    exts.update({cls: _PassThrough(d()) for cls, d in _LINEAR_OPS.items()})
    exts.update({cls: _Parameterized(d()) for cls, d in _PARAMETERIZED.items()})
    return exts


_EXTENSIONS = _module_extensions()


def module_extension(module: nn.Module) -> ModuleExtension:
    """The chain path's rule for a supported layer."""
    return next(_EXTENSIONS[c] for c in type(module).__mro__ if c in _EXTENSIONS)
