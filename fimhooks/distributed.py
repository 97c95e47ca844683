"""Each collected step's statistics summed over the processes of a ``torch.distributed`` group.

Every statistic a collected step adds is a sum over its inputs: the batch sums of each term
and of the squares of its summands (``BatchSums``), and the input count. The statistics of
one process on the union of all ranks' inputs are therefore the sums of the ranks' own, and
summing them before the running average is updated makes the cumulative average and the EMA
of every rank those of that one process, identical on every rank.

One step is one collective of one flat buffer per rank: a header (which ranks failed inside
the block, the input count, whether a batch was not finite, ...), a flag per parameter that
the rank saw it, the dense sums, each ``[*P]`` or the shape of a Kronecker factor, in the
model's parameter order, then the rank-one sums of Linear layers as their factors
(``RankOne``: output terms and inputs, ``rows`` per rank, zero-padded), from which every
rank forms the products of all ranks' rows. Those are far fewer numbers than the dense
sums where a rank holds fewer inputs than about ``in / ranks``.

The collective is the one that moves fewer numbers for the layout: the ranks' buffers
gathered, each sent to every other rank in one ``all_to_all`` and their dense parts then
added up by every rank, or an ``all_reduce`` in which each rank writes its factors into a
slot of its own and zeros into the others' (the sum gathers them). With two ranks, or
mostly factors, the gather moves half as much.

Ranks must pack the same keys and shapes: the buffer follows a ``Layout`` agreed by all
ranks. A rank whose sums do not fit it (the first step; a parameter, a term or more inputs
seen for the first time) says so in the header; the ranks then exchange what they hold
(``all_gather_object``), agree on the union and sum again. The layout only grows, so
after the first step this is rare and a step costs one collective.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fimhooks.engine.step import Step
from fimhooks.fisher.diagonal_terms import BatchSums, RankOne, rank_one_sum_keys

#: How long a rank that raised inside its block waits for the others to hear of it.
FAILURE_NOTICE_SECONDS = 10.0

#: Header entries after the per-rank failure flags.
_INPUTS, _NONFINITE, _MISFIT, _WITH_OUTPUTS, _OUTPUTS, _POSITIONS = range(6)
#: Rank-one sums are sent dense only where that moves this many times fewer numbers than
#: their factors: the sender forms dense sums with a dozen operations, which take longer
#: than moving the factors of a narrow layer (``benchmarks/bench_sync.py``).
DENSE_SAVING = 2
#: Descriptions of steps remembered as fitting the layout or not (batch sizes vary).
_REMEMBERED_FITS = 16

Shape = Tuple[int, ...]
#: A rank-one sum's terms and the widths of its output and input (``RankOne``).
Signature = Tuple[Tuple[str, ...], int, int]


def signature(rank_one: RankOne) -> Signature:
    """The terms and widths of ``rank_one``: what ranks must agree on to send its factors."""
    keys, outputs, inputs = rank_one.keys, rank_one.outputs, rank_one.inputs
    return keys, outputs.shape[1] // len(keys), inputs.shape[1]


def _columns(sig: Signature) -> int:
    """Numbers per input of a rank-one sum's factors: its output terms and its input."""
    keys, width_out, width_in = sig
    return len(keys) * width_out + width_in


@dataclass(frozen=True)
class Held:
    """What one rank holds of one parameter's sums, as it tells the others.

    Attributes:
        sums: ``((key, shape), ...)`` of its dense sums.
        aliases: ``((key, twin), ...)``.
        rank_ones: ``((signature, rows), ...)`` of its rank-one sums, rows over all passes.
    """

    sums: Tuple[Tuple[str, Shape], ...] = ()
    aliases: Tuple[Tuple[str, str], ...] = ()
    rank_ones: Tuple[Tuple[Signature, int], ...] = ()

    def shapes(self) -> Dict[str, Shape]:
        """``{key: shape}`` of every sum, rank-one sums counted as their dense blocks."""
        out = dict(self.sums)
        for (keys, width_out, width_in), _ in self.rank_ones:
            out.update((k, (width_out, width_in)) for k in rank_one_sum_keys(keys))
        return out


#: What a rank holds, by parameter name, hashable: a step like the last needs no new check.
Description = Tuple[Tuple[str, Held], ...]


def describe(pending: Dict[str, BatchSums]) -> Description:
    """What a rank holds, by parameter name."""
    out = []
    for name, batch in pending.items():
        rows: Dict[Signature, int] = {}
        for rank_one in batch.rank_ones:
            sig = signature(rank_one)
            rows[sig] = rows.get(sig, 0) + len(rank_one.inputs)
        sums = tuple((k, tuple(v.shape)) for k, v in batch.sums.items())
        out.append((name, Held(sums, tuple(batch.aliases.items()), tuple(rows.items()))))
    return tuple(out)


@dataclass
class Layout:
    """What every rank packs, in this order, agreed by all ranks.

    A rank's buffer holds the header, one flag per parameter (the rank saw it), the dense
    sums, then the factors: per rank-one sum, ``slots`` blocks of ``rows`` rows of output
    terms and inputs.

    Attributes:
        header: Numbers before the flags.
        world_size: Ranks in the group.
        keys: ``{name: {key: shape}}`` of the dense sums, in the model's parameter order.
        aliases: ``{name: {key: twin}}``: keys whose sums are those of ``twin`` on every
            rank that holds them (``I2`` where the network is piecewise linear).
        factors: ``{name: signatures}`` of the rank-one sums sent as their factors.
        rows: Rows of each rank's factors.
        gather: The collective: every rank's buffer to every rank (``True``), or their sum.
        dtype: Precision of the buffer (at least float32, so that counts stay exact).
    """

    header: int
    world_size: int
    keys: Dict[str, Dict[str, Shape]] = field(default_factory=dict)
    aliases: Dict[str, Dict[str, str]] = field(default_factory=dict)
    factors: Dict[str, Tuple[Signature, ...]] = field(default_factory=dict)
    rows: int = 0
    gather: bool = False
    dtype: torch.dtype = torch.float32

    @property
    def slots(self) -> int:
        """Ranks' factors in one rank's buffer: its own when gathered, all when summed."""
        return 1 if self.gather else self.world_size

    @cached_property
    def dense_size(self) -> int:
        """End of the header, the flags and the dense sums."""
        sums = sum(math.prod(shape) for keys in self.keys.values() for shape in keys.values())
        return self.header + len(self.keys) + sums

    @cached_property
    def size(self) -> int:
        """Numbers in one rank's buffer."""
        columns = sum(_columns(sig) for signatures in self.factors.values() for sig in signatures)
        return self.dense_size + self.slots * self.rows * columns

    def traffic(self) -> float:
        """Numbers each rank sends in the collective (all-to-all or ring all-reduce)."""
        world = self.world_size
        return (world - 1) * self.size if self.gather else 2 * (world - 1) / world * self.size

    def places(self, buffer: Tensor) -> "Places":
        """Views of ``buffer`` (``[size]``, or ``[dense_size]``: no factors) at their places."""
        head = buffer[: self.header + len(self.keys)]
        sums, spans, offset = {}, {}, len(head)
        for name, keys in self.keys.items():
            sums[name], start = {}, offset
            for key, shape in keys.items():
                sums[name][key], offset = _place(buffer, offset, shape), offset + math.prod(shape)
            spans[name] = buffer[start:offset]
        factors = {}
        if len(buffer) > self.dense_size:
            for name, signatures in self.factors.items():
                for sig in signatures:
                    factors[name, sig] = []
                    for _ in range(self.slots):
                        outputs = _place(buffer, offset, (self.rows, len(sig[0]) * sig[1]))
                        inputs = _place(buffer, offset + outputs.numel(), (self.rows, sig[2]))
                        factors[name, sig].append((outputs, inputs))
                        offset += outputs.numel() + inputs.numel()
        return Places(head, sums, spans, factors, buffer[self.dense_size :])


@dataclass
class Places:
    """Views of one buffer at a layout's places.

    Attributes:
        head: ``[header + parameters]`` the header and the parameters' flags.
        sums: ``{name: {key: [*shape]}}`` the dense sums.
        spans: ``{name: [numbers]}`` all of a parameter's dense sums, flat.
        factors: ``{(name, signature): [(outputs, inputs)] per slot}``.
        factor_part: Everything after the dense sums.
    """

    head: Tensor
    sums: Dict[str, Dict[str, Tensor]]
    spans: Dict[str, Tensor]
    factors: Dict[Tuple[str, Signature], List[Tuple[Tensor, Tensor]]]
    factor_part: Tensor


def fits(description: Description, dtype: torch.dtype, layout: Layout) -> bool:
    """Whether ``layout`` has a place of the right shape and precision for every sum."""
    if torch.promote_types(dtype, layout.dtype) != layout.dtype:
        return False
    for name, held in description:
        keys, twins = layout.keys.get(name), layout.aliases.get(name, {})
        if keys is None:
            return False
        if any(keys.get(k) != shape for k, shape in held.sums):
            return False
        for sig, rows in held.rank_ones:
            if sig in layout.factors[name]:
                if rows > layout.rows:
                    return False
            elif any(keys.get(k) != sig[1:] for k in rank_one_sum_keys(sig[0])):
                return False
        if any(key not in keys and twins.get(key) != twin for key, twin in held.aliases):
            return False
    return True


def agree(descriptions: Sequence[Description], dtypes, order, world_size: int, header: int):
    """The layout of the union of what the ranks hold; the same on every rank.

    A rank-one sum is sent as its factors when every rank holding its keys holds it
    in that form, unless its dense sums are ``DENSE_SAVING`` times fewer numbers; the
    collective is the one that moves fewer numbers.

    Args:
        descriptions: Every rank's ``describe``, in rank order.
        dtypes: Every rank's precision (``str(dtype)``).
        order: Parameter names in the model's order; others follow, sorted.
        world_size: Ranks in the group.
        header: Numbers before the sums.
    """
    held = [dict(d) for d in descriptions]
    names = {name for d in held for name in d}
    ordered = [n for n in order if n in names] + sorted(names - set(order))
    rows = max((r for d in held for h in d.values() for _, r in h.rank_ones), default=0)
    dtype = torch.float32
    for name in dtypes:
        dtype = torch.promote_types(dtype, getattr(torch, name.split(".")[-1]))
    layouts = []
    for gather in (False, True) if world_size > 1 else (False,):
        layout = Layout(header, world_size, rows=rows, gather=gather, dtype=dtype)
        for name in ordered:
            _place_parameter(layout, name, [d[name] for d in held if name in d])
        layouts.append(layout)
    return min(layouts, key=Layout.traffic)  # the reduce where both move as much


def _place_parameter(layout: Layout, name: str, held: Sequence[Held]) -> None:
    """Add one parameter's sums, as some ranks hold them, to ``layout``."""
    keys: Dict[str, Shape] = {}
    for h in held:
        keys.update(h.shapes())
    factors = []
    for sig in dict.fromkeys(sig for h in held for sig, _ in h.rank_ones):
        sum_keys = rank_one_sum_keys(sig[0])
        same = all(sig in dict(h.rank_ones) or not set(sum_keys) & h.shapes().keys() for h in held)
        dense = len(sum_keys) * sig[1] * sig[2]
        if same and layout.slots * layout.rows * _columns(sig) < DENSE_SAVING * dense:
            factors.append(sig)
            for key in sum_keys:
                del keys[key]
    layout.keys[name] = keys  # the first holder's order: a rank-one sum's keys stay together
    layout.factors[name] = tuple(factors)
    layout.aliases[name] = {k: t for h in held for k, t in h.aliases if k not in keys}


def pack(places: Places, header: List[float], pending, layout: Layout, slot: int) -> None:
    """Write one rank's header and sums into a buffer's ``places``; absent ones are 0.

    A rank-one sum sent dense is multiplied out straight into the buffer; one sent as
    factors fills the rows of ``slot``, this rank's (the other slots are zeros).
    """
    flags = [float(name in pending) for name in layout.keys]
    places.head.copy_(torch.tensor(header + flags, dtype=places.head.dtype))
    if not layout.gather:
        places.factor_part.zero_()
    filled: Dict[Tuple[str, Signature], int] = {}
    for name, sums in places.sums.items():
        batch, written = pending.get(name), set()
        if batch is not None:
            for key, value in batch.sums.items():
                sums[key].copy_(value)
                written.add(key)
            for rank_one in batch.rank_ones:
                sig = signature(rank_one)
                if sig in layout.factors[name]:
                    outputs, inputs = places.factors[name, sig][slot]
                    start, n = filled.get((name, sig), 0), len(rank_one.inputs)
                    outputs[start : start + n] = rank_one.outputs
                    inputs[start : start + n] = rank_one.inputs
                    filled[name, sig] = start + n
                else:
                    for product in rank_one.products():
                        _write_product(sums, places.spans[name], *product, written)
            for key, twin in batch.aliases.items():
                if key in sums:  # dense here: another rank holds it apart from its twin
                    sums[key].copy_(sums[twin] if twin in sums else batch.dense()[key])
                    written.add(key)
        for key in sums.keys() - written:
            sums[key].zero_()
    if layout.gather:  # rows this rank did not fill
        for (name, sig), slots in places.factors.items():
            start = filled.get((name, sig), 0)
            if start < layout.rows:
                for factor in slots[slot]:
                    factor[start:].zero_()


def _place(buffer: Tensor, offset: int, shape: Shape) -> Tensor:
    return buffer[offset : offset + math.prod(shape)].view(shape)


def _write_product(sums: Dict[str, Tensor], span: Tensor, keys, left, right, written) -> None:
    """``left.T @ right`` split into one block per key, accumulated into ``sums``' views.

    ``span`` is the flat view of all of ``sums``, in order: where the keys lie side by
    side, the product is formed straight into it.
    """
    order, fresh = list(sums), keys[0] not in written
    first = order.index(keys[0])
    if tuple(order[first : first + len(keys)]) == keys and left.dtype == span.dtype:
        start = sum(sums[k].numel() for k in order[:first])
        shape = (left.shape[1], right.shape[1])
        target = span[start : start + math.prod(shape)].view(shape)
        torch.mm(left.T, right, out=target) if fresh else target.addmm_(left.T, right)
    else:
        parts = (left.T @ right).split(left.shape[1] // len(keys))
        for key, part in zip(keys, parts):
            sums[key].copy_(part) if fresh else sums[key].add_(part)
    written.update(keys)


def unpack(dense: Places, factors: Sequence[Places], layout: Layout) -> Dict[str, BatchSums]:
    """``{name: BatchSums}`` of the parameters some rank saw, views into the buffers.

    A rank-one sum sent as factors comes back as one ``RankOne`` per rank (zero rows
    add nothing).

    Args:
        dense: The places of the header and dense sums of all ranks, summed.
        factors: The places of each rank's factors: every rank's buffer when gathered,
            the summed buffer (one slot per rank) when summed.
        layout: The layout all ranks packed.
    """
    pending = {}
    flags = dense.head[layout.header :].tolist()
    if layout.gather:
        parts = [(places, 0) for places in factors]
    else:
        parts = [(factors[0], slot) for slot in range(layout.world_size)]
    for (name, sums), flag in zip(dense.sums.items(), flags):
        if flag > 0:
            rank_ones = [
                RankOne(sig[0], *places.factors[name, sig][slot])
                for sig in layout.factors[name]
                for places, slot in parts
            ]
            pending[name] = BatchSums(dict(sums), rank_ones, dict(layout.aliases[name]))
    return pending


class Buffers:
    """What one rank sends and receives in a layout's collective, and its places.

    Summed (``all_reduce``), the sent buffer is the received one. Gathered, a rank packs
    one buffer and sends it to each other rank (one row each, all the same); the others'
    arrive in rows of their own, and the header and dense sums of all ranks are added up,
    in rank order on every rank so that every rank gets the same bits.

    Args:
        layout: The layout.
        rank: This rank.
        device: Where the buffers live.

    Attributes:
        sent: ``[1 or world - 1, size]``.
        received: ``[1 or world - 1, size]``.
        packed: Places of the buffer a rank packs (``sent[0]``).
        summed: Places of the header and dense sums of all ranks.
        factors: Places of the buffers holding the ranks' factors.
        ranks: Gathered, every rank's buffer (``[size]``), in rank order.
        dense: Gathered, ``[dense_size]`` the ranks' headers and dense sums added up.
    """

    def __init__(self, layout: Layout, rank: int, device: torch.device):
        self.dense_size = layout.dense_size
        rows = layout.world_size - 1 if layout.gather else 1
        self.sent = torch.empty(rows, layout.size, dtype=layout.dtype, device=device)
        self.packed = layout.places(self.sent[0])
        if layout.gather:
            self.received = torch.empty_like(self.sent)
            others = list(self.received)
            self.ranks = others[:rank] + [self.sent[0]] + others[rank:]  # in rank order
            self.dense = torch.empty(layout.dense_size, dtype=layout.dtype, device=device)
            self.summed = layout.places(self.dense)
            self.factors = [layout.places(row) for row in self.ranks]
        else:
            self.received, self.summed, self.factors = self.sent, self.packed, [self.packed]

    def add_dense(self) -> None:
        """Gathered: the header and dense sums of all ranks into ``dense``, in rank order."""
        end = self.dense_size
        torch.add(self.ranks[0][:end], self.ranks[1][:end], out=self.dense)
        for row in self.ranks[2:]:
            self.dense += row[:end]


#: Seconds the ranks of a group wait for each other to build their monitors.
PRESENCE_TIMEOUT_S = 120.0
_MONITORS_BUILT = itertools.count()


def check_every_rank_builds(group) -> None:
    """Every rank of ``group`` builds its monitor, or a clear error within a timeout.

    The ranks meet on the process group's key-value store (no collective, so a rank
    that never comes is named instead of waited for).

    Raises:
        RuntimeError: naming the ranks that built no monitor within
            ``PRESENCE_TIMEOUT_S`` seconds.
    """
    store = getattr(dist.distributed_c10d, "_get_default_store", lambda: None)()
    if store is None:
        return
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    prefix = f"fimhooks/monitor/{next(_MONITORS_BUILT)}/"
    store.set(prefix + str(dist.get_rank()), "1")
    deadline = time.monotonic() + PRESENCE_TIMEOUT_S
    while True:
        missing = [r for r in ranks if not store.check([prefix + str(r)])]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"fimhooks: ranks {missing} built no FisherMonitor within "
                f"{PRESENCE_TIMEOUT_S:g} s of this one: every rank of the process group "
                "must build the monitor (it sums each collected step over the ranks), or "
                "pass sync=False for per-rank estimates."
            )
        time.sleep(0.01)


class StepReducer:
    """Sums each collected step over the ranks of ``group``; see the module docstring.

    The sums go over a group of their own with the same ranks, so that they never pair
    with another collective of ``group`` (DDP's gradient buckets) when ranks part ways.
    Every rank of ``group`` must create it, in the same order as its other groups.

    Args:
        group: The process group (``None``: the default group).
        order: Parameter names in the model's order.
        device: Where the buffer lives (the parameters' device; CUDA for NCCL).
    """

    def __init__(self, group, order: Sequence[str], device: torch.device):
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        backend = dist.get_backend(group)
        self.group = dist.new_group(ranks, backend=backend, use_local_synchronization=True)
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.order = list(order)
        self.device = device
        self.layout = Layout(self.world_size + 6, self.world_size)
        self._buffers = Buffers(self.layout, self.rank, device)
        self._fitting: Dict[Tuple[Description, torch.dtype], bool] = {}

    def reduce(self, step: Step, failed: bool = False) -> Optional[Step]:
        """The step's sums over all ranks; every rank must call it on every collected step.

        Args:
            step: This rank's step.
            failed: This rank raised inside the block: the others are told so.

        Returns:
            The step of all ranks' inputs (``None`` on a rank that failed), its sums views
            into buffers that the next step overwrites.

        Raises:
            RuntimeError: naming the ranks that raised inside their block.
        """
        pending = {} if failed else step.sums
        description = describe(pending)
        dtype = self.layout.dtype
        for batch in pending.values():
            dtype = torch.promote_types(dtype, batch.dtype())
        if (description, dtype) not in self._fitting:
            if len(self._fitting) == _REMEMBERED_FITS:
                self._fitting.clear()
            self._fitting[description, dtype] = fits(description, dtype, self.layout)
        header = [0.0] * self.layout.header
        header[self.rank] = float(failed)
        extra = self.world_size
        header[extra + _INPUTS] = 0 if failed else step.num_inputs
        header[extra + _NONFINITE] = float(step.nonfinite)
        header[extra + _MISFIT] = float(not self._fitting[description, dtype])
        header[extra + _WITH_OUTPUTS] = float(step.num_outputs is not None)
        header[extra + _OUTPUTS] = step.num_outputs or 0
        header[extra + _POSITIONS] = step.positions
        if failed:
            self._tell_failure(header)
            return None
        head = self._sum(header, pending)
        failed_ranks = [r for r in range(self.world_size) if head[r] > 0]
        if failed_ranks:
            raise RuntimeError(
                f"fimhooks: rank(s) {failed_ranks} of the process group raised an error "
                "inside their `with monitor:` block; this step was not collected on any "
                "rank. See the failing rank's own error."
            )
        if head[extra + _MISFIT] > 0:
            self._agree(description, dtype)
            header[extra + _MISFIT] = 0.0
            head = self._sum(header, pending)
        with_outputs = head[extra + _WITH_OUTPUTS]
        buffers = self._buffers
        return Step(
            unpack(buffers.summed, buffers.factors, self.layout),
            int(round(head[extra + _INPUTS])),
            head[extra + _NONFINITE] > 0,
            int(round(head[extra + _OUTPUTS] / with_outputs)) if with_outputs else None,
            head[extra + _POSITIONS] / with_outputs if with_outputs else 0,
        )

    def _sum(self, header: List[float], pending: Dict[str, BatchSums]) -> List[float]:
        """This step's collective; the summed header."""
        layout, buffers = self.layout, self._buffers
        if header[self.world_size + _MISFIT] == 0:
            pack(buffers.packed, header, pending, layout, 0 if layout.gather else self.rank)
        else:  # a misfit rank sends its header alone
            buffers.sent.zero_()
            buffers.packed.head[: len(header)] = torch.tensor(header, dtype=layout.dtype)
        self._collective().wait()
        if layout.gather:
            buffers.add_dense()
        return buffers.summed.head[: len(header)].tolist()

    def _collective(self):
        """Start the layout's collective of the packed buffer; its work handle.

        Gathered, the buffer goes to every other rank in one all-to-all: as many numbers
        as a ring all-gather, and gloo's all-to-all takes half the time of its all-gather.
        """
        buffers = self._buffers
        if not self.layout.gather:
            return dist.all_reduce(buffers.sent, group=self.group, async_op=True)
        buffers.sent[1:] = buffers.sent[0]
        splits = [0 if r == self.rank else self.layout.size for r in range(self.world_size)]
        received, sent = buffers.received.view(-1), buffers.sent.view(-1)
        return dist.all_to_all_single(received, sent, splits, splits, self.group, async_op=True)

    def _tell_failure(self, header: List[float]) -> None:
        """Tell ranks waiting in this step's sum that this one failed; wait a while only.

        Ranks still inside their own block (in DDP's backward, waiting for this rank's
        gradients) never come: then this rank goes on raising its own error.
        """
        self._buffers.sent.zero_()
        self._buffers.packed.head[: len(header)] = torch.tensor(header, dtype=self.layout.dtype)
        work = self._collective()
        try:
            work.wait(timeout=timedelta(seconds=FAILURE_NOTICE_SECONDS))
        except RuntimeError:  # the others are elsewhere; this rank's own error follows
            pass

    def _agree(self, description: Description, dtype: torch.dtype) -> None:
        """All ranks exchange what they hold and take the union as the new layout."""
        mine = (self._with_layout(description), str(torch.promote_types(dtype, self.layout.dtype)))
        everyone: List[Optional[tuple]] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        descriptions, dtypes = [d for d, _ in everyone], [t for _, t in everyone]
        self.layout = agree(descriptions, dtypes, self.order, self.world_size, self.layout.header)
        self._buffers = Buffers(self.layout, self.rank, self.device)
        self._fitting = {}

    def _with_layout(self, description: Description) -> Description:
        """A rank's description joined with the current layout, so that it only grows."""
        layout, joined = self.layout, {}
        for name, keys in layout.keys.items():
            rank_ones = tuple((sig, layout.rows) for sig in layout.factors[name])
            joined[name] = Held(tuple(keys.items()), tuple(layout.aliases[name].items()), rank_ones)
        for name, held in description:
            old = joined.get(name, Held())
            rows = dict(old.rank_ones)
            for sig, n in held.rank_ones:
                rows[sig] = max(n, rows.get(sig, 0))
            sums = {**dict(old.sums), **dict(held.sums)}
            aliases = {**dict(old.aliases), **dict(held.aliases)}
            joined[name] = Held(tuple(sums.items()), tuple(aliases.items()), tuple(rows.items()))
        return tuple(joined.items())


def rank_setup(model: nn.Module, group, seed: int, sync: bool):
    """What a monitor on ``model`` needs under ``torch.distributed`` (checked on all ranks).

    Returns:
        ``(rank, seeds, reducer)``: the rank in ``group``; ``seeds(block, draw)`` giving
        each rank its own label seeds, or ``None`` on one process; the ``StepReducer``
        that sums the steps where ``sync``, else ``None``.
    """
    rank, world_size = process_group_of(group)
    if world_size == 1:
        return rank, None, None

    def seeds(block: int, draw: int) -> int:  # restored by the block count alone
        return rank_seed(seed, rank, block, draw)

    reducer = None
    if sync:
        device = next(model.parameters(), torch.empty(0)).device
        check_every_rank_builds(group)
        reducer = StepReducer(group, [n for n, _ in model.named_parameters()], device)
    return rank, seeds, reducer


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
