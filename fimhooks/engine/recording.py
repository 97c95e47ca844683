"""What one forward pass leaves for the collected step: the calls of the watched modules.

A ``ForwardRecord`` is made by the monitor's forward hooks for one call of the model and
kept by the monitor (never on the user's modules) until the backward pass through its
output consumes it or the next forward pass replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge


def batch_axis(module: nn.Module) -> int:
    """The batch axis of a module's inputs and first output."""
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return 1
    return 0


@dataclass
class Call:
    """One call of a watched module.

    Attributes:
        module: The module.
        path: Its path in the model.
        inputs: Positional arguments as given (tensors keep their autograd history).
        kwargs: Keyword arguments as given.
        output: The first tensor of the output.
        edge: Where the gradient enters ``output``'s history at the time of the call, so
            that an in-place operation applied to the output later does not move it.
        versions: Version counters of the tensor inputs and of the output at the time of
            the call.
        statistics: ``(mean, var)`` a BatchNorm layer normalised with, held constant
            (``batchnorm="frozen-batch-stats"``); ``None``: its running statistics.
        generic: Whether the generic per-input rule replays the call instead of its
            layer's own (which failed a verification).
        axis: The batch axis of its first input and its output, where it was derived from
            the data flow (``verification.batch_axes``); ``None``: the module's own
            (``batch_axis``).
        input_axis: The batch axis of its tensor arguments where it is not the output's
            (the model's own call, with ``FisherMonitor(batch_axis=...)``).
        others: The output's further tensors with a history (an LSTM cell's ``c``,
            ``(h_n, c_n)`` of a recurrent layer), through which gradient enters too.
    """

    module: nn.Module
    path: str
    inputs: tuple
    kwargs: dict
    output: Tensor
    edge: Optional[GradientEdge]
    versions: Tuple[int, ...]
    statistics: Optional[Tuple[Tensor, Tensor]] = None
    generic: bool = False
    axis: Optional[int] = None
    input_axis: Optional[int] = None
    others: Tuple["Other", ...] = ()

    @property
    def args(self) -> tuple:
        """The positional arguments, detached, in float32 at least (mixed precision)."""
        return tuple(_detached_upcast(a) for a in self.inputs)

    @property
    def batch_dim(self) -> int:
        """The batch axis of the output (and of the first input)."""
        return batch_axis(self.module) if self.axis is None else self.axis

    @property
    def input_dim(self) -> int:
        """The batch axis of the tensor arguments."""
        return self.batch_dim if self.input_axis is None else self.input_axis

    def first_input(self, samples: slice) -> Tensor:
        """The first positional argument of the inputs ``samples``, batch axis first."""
        return self.args[0].movedim(self.input_dim, 0)[samples]

    def other_axis(self, other: Other) -> int:
        """A further output's batch axis: the first output's, else the first of its size."""
        axis, size = self.batch_dim, self.batch_size
        if other.tensor.dim() > axis and other.tensor.shape[axis] == size:
            return axis
        return next((i for i, s in enumerate(other.tensor.shape) if s == size), 0)

    @property
    def batch_size(self) -> int:
        """Inputs in the batch (the batch axis of the output)."""
        return self.output.shape[self.batch_dim]

    def per_input(self, num_inputs: int) -> bool:
        """Whether the output has the batch axis of ``num_inputs`` inputs."""
        axis = self.batch_dim
        return self.output.dim() > axis and self.output.shape[axis] == num_inputs

    def broadcast(self, num_inputs: int, edge: GradientEdge, shape) -> "Call":
        """This call seen per input: its value was added to a tensor with a batch axis.

        The output takes the sum's shape, ``edge`` is where the sum's gradient enters, and
        the arguments are repeated for every input (views): along their axis of size one
        where the output has one, else along a new leading axis.
        """
        has_row = self.output.dim() == len(shape)

        def rows(a):
            if not isinstance(a, Tensor) or not a.dim():
                return a
            a = a if has_row else a.unsqueeze(0)
            return a.expand(num_inputs, *a.shape[1:]) if a.shape[0] == 1 else a

        output = self.output if has_row else self.output.unsqueeze(0)
        inputs = tuple(rows(a) for a in self.inputs)
        return replace(self, inputs=inputs, output=output.expand(shape), edge=edge, others=())

    def modified_in_place(self) -> bool:
        """Whether a tensor input or the output was changed in place after the call."""
        tensors = [a for a in self.inputs if isinstance(a, Tensor)] + [self.output]
        return any(t._version != v for t, v in zip(tensors, self.versions))


@dataclass(frozen=True)
class Other:
    """A further output tensor of a call.

    Its index among the output's tensors, the tensor, and where its gradient enters.
    """

    index: int
    tensor: Tensor
    edge: GradientEdge


def _leaves(output) -> list:
    return torch.utils._pytree.tree_flatten(output)[0]


@dataclass
class ForwardRecord:
    """The watched calls of one forward pass of the model, in the order they returned.

    Attributes:
        calls: The calls.
        output: The model output (set when the forward pass returns).
        output_version: Its version counter then.
        consumed: Whether a backward pass through ``output`` was collected.
        batch_statistics: Path of a layer that normalised with the batch's statistics.
        chain: The calls as a chain, where the chain backend found one.
    """

    calls: List[Call] = field(default_factory=list)
    output: Optional[Tensor] = None
    output_version: int = 0
    consumed: bool = False
    batch_statistics: Optional[str] = None
    chain: Optional[List[Call]] = None

    @cached_property
    def signature(self) -> tuple:
        """What a verification's results hold for.

        The calls, and which of their output axes have as many entries as the batch; read
        once the forward pass returned.
        """
        n = len(self.output)
        return tuple(
            (c.path, c.output.dim(), tuple(i for i, s in enumerate(c.output.shape) if s == n))
            for c in self.calls
        ) + (self.output.dim(),)

    def add(self, module, path: str, args: tuple, kwargs: dict, output, statistics=None) -> None:
        """Record a call (a forward hook's arguments; ``statistics``: see ``Call``)."""
        tensors = [t for t in _leaves(output) if isinstance(t, Tensor)]
        if not tensors:
            return
        first = output if isinstance(output, Tensor) else tensors[0]
        edge = get_gradient_edge(first) if first.requires_grad else None
        versions = tuple(a._version for a in args if isinstance(a, Tensor)) + (first._version,)
        others = tuple(
            Other(i, t, get_gradient_edge(t))
            for i, t in enumerate(tensors)
            if i and t.requires_grad
        )
        call = Call(module, path, args, dict(kwargs), first, edge, versions, statistics)
        self.calls.append(replace(call, others=others) if others else call)


def chain_of(record: ForwardRecord, output: Tensor, leaves: dict) -> Optional[List[Call]]:
    """The calls as a chain, or ``None`` when the forward pass was not one.

    A chain: every leaf that ran (``leaves``: ``{id: module}``) ran once, each on (a contiguous view of) the previous
    leaf's output, the first on a tensor without gradient, and the model output is (a
    view of) the last leaf's output; nothing was changed in place, and no layer changed
    the precision (autocast).
    """
    calls = [c for c in record.calls if id(c.module) in leaves]
    if not calls or len({id(c.module) for c in calls}) != len(calls):
        return None
    if any(len(c.inputs) != 1 or c.kwargs for c in calls):
        return None
    if calls[0].inputs[0].requires_grad or not _same_data(calls[-1].output, output):
        return None
    for previous, call in zip(calls, calls[1:]):
        if not _same_data(previous.output, call.inputs[0]):
            return None
    if any(c.modified_in_place() for c in calls):
        return None
    if any(c.output.dtype != c.inputs[0].dtype for c in calls):  # autocast: general path
        return None
    return calls


def _same_data(a, b) -> bool:
    """``b`` is ``a`` or a reshaping view of it."""
    return (
        isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and a.data_ptr() == b.data_ptr()
        and a.numel() == b.numel()
        and a.is_contiguous()
        and b.is_contiguous()
    )


def _detached_upcast(value):
    if not isinstance(value, Tensor):
        return value
    value = value.detach()
    return value.float() if value.is_floating_point() and value.element_size() < 4 else value


def model_output(output, select: Optional[Callable]) -> Tensor:
    """The output tensor of the model's forward return value (``select``: ``output=``)."""
    h = output if select is None else select(output)
    if not isinstance(h, Tensor):
        raise TypeError(
            f"fimhooks: the model's forward returned {type(h).__name__}, not a tensor; "
            "pass output= to FisherMonitor to select it, e.g. "
            "output=lambda out: out.logits."
        )
    return h


def first_tensor(output) -> Optional[Tensor]:
    """The first tensor in a module's output (a tensor, a tuple, a dict or a ModelOutput)."""
    return next((t for t in _leaves(output) if isinstance(t, Tensor)), None)
