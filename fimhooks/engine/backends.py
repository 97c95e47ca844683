"""The backends that turn one collected step's label draw into per-parameter batch sums.

Each backend answers two questions, keyed by parameter name:

- ``applies(record, draw)``: whether it computes this forward pass's sums;
- ``batch_sums(record, draw, plan, rows=None)``: ``{parameter name: BatchSums}``.

``"chain"``: chains of supported layers, through BackPACK's module derivatives
(``engine.chain``); ``"general"``: any graph autograd differentiates (``engine.general``),
with the graph analysis it needs (which calls can be taken per input, and where Î₂ would
need curvature it does not follow). A new backend is one more class with these two methods,
added to ``backends()``. ``BatchBackend``, with the same two methods, serves granularity
``"batch"`` alone (the collector asks it directly).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Set

import torch
from torch import nn
from torch.autograd.graph import GradientEdge

from fimhooks.engine.chain import chain_batch_sums
from fimhooks.engine.general import batched_grad, general_batch_sums
from fimhooks.engine.graph import broadcast_sums, curved_layer
from fimhooks.engine.layers import affine_in, generic_grads, per_input_rule, random_inside, spec_for
from fimhooks.engine.memory import Budget
from fimhooks.engine.observations import LabelDraw, scaled_residuals
from fimhooks.engine.recording import ForwardRecord, chain_of
from fimhooks.engine.structure import ModelStructure
from fimhooks.fisher.diagonal_terms import BatchSums
from fimhooks.fisher.granularity import batch_terms

#: The values of ``FisherMonitor(backend=...)``.
BACKEND_OPTIONS = ("auto", "chain", "general")


@dataclass(frozen=True)
class StepPlan:
    """What a backend computes for a step, besides the draw.

    Attributes:
        terms: The per-entry terms to reduce (``quantities.terms_for``).
        kappa: The likelihood's ``κ``.
        budget: Memory for the step's extra tensors.
        kronecker: Also the Kronecker factors of Linear layers (chain backend only).
        granularity: Where Î₁ squares the score (``fisher.granularity``); the chain has
            one position per input, where ``"token"`` and ``"input"`` agree.
    """

    terms: frozenset
    kappa: float
    budget: Budget
    kronecker: bool = False
    granularity: str = "token"


class ChainBackend:
    """Chains of supported layers: one position per input, no mask, no batch statistics.

    Args:
        structure: Returns the model's structure as it is now.
    """

    name = "chain"

    def __init__(self, structure: Callable[[], ModelStructure]):
        self._structure = structure
        self.refused: Set[tuple] = set()  # signatures whose chain rules disagreed

    def applies(self, record: ForwardRecord, draw: LabelDraw) -> bool:
        """Whether the forward pass was a chain of supported layers (kept in ``record``)."""
        leaves = self._structure().chain_leaves
        weights = draw.position_weights
        if leaves is None or record.batch_statistics or record.signature in self.refused:
            return False
        if weights.shape[1] != 1 or not bool((weights > 0).all()):
            return False
        record.chain = chain_of(record, record.output, leaves)
        return record.chain is not None

    def batch_sums(self, record, draw, plan, rows=None) -> Dict[str, BatchSums]:
        """``{parameter name: BatchSums}`` of the chain (of its first ``rows`` inputs)."""
        chain, h = record.chain, record.output
        layers = [(c.module, c.inputs[0], c.output) for c in chain]
        rules = [spec_for(c.module).chain_rule(c.module) for c in chain]
        draw = draw.to(h.dtype)  # the chain computes in the model's precision
        args = (plan.kappa, plan.terms, plan.kronecker, plan.budget, rows)
        sums = chain_batch_sums(layers, rules, h, draw, *args)
        names = self._structure().param_names  # read at the forward pass
        return {names[key]: value for key, value in sums.items() if key in names}


class GeneralBackend:
    """Any graph autograd differentiates: directions backpropagated by autograd.

    Args:
        model: The watched model.
        structure: Returns the model's structure as it is now.
        to_output: ``h -> ([D, N, T, C] -> [D, *h.shape])``, the output's layout.
        batch_axis: The batch axis of the model's own tensor inputs.
    """

    name = "general"

    def __init__(self, model: nn.Module, structure, to_output, batch_axis: int):
        self.model, self._structure = model, structure
        self._to_output, self.batch_axis = to_output, batch_axis
        self.generic_paths: Set[str] = set()  # layers whose own rule disagreed
        self.axes: Dict[tuple, dict] = {}  # by signature: batch axes derived per call
        self.generic_layers: Dict[str, None] = {}  # an ordered set: layers replayed
        self._held = (None, None, None)  # (weak record, state, its uses)

    def applies(self, record: ForwardRecord, draw: LabelDraw) -> bool:
        """Always: any graph autograd differentiates."""
        return True

    def batch_sums(self, record, draw, plan, rows=None) -> Dict[str, BatchSums]:
        """``{parameter name: BatchSums}`` of every parameter reaching the output."""
        uses = self.uses(record)
        for call in {id(c): c for u in uses.values() for c, _ in u}.values():
            names = [local for u in uses.values() for c, local in u if c is call]
            if per_input_rule(call, names) is generic_grads:
                self.generic_layers[call.path] = None
                reason = random_inside(call.module)
                if reason:
                    raise RuntimeError(
                        f"fimhooks: layer '{call.path}' ({type(call.module).__name__}) is "
                        f"replayed one input at a time, but {reason}; set that dropout to 0 "
                        "or call model.eval() while collecting."
                    )
        h = record.output
        args = (plan.kappa, plan.terms, plan.budget, rows, plan.granularity)
        return general_batch_sums(h, self._to_output(h), draw, uses, *args)

    def uses(self, record: ForwardRecord) -> dict:
        """``{parameter name: [(call, name inside the called module), ...]}``.

        Kept for the latest record until the verification changes a layer's rule or axes.
        """
        state = (frozenset(self.generic_paths), record.signature in self.axes)
        held, held_state, held_uses = self._held
        if held is not None and held() is record and held_state == state:
            return held_uses
        uses = self._uses(record)
        self._held = (weakref.ref(record), state, uses)
        return uses

    def _uses(self, record: ForwardRecord) -> dict:
        calls_at: Dict[str, list] = {}
        for call in per_input_calls(record, self.axes.get(record.signature)):
            if call.path in self.generic_paths:
                call = dataclasses.replace(call, generic=True)
            if call.module is self.model and self.batch_axis:
                call = dataclasses.replace(call, input_axis=self.batch_axis)
            calls_at.setdefault(call.path, []).append(call)
        declared = self._structure().declared
        uses = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            found, called = [], False
            # a parameter set after this forward pass has no use in its graph
            for path, local in declared.get(id(param), ()):
                called = called or any(c.path == path for c in record.calls)
                while path not in calls_at and path:  # used inside an ancestor's forward
                    parent, _, child = path.rpartition(".")
                    path, local = parent, f"{child}.{local}"
                found += [(c, local) for c in calls_at.get(path, [])]
            if not found and called:
                raise RuntimeError(
                    f"fimhooks: parameter '{name}' is used only in computations shared by "
                    "all inputs (broadcast over the batch) by modules whose outputs have no "
                    "batch axis; fimhooks cannot split its gradient per input there."
                )
            if found:
                uses[name] = list({(id(c), loc): (c, loc) for c, loc in found}.values())
        return uses

    def own_rules(self, record: ForwardRecord, names) -> Dict[str, nn.Module]:
        """``{path: module}`` of the layers with a rule of their own using ``names``."""
        uses = self.uses(record)
        return {
            c.path: c.module
            for name in names
            for c, local in uses.get(name, ())
            if per_input_rule(c, [local]) is not generic_grads
        }


class BatchBackend:
    """Granularity ``"batch"``: the score summed over the step's observations, per draw.

    One batched backward of the ``M`` sampled residuals, each position's scaled by
    ``√(1/T_n)``, from the model output to the parameters: ``M`` parameter-sized
    gradients, no per-input tensor and no per-input rule (docs/math.md §7d).

    Args:
        model: The watched model.
        to_output: ``h -> ([D, N, T, C] -> [D, *h.shape])``, the output's layout.
    """

    name = "batch"

    def __init__(self, model: nn.Module, to_output):
        self.model, self._to_output = model, to_output

    def applies(self, record: ForwardRecord, draw: LabelDraw) -> bool:
        """Always: it backpropagates with autograd alone."""
        return True

    def batch_sums(self, record, draw, plan, rows=None) -> Dict[str, BatchSums]:
        """``{parameter name: BatchSums}`` of the parameters the output reaches."""
        h = record.output
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        vectors = self._to_output(h)(scaled_residuals(draw)).to(h.dtype)
        grads = batched_grad(h, list(params.values()), vectors)  # [M, *P] each
        sums = {}
        for name, g in zip(params, grads):
            if g is not None:  # a parameter the output does not reach has no sums
                g = g.detach().to(torch.promote_types(g.dtype, torch.float32))
                sums[name] = BatchSums(batch_terms(g, plan.terms))
        return sums


def backends(model, structure, to_output, batch_axis) -> Dict[str, object]:
    """The registry: ``{name: backend}``, in the order they are tried."""
    return {
        "chain": ChainBackend(structure),
        "general": GeneralBackend(model, structure, to_output, batch_axis),
    }


def curvature_needed(record: ForwardRecord, uses: dict) -> Optional[str]:
    """Why Î₂ would need curvature that the general backend does not follow, or ``None``."""
    for name, param_uses in uses.items():
        call, local = param_uses[0]
        if len(param_uses) > 1:
            return (
                f"the curvature of parameter '{name}', which is used by {len(param_uses)} "
                "calls (tied or reused); fimhooks computes Î₂ only where the network is "
                "piecewise linear after each layer"
            )
        if not affine_in(call.module, [local]):
            return (
                f"the curvature of layer '{call.path}' ({type(call.module).__name__}), "
                "which is not affine in its parameters"
            )
    nodes = {c.edge.node: c.path for c in record.calls if c.edge is not None}
    found = curved_layer(record.output.grad_fn, nodes)
    if found:
        return (
            f"the network's curvature above layer '{found[0]}', which passes through the "
            f"operation {found[1]}; fimhooks follows it only through chains of supported "
            "layers"
        )
    return None


def per_input_calls(record: ForwardRecord, axes: Optional[dict] = None) -> list:
    """The calls whose gradient can be taken per input.

    A value computed once for all inputs (position embeddings) and added to a per-input
    tensor is seen through that sum; otherwise a call whose output has a batch axis: the
    one derived from the data flow where the verification derived it (``axes``: ``{index
    of a call: axis or None}``), else the axis of the inputs' size. Other calls are left
    out: their parameters are then handled at a per-input call around them.
    """
    n = len(record.output)
    nodes = [c.edge.node for c in record.calls if c.edge is not None]
    sums = broadcast_sums(record.output.grad_fn, nodes, n)
    axes = axes or {}
    calls = []
    for index, call in enumerate(record.calls):
        shared = call.edge is not None and sums.get(call.edge.node)
        if shared and math.prod(shared[1][1:]) == call.output.numel():
            calls.append(call.broadcast(n, GradientEdge(shared[0], 0), shared[1]))
        elif index in axes:
            if axes[index] is not None:
                calls.append(dataclasses.replace(call, axis=axes[index]))
        elif call.per_input(n):
            calls.append(call)
    return calls
