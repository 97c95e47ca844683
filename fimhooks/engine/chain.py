"""The chain path: label directions pulled back layer by layer with BackPACK's derivatives.

For a forward pass that is a chain of supported layers (``recording.chain_of``), the
directions are pulled back from the model output through each layer's transposed
Jacobian (BackPACK's ``core.derivatives``), carrying a ``Backpropagated`` quantity:

* ``first``: ``[K, N, *shape]`` the directions pulled back to the current tensor
  (``Jᵀ V``), from which exact, Î₁ and v₁ follow.
* ``sources``: for Î₂ only, one ``curvature.CurvatureSource`` for every activation
  ``z ↦ σ(z)`` met so far with ``σ'' ≠ 0``; then ``∂²(V_kᵀh)/∂θ_i²`` is the sum over
  sources of ``Σ_s c_ks (∂z_s/∂θ_i)²``.

A source is carried in its structured form (``curvature``) as long as it has one. Where it
would need its Jacobian per input (below a second Linear layer, or any other layer), it
is *spilled*: its Jacobian is pulled down the rest of the chain a chunk of its entries at
a time, and each chunk's second derivatives are added at every parameterized layer below
(``ChainPass.curvature``). So no tensor of ``width²`` entries per input is held.

Each parameter's quantities are reduced to batch sums (``diagonal_terms``) at its layer,
so per-input tensors exist for one layer at a time only, and the whole pass runs on a
chunk of inputs at a time: the memory budget (``memory.Budget``) holds at any batch size,
number of classes, width or depth. BackPACK's derivatives read a layer's ``input0`` and
``output``: they are set on the layer for the duration of the pass and removed in
``finally``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fimhooks.engine import jacobians
from fimhooks.engine.curvature import CurvatureSource
from fimhooks.engine.memory import COPIES, Budget
from fimhooks.engine.observations import LabelDraw
from fimhooks.fisher.blocks import block_label_variance, gram
from fimhooks.fisher.diagonal_terms import (
    BatchSums,
    batch_sums,
    per_input_terms,
    rank_one_batch_sums,
)


@dataclass
class Backpropagated:
    """What travels down the chain (see the module docstring)."""

    first: Tensor
    sources: Tuple[CurvatureSource, ...] = ()

    def shaped_like(self, output: Tensor) -> "Backpropagated":
        """The same quantity for a view of ``output`` (``squeeze``, ``view`` between layers)."""
        first = self.first.reshape(self.first.shape[0], *output.shape)
        return Backpropagated(first, self.sources)


@dataclass
class ChainPass:
    """One pass down a chain: the step's labels in, batch sums per parameter out.

    Attributes:
        weights, fourth_weights: ``[N, K]`` (``None`` when only Î₁ is collected: the
            directions are then the sampled residuals).
        coefficients: ``[N, M, K]``.
        kappa: The likelihood's ``κ``.
        terms: Which of ``exact, v1, v2, I1, I2`` to reduce.
        kronecker: Also reduce the Kronecker factors of Linear layers.
        layers: ``(module, rule, whether its input is backpropagated to)``, forward order.
        rows: Entries of a spilled source pulled down the chain at once.
        elements: Entries of a per-input tensor of a parameter's size formed at once.
        curvature: Second derivatives of spilled sources by ``(id(module), name)``:
            ``[K, n, *P]`` of a parameter, or ``[K, n, out]`` at a rank-one layer's output
            (name ``None``).
        factors: ``[N, 5]`` bound factors (``None`` without bounds).
        data_weights: ``[N, K]`` marks the data's direction (``None`` without ``EF``).
        gram_pairing: The likelihood's ``(α, β)`` when block errors are collected
            (``blocks``), else ``None``.
        grams: ``[N, K, K]`` Gram matrices of the current layer's block, summed over its
            parameters.
        results: ``{id(parameter): BatchSums}``.
    """

    weights: Optional[Tensor]
    fourth_weights: Optional[Tensor]
    coefficients: Optional[Tensor]
    kappa: float
    terms: FrozenSet[str]
    kronecker: bool
    layers: List[Tuple[nn.Module, "PassThrough", bool]]
    rows: int
    elements: int
    factors: Optional[Tensor] = None
    data_weights: Optional[Tensor] = None
    gram_pairing: Optional[Tuple[float, float]] = None
    grams: Optional[Tensor] = None
    saved: Dict[int, Backpropagated] = field(default_factory=dict)
    curvature: Dict[object, Tensor] = field(default_factory=dict)
    results: Dict[int, BatchSums] = field(default_factory=dict)
    _output_terms: Optional[tuple] = None

    @property
    def second_order(self) -> bool:
        """Whether Î₂'s curvature sources are carried."""
        return "I2" in self.terms

    def output_terms(self, U: Tensor, W: Optional[Tensor], samples=slice(None)) -> dict:
        """Per-input terms from ``U`` and ``W`` ``[K, N, *P]`` of the inputs ``samples``."""

        def rows(x):
            return None if x is None else x[samples]

        weights, fourth, coefficients = (
            rows(self.weights),
            rows(self.fourth_weights),
            rows(self.coefficients),
        )
        factors, data = rows(self.factors), rows(self.data_weights)
        return per_input_terms(
            U, W, weights, fourth, self.kappa, coefficients, self.terms, factors, data
        )

    def layer_output_terms(self, module: nn.Module, bp: Backpropagated) -> dict:
        """Per-input terms of a Linear layer's output, computed once for weight and bias."""
        if self._output_terms is None or self._output_terms[0] is not module:
            W = _add(_output_second_derivatives(bp), self.curvature.pop((id(module), None), None))
            self._output_terms = (module, self.output_terms(bp.first, W))
        return self._output_terms[1]

    def spill(self, source: CurvatureSource, module: nn.Module) -> None:
        """Pull ``source`` through ``module`` and down the rest of the chain.

        ``rows`` of its entries at a time; each chunk adds its second derivatives at every
        parameterized layer below (``add_curvature``).
        """
        below = [i for i, (m, _, _) in enumerate(self.layers) if m is module][0]
        for start in range(0, source.coefficients.shape[2], self.rows):
            rows = slice(start, start + self.rows)
            coefficients = source.coefficients[:, :, rows]
            jac = source.dense(module.output.shape, rows)
            jac = self.layers[below][1].jac_t(module, jac)
            for layer, rule, backpropagated in reversed(self.layers[:below]):
                jac = jac.reshape(jac.shape[0], *layer.output.shape)
                rule.add_curvature(self, layer, jac, coefficients)
                if not backpropagated:
                    break
                jac = rule.jac_t(layer, jac)

    def add_curvature(self, key, value: Tensor) -> None:
        """Add second derivatives of spilled sources under ``key``."""
        self.curvature[key] = _add(self.curvature.get(key), value)

    def curved_at(self, module: nn.Module) -> bool:
        """Whether spilled sources left second derivatives at ``module``."""
        return any(key[0] == id(module) for key in self.curvature)

    def add_gram(self, grams: Tensor, samples=slice(None)) -> None:
        """Add a parameter's Gram matrices ``[n, K, K]`` of the inputs ``samples``."""
        if self.grams is None:
            n, k = self.weights.shape
            self.grams = grams.new_zeros(n, k, k)
        self.grams[samples] += grams

    def finish_block(self, sums: BatchSums, second_order: bool) -> None:
        """Put the layer's block error terms into one of its parameters' batch sums.

        ``block_v1`` is ``Σ_n E_y‖s_B s_Bᵀ − I_B(x_n)‖²_F`` (``blocks``); ``block_v2``, that
        of Î₂, is zero where nothing above the layer is curved (the block's Hessian
        vanishes) and left out elsewhere: it would need the Hessian block itself.
        """
        v1 = block_label_variance(self.grams, self.weights, self.fourth_weights, self.gram_pairing)
        sums.sums["block_v1"] = v1.sum()
        if "I2" in self.terms and not second_order:
            sums.sums["block_v2"] = torch.zeros_like(sums.sums["block_v1"])
        self.grams = None

    def kronecker_sums(self, U: Tensor, module: nn.Module) -> Dict[str, Tensor]:
        """Batch sums of the Kronecker factors of a Linear layer (see ``preconditioning``).

        ``kron_A``: ``Σ_n x̃ x̃ᵀ``; ``kron_G_sampled``: ``Σ_n mean_m s sᵀ`` for the sampled
        scores ``s`` (BackPACK's KFAC); ``kron_G_exact``: ``Σ_n E_y[s sᵀ]`` (its KFLR).
        """
        x = module.input0.detach()
        if module.bias is not None:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        sums = {"kron_A": x.T @ x}
        if self.data_weights is not None:  # the data's direction is the last
            U = U[:-1]
        if not len(U):  # only the empirical Fisher is collected
            return sums
        if self.weights is None:  # the directions are the sampled residuals
            sums["kron_G_sampled"] = torch.einsum("kno,knp->op", U, U) / U.shape[0]
            return sums
        scores = torch.einsum("nmk,kno->mno", self.coefficients, U)
        sums["kron_G_sampled"] = torch.einsum("mno,mnp->op", scores, scores) / scores.shape[0]
        sums["kron_G_exact"] = torch.einsum("nk,kno,knp->op", self.weights, U, U)
        return sums


def chain_batch_sums(
    layers: Sequence[Tuple[nn.Module, Tensor, Tensor]],
    rules: Sequence["PassThrough"],
    output: Tensor,
    draw: LabelDraw,
    kappa: float,
    terms: FrozenSet[str],
    kronecker: bool,
    budget: Budget,
    rows: Optional[int] = None,
) -> Dict[int, BatchSums]:
    """Batch sums of every parameter of a chain, for one collected step.

    Args:
        layers: ``(module, input, output)`` of each layer, in forward order.
        rules: Each layer's rule (``layers.spec_for(module).chain``).
        output: The model output, (a view of) the last layer's output.
        draw: The step's labels; one position per input.
        kappa: The likelihood's ``κ``.
        terms: The terms to reduce.
        kronecker: Also reduce Kronecker factors of Linear layers.
        budget: Memory for the pass's tensors; inputs are taken a chunk at a time.
        rows: Reduce the first ``rows`` inputs only (default: all).

    Returns:
        ``{id(parameter): BatchSums}``.
    """
    K, N = draw.directions.shape[:2]
    itemsize = output.element_size()
    width = max(t[0].numel() for _, x, y in layers for t in (x, y))
    generic = [m for m, x, _ in layers if not outer_products(m, x)]
    param_width = max((p.numel() for m in generic for p in m.parameters()), default=1)
    curved = (
        sum(y[0].numel() for (m, _, y), rule in zip(layers, rules) if rule.curved(m))
        if "I2" in terms
        else 0
    )
    # per input: the pulled-back directions, structured sources and spilled curvature
    spilled = K * sum(y[0].numel() for _, _, y in layers) if curved else 0
    per_input = COPIES * K * width + K * curved + spilled
    step = budget.count(per_input, itemsize, share=0.5)
    elements = budget.count(COPIES, itemsize, share=0.25)
    results: Dict[int, BatchSums] = {}
    N = N if rows is None else rows
    for start in range(0, N, step):
        samples = slice(start, min(N, start + step))
        n = len(range(N)[samples])
        rows = budget.count(COPIES * n * max(width, param_width), itemsize, share=0.25)
        chain = ChainPass(
            weights=_rows_of(draw.weights, samples),
            fourth_weights=_rows_of(draw.fourth_weights, samples),
            coefficients=_rows_of(draw.coefficients, samples),
            kappa=kappa,
            terms=terms,
            kronecker=kronecker,
            layers=[(m, rule, x.requires_grad) for (m, x, _), rule in zip(layers, rules)],
            rows=rows,
            elements=elements,
            factors=_rows_of(draw.bound_factors, samples),
            data_weights=_rows_of(draw.data_weights, samples),
            gram_pairing=draw.gram_pairing,
        )
        part = _run(chain, layers, output, draw, samples)
        for key, value in part.items():
            results[key] = results[key].add(value) if key in results else value
    return results


def _rows_of(x: Optional[Tensor], samples: slice) -> Optional[Tensor]:
    """``[N, 1, ...]`` per-position tensor: the rows ``samples`` of its one position."""
    return None if x is None else x[samples, 0]


def _run(chain: ChainPass, layers, output: Tensor, draw: LabelDraw, samples: slice) -> dict:
    """One pass down the chain for the inputs ``samples``."""
    directions = draw.directions[:, samples, 0]
    output = output[samples]
    chain.saved[output.data_ptr()] = Backpropagated(
        directions.reshape(directions.shape[0], *output.shape)
    )
    try:
        for module, x, y in layers:
            module.input0, module.output = x[samples], y[samples]
        for module, rule, backpropagated in reversed(chain.layers):
            if module.output.data_ptr() not in chain.saved:  # below a detach or no_grad
                break
            rule(chain, module, backpropagated)
    finally:
        for module, _, _ in layers:
            for attr in ("input0", "output"):
                vars(module).pop(attr, None)
    return chain.results


class PassThrough:
    """A parameter-free layer: pulls the quantity back through its transposed Jacobian."""

    params: Tuple[str, ...] = ()

    def __init__(self, derivatives):
        self.derivatives = derivatives

    def __call__(self, chain: ChainPass, module: nn.Module, backpropagated: bool) -> None:
        """Reduce the layer's parameters and pass the quantity to its input."""
        # the next layer may have received a view of this output: restore its shape
        bp = chain.saved.pop(module.output.data_ptr()).shaped_like(module.output)
        curved = bool(bp.sources) or chain.curved_at(module)  # before reducing takes it
        reduced = []
        for name in self.params:
            param = getattr(module, name, None)
            if param is not None and param.requires_grad:
                chain.results[id(param)] = self.reduce(chain, module, name, bp)
                reduced.append(chain.results[id(param)])
        if reduced and chain.gram_pairing is not None:
            chain.finish_block(reduced[0], curved)
        if backpropagated:
            chain.saved[module.input0.data_ptr()] = self.backpropagate(chain, module, bp)

    def curved(self, module: nn.Module) -> bool:
        """Whether the layer adds a curvature source (``σ'' ≠ 0``)."""
        return False

    def reduce(self, chain, module, name, bp) -> BatchSums:
        """Batch sums of one parameter."""
        raise NotImplementedError

    def jac_t(self, module, mat: Tensor) -> Tensor:
        """``Jᵀ mat`` for ``mat [V, N, *out]``."""
        return self.derivatives.jac_t_mat_prod(module, None, None, mat)

    def backpropagate(self, chain, module, bp: Backpropagated) -> Backpropagated:
        """The quantity at the layer's input."""
        pulled = (self.pull_back(chain, s, module) for s in bp.sources)
        return Backpropagated(self.jac_t(module, bp.first), tuple(s for s in pulled if s))

    def pull_back(self, chain, source: CurvatureSource, module) -> Optional[CurvatureSource]:
        """A curvature source seen from the layer's input (``None``: spilled)."""
        chain.spill(source, module)
        return None

    def add_curvature(self, chain, module, jac: Tensor, coefficients: Tensor) -> None:
        """Second derivatives of a spilled source's entries at this layer's parameters.

        Args:
            chain: The pass, which keeps them (``ChainPass.add_curvature``).
            module: The layer.
            jac: ``[r, n, *out]`` Jacobian of ``r`` entries of the source with respect to
                the layer's output.
            coefficients: ``[K, n, r]`` their residual coefficients.
        """


class LinearOpDerivatives:
    """Transposed Jacobian of a parameter-free linear module, by ``torch.func``.

    Used for average pooling, whose BackPACK derivatives build a float32 transposed
    convolution (failing for float64 models), for adaptive pooling and ``Identity``.
    """

    @staticmethod
    def jac_t_mat_prod(module, g_inp, g_out, mat: Tensor) -> Tensor:  # noqa: D102
        _, vjp = torch.func.vjp(module.forward, module.input0.detach())
        return torch.vmap(vjp)(mat)[0]


class Elementwise(PassThrough):
    """Element-wise map (activation, dropout): adds a curvature source where ``σ'' ≠ 0``."""

    def backpropagate(self, chain, module, bp: Backpropagated) -> Backpropagated:  # noqa: D102
        out = super().backpropagate(chain, module, bp)
        if not chain.second_order or not self.curved(module):
            return out
        d2f = self.derivatives.d2f(module, None, None)
        coefficients = (d2f.unsqueeze(0) * bp.first).flatten(2)
        return Backpropagated(out.first, out.sources + (CurvatureSource(coefficients),))

    def curved(self, module: nn.Module) -> bool:  # noqa: D102
        return not self.derivatives.hessian_is_zero(module)

    def pull_back(self, chain, source, module):  # noqa: D102
        return source.through_elementwise(self.derivatives.df(module, None, None))


class Parameterized(PassThrough):
    """A layer with parameters: reduces per-input terms to batch sums per parameter."""

    params = ("weight", "bias")

    def reduce(self, chain, module, name, bp: Backpropagated) -> BatchSums:  # noqa: D102
        if is_rank_one(module):
            terms = chain.layer_output_terms(module, bp)
            if chain.gram_pairing is not None:  # U = Ū ⊗ x: Ĝ = ‖x‖² Ū Ūᵀ (bias: Ū Ūᵀ)
                x = module.input0.detach()
                scale = 1.0 if name == "bias" else (x * x).sum(1)[:, None, None]
                chain.add_gram(scale * gram(bp.first))
            if name == "bias":
                return batch_sums(terms)
            sums = rank_one_batch_sums(terms, module.input0.detach())
            if chain.kronecker:
                sums.sums.update(chain.kronecker_sums(bp.first, module))
            return sums
        return self.generic_sums(chain, module, bp, name)

    def pull_back(self, chain, source, module):  # noqa: D102
        if is_rank_one(module) and source.through_linear_keeps_structure():
            return source.through_linear(module.weight)
        return super().pull_back(chain, source, module)

    def add_curvature(self, chain, module, jac, coefficients) -> None:  # noqa: D102
        if is_rank_one(module):
            output = _squared_contraction(coefficients, jac.flatten(2))
            chain.add_curvature((id(module), None), output)
            return
        n = jac.shape[1]
        for name in self.params:
            param = getattr(module, name, None)
            if param is not None and param.requires_grad:
                J = self.per_input_products(name, module, jac, slice(0, n), True)
                chain.add_curvature((id(module), name), _squared_contraction(coefficients, J))

    def generic_sums(self, chain, module, bp, name) -> BatchSums:
        """Batch sums from per-input Jacobian products, a chunk of inputs at a time.

        Per-input tensors of the parameter's size exist for ``chain.elements`` entries at
        most, so memory does not grow with the batch.
        """
        directions, n = bp.first.shape[0], bp.first.shape[1]
        rows = chain.rows
        step = max(1, chain.elements // (directions * getattr(module, name).numel()))
        spilled = chain.curvature.pop((id(module), name), None)
        total = None
        for start in range(0, n, step):
            samples = slice(start, min(n, start + step))
            U = self.per_input_products(name, module, bp.first[:, samples], samples, step >= n)
            W = None if spilled is None else spilled[:, samples]
            for source in bp.sources:
                coefficients = source.coefficients[:, samples]
                for first in range(0, coefficients.shape[2], rows):
                    entries = slice(first, first + rows)
                    jac = source.dense(module.output.shape, entries, samples)
                    J = self.per_input_products(name, module, jac, samples, step >= n)
                    W = _add(W, _squared_contraction(coefficients[:, :, entries], J))
            sums = batch_sums(chain.output_terms(U, W, samples))
            total = sums if total is None else total.add(sums)
            if chain.gram_pairing is not None:
                chain.add_gram(gram(U), samples)
        return total

    def per_input_products(self, name, module, mat, samples: slice, whole: bool) -> Tensor:
        """``[V, n, *param.shape]`` per-input transposed Jacobian products of ``mat``."""
        if name == "weight" and jacobians.unfold_unsupported(module) is None:
            return jacobians.conv_weight(mat, module.input0[samples].detach(), module)
        indices = None if whole else list(range(module.input0.shape[0])[samples])
        return self.derivatives.param_mjp(
            name, module, None, None, mat, sum_batch=False, subsampling=indices
        )


def is_rank_one(module: nn.Module) -> bool:
    """Linear layer on ``[N, in]`` inputs: per-input weight Jacobians are outer products."""
    return outer_products(module, module.input0)


def outer_products(module: nn.Module, inputs: Tensor) -> bool:
    """Whether per-input weight Jacobians are outer products: a Linear layer on ``[N, in]``."""
    return isinstance(module, nn.Linear) and inputs.dim() == 2


def _output_second_derivatives(bp: Backpropagated) -> Optional[Tensor]:
    """``[K, N, out]`` second derivatives with respect to a Linear layer's output."""
    if not bp.sources:
        return None
    return sum(source.squared_contraction() for source in bp.sources)


def _squared_contraction(coefficients: Tensor, jac: Tensor) -> Tensor:
    """``Σ_s c_ks J_sn…²``: ``[K, n, r]`` and ``[r, n, *P]`` to ``[K, n, *P]``."""
    return torch.einsum("kns,sn...->kn...", coefficients, jac * jac)


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """``a + b`` where ``None`` is zero."""
    return b if a is None else a if b is None else a + b
