"""Each collected step's statistics summed over the processes of a ``torch.distributed`` group.

Every statistic a collected step adds is a sum over its inputs: the batch sums of each term
and of the squares of its summands (``BatchSums``), and the input count. The statistics of
one process on the union of all ranks' inputs are therefore the sums of the ranks' own, and
summing them before the running average is updated makes the cumulative average and the EMA
of every rank those of that one process, identical on every rank.

One step is one ``all_reduce(SUM)`` of one flat buffer: a header (which ranks failed inside
the block, the input count, whether a batch was not finite, ...) and then, per parameter in
the model's order, a flag that the rank saw it and its dense sums, each ``[*P]`` or the
shape of a Kronecker factor. Ranks must pack the same keys and shapes: the buffer follows a
``Layout`` agreed by all ranks. A rank whose sums do not fit it (the first step, a parameter
or term seen for the first time) says so in the header; the ranks then exchange what they
hold (``all_gather_object``), agree on the union and reduce again. After the first step this
is rare, so a step costs one collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fimhooks.diagonal_terms import BatchSums

#: Header entries after the per-rank failure flags.
_INPUTS, _NONFINITE, _MISFIT, _WITH_OUTPUTS, _OUTPUTS = range(5)

#: ``{parameter name: ({key: shape}, {aliased key: twin})}``: what one rank holds.
Description = Dict[str, Tuple[Dict[str, Tuple[int, ...]], Dict[str, str]]]


@dataclass
class Layout:
    """What every rank packs, in this order: per parameter name its dense keys and shapes.

    Attributes:
        keys: ``{name: {key: shape}}`` in the model's parameter order.
        aliases: ``{name: {key: twin}}``: keys whose sums are those of ``twin`` on every
            rank that holds them (``I2`` where the network is piecewise linear).
        dtype: Precision of the buffer (at least float32, so that counts stay exact).
    """

    keys: Dict[str, Dict[str, Tuple[int, ...]]] = field(default_factory=dict)
    aliases: Dict[str, Dict[str, str]] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32


@dataclass
class StepSums:
    """One collected step of one rank, or of all ranks after ``StepReducer.reduce``.

    Attributes:
        pending: ``{parameter name: BatchSums}`` of the step's inputs.
        num_inputs: Inputs of the step.
        nonfinite: Whether an output or statistic was not finite (the step is skipped).
        num_outputs: Outputs per position (``C``), ``None`` where no batch was seen.
    """

    pending: Dict[str, BatchSums]
    num_inputs: int
    nonfinite: bool
    num_outputs: Optional[int]


def dense_sums(pending: Dict[str, BatchSums]) -> Dict[str, Tuple[Dict[str, Tensor], dict]]:
    """``{name: ({key: dense sum}, {aliased key: twin})}``, products multiplied out."""
    out = {}
    for name, batch in pending.items():
        dense = batch.dense()
        out[name] = ({k: v for k, v in dense.items() if k not in batch.aliases}, batch.aliases)
    return out


def describe(local: Dict[str, Tuple[Dict[str, Tensor], dict]]) -> Description:
    """Keys, shapes and aliases of ``dense_sums``: what a rank tells the others."""
    return {
        name: ({k: tuple(v.shape) for k, v in sums.items()}, dict(aliases))
        for name, (sums, aliases) in local.items()
    }


def fits(local: Dict[str, Tuple[Dict[str, Tensor], dict]], layout: Layout) -> bool:
    """Whether ``layout`` has a place of the right shape and precision for every sum."""
    for name, (sums, aliases) in local.items():
        keys, twins = layout.keys.get(name), layout.aliases.get(name, {})
        if keys is None:
            return False
        for key, value in sums.items():
            if keys.get(key) != tuple(value.shape):
                return False
            if torch.promote_types(value.dtype, layout.dtype) != layout.dtype:
                return False
        if any(key not in keys and twins.get(key) != twin for key, twin in aliases.items()):
            return False
    return True


def agree(descriptions: Sequence[Description], dtypes: Sequence[str], order: Sequence[str]):
    """The layout of the union of what the ranks hold; the same on every rank.

    Args:
        descriptions: Every rank's ``describe``, in rank order.
        dtypes: Every rank's precision (``str(dtype)``).
        order: Parameter names in the model's order; others follow, sorted.
    """
    names = {name for d in descriptions for name in d}
    ordered = [n for n in order if n in names] + sorted(names - set(order))
    layout = Layout()
    for name in ordered:
        held = [d[name] for d in descriptions if name in d]
        keys: Dict[str, Tuple[int, ...]] = {}
        for shapes, _ in held:
            keys.update(shapes)
        aliases = {k: t for _, a in held for k, t in a.items() if k not in keys}
        layout.keys[name] = dict(sorted(keys.items()))
        layout.aliases[name] = dict(sorted(aliases.items()))
    for dtype in dtypes:
        layout.dtype = torch.promote_types(layout.dtype, getattr(torch, dtype.split(".")[-1]))
    return layout


def pack(header: List[float], local, layout: Layout, device) -> Tensor:
    """The flat buffer of one rank: header, then per parameter its flag and its sums."""
    sizes = [len(header)] + [
        1 + sum(_numel(shape) for shape in keys.values()) for keys in layout.keys.values()
    ]
    buffer = torch.zeros(sum(sizes), dtype=layout.dtype, device=device)
    buffer[: len(header)] = torch.tensor(header, dtype=layout.dtype)
    offset = len(header)
    for name, keys in layout.keys.items():
        sums, aliases = local.get(name, (None, {}))
        if sums is not None:
            buffer[offset] = 1.0
        offset += 1
        for key, shape in keys.items():
            n = _numel(shape)
            if sums is not None:
                value = sums.get(key, sums.get(aliases.get(key)))
                if value is not None:
                    buffer[offset : offset + n] = value.reshape(-1)
            offset += n
    return buffer


def unpack(buffer: Tensor, layout: Layout, header_size: int) -> Dict[str, BatchSums]:
    """``{name: BatchSums}`` of the parameters some rank saw (views into ``buffer``)."""
    pending, offset = {}, header_size
    for name, keys in layout.keys.items():
        seen = bool(buffer[offset] > 0)
        offset += 1
        sums = {}
        for key, shape in keys.items():
            n = _numel(shape)
            sums[key] = buffer[offset : offset + n].view(shape)
            offset += n
        if seen:
            pending[name] = BatchSums(sums, aliases=dict(layout.aliases[name]))
    return pending


def _numel(shape: Tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


class StepReducer:
    """Sums each collected step over the ranks of ``group``; see the module docstring.

    Args:
        group: The process group (``None``: the default group).
        order: Parameter names in the model's order.
        device: Where the buffer lives (the parameters' device; CUDA for NCCL).
    """

    def __init__(self, group, order: Sequence[str], device: torch.device):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.order = list(order)
        self.device = device
        self.layout = Layout()

    def reduce(self, step: StepSums, failed: bool = False) -> Optional[StepSums]:
        """The step's sums over all ranks; every rank must call it on every collected step.

        Args:
            step: This rank's step.
            failed: This rank raised inside the block: the others are told so.

        Returns:
            The step of all ranks' inputs (``None`` on a rank that failed).

        Raises:
            RuntimeError: naming the ranks that raised inside their block.
        """
        local = {} if failed else dense_sums(step.pending)
        header = [0.0] * self.world_size + [0.0] * 5
        header[self.rank] = float(failed)
        extra = self.world_size
        header[extra + _INPUTS] = 0 if failed else step.num_inputs
        header[extra + _NONFINITE] = float(step.nonfinite)
        header[extra + _MISFIT] = float(not failed and not fits(local, self.layout))
        header[extra + _WITH_OUTPUTS] = float(step.num_outputs is not None)
        header[extra + _OUTPUTS] = step.num_outputs or 0
        buffer = self._all_reduce(pack(header, local, self.layout, self.device))
        head = buffer[: len(header)].tolist()
        failed_ranks = [r for r in range(self.world_size) if head[r] > 0]
        if failed:
            return None
        if failed_ranks:
            raise RuntimeError(
                f"fimhooks: rank(s) {failed_ranks} of the process group raised an error "
                "inside their `with monitor:` block; this step was not collected on any "
                "rank. See the failing rank's own error."
            )
        if head[extra + _MISFIT] > 0:
            self._agree(local)
            buffer = self._all_reduce(pack(header, local, self.layout, self.device))
            head = buffer[: len(header)].tolist()
        with_outputs = head[extra + _WITH_OUTPUTS]
        return StepSums(
            unpack(buffer, self.layout, len(header)),
            int(round(head[extra + _INPUTS])),
            head[extra + _NONFINITE] > 0,
            int(round(head[extra + _OUTPUTS] / with_outputs)) if with_outputs else None,
        )

    def _all_reduce(self, buffer: Tensor) -> Tensor:
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        return buffer

    def _agree(self, local) -> None:
        """All ranks exchange what they hold and take the union as the new layout."""
        dtypes = {v.dtype for sums, _ in local.values() for v in sums.values()}
        dtype = self.layout.dtype
        for d in dtypes:
            dtype = torch.promote_types(dtype, d)
        mine = (describe(local), str(dtype))
        everyone: List[Optional[tuple]] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        descriptions = [self._with_layout(d) for d, _ in everyone]
        self.layout = agree(descriptions, [t for _, t in everyone], self.order)

    def _with_layout(self, description: Description) -> Description:
        """A rank's description joined with the current layout, so that it only grows."""
        joined = {
            name: (dict(keys), dict(self.layout.aliases.get(name, {})))
            for name, keys in self.layout.keys.items()
        }
        for name, (shapes, aliases) in description.items():
            keys, twins = joined.setdefault(name, ({}, {}))
            keys.update(shapes)
            twins.update(aliases)
        return joined


def rank_seed(seed: int, rank: int, *counters: int) -> int:
    """A seed of its own for each rank (and counters), reproducible from ``seed``.

    SplitMix64 of the arguments: nearby seeds and ranks give unrelated streams.
    """
    state = seed & 0xFFFFFFFFFFFFFFFF
    for value in (rank, *counters):
        state = _splitmix64(state ^ _splitmix64(value + 0x9E3779B97F4A7C15))
    return state & 0x7FFFFFFFFFFFFFFF


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def unwrap(model: nn.Module, process_group) -> Tuple[nn.Module, object]:
    """The module to watch and the group to sum over.

    A ``DistributedDataParallel`` wrapper gives its inner module (parameter names without
    ``module.``) and, unless ``process_group`` is given, its own group.

    Raises:
        ValueError: for sharded wrappers (FSDP) or sharded parameters (``DTensor``).
    """
    from torch.nn.parallel import DistributedDataParallel

    _check_not_sharded(model)
    if isinstance(model, DistributedDataParallel):
        group = process_group if process_group is not None else model.process_group
        return model.module, group
    return model, process_group


def _check_not_sharded(model: nn.Module) -> None:
    sharded = _sharded_types()
    for path, module in model.named_modules():
        if isinstance(module, sharded) or type(module).__name__ in _SHARDED_NAMES:
            raise ValueError(
                f"fimhooks: module '{path or '<model>'}' is a sharded wrapper "
                f"({type(module).__name__}); per-input Fisher statistics need each rank to "
                "hold whole parameters. Wrap the model in DistributedDataParallel instead "
                "(the supported multi-process wrapper)."
            )
    for name, param in model.named_parameters():
        if type(param).__name__ == "DTensor" or type(param.data).__name__ == "DTensor":
            raise ValueError(
                f"fimhooks: parameter '{name}' is sharded (DTensor); per-input Fisher "
                "statistics need whole parameters on each rank. Wrap the model in "
                "DistributedDataParallel instead (the supported multi-process wrapper)."
            )


#: Class names of sharded wrappers, for torch versions where they cannot be imported.
_SHARDED_NAMES = ("FullyShardedDataParallel", "FSDPModule")


def _sharded_types() -> tuple:
    types = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover - torch without FSDP
        pass
    try:
        from torch.distributed.fsdp import FSDPModule

        types.append(FSDPModule)
    except ImportError:  # pragma: no cover - older torch
        pass
    return tuple(types)


def process_group_of(group) -> Tuple[int, int]:
    """``(rank, world size)`` in ``group``, or ``(0, 1)`` without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)
