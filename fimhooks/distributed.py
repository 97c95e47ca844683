"""Each collected step's statistics summed over the processes of a ``torch.distributed`` group.

Every statistic a collected step adds is a sum over its inputs: the batch sums of each term
and of the squares of its summands (``BatchSums``), and the input count. The statistics of
one process on the union of all ranks' inputs are therefore the sums of the ranks' own, and
summing them before the running average is updated makes the cumulative average and the EMA
of every rank those of that one process, identical on every rank.

One step is one ``all_reduce(SUM)`` of one flat buffer: a header (which ranks failed inside
the block, the input count, whether a batch was not finite, ...) and then, per parameter in
the model's order, a flag that the rank saw it and its dense sums, each ``[*P]`` or the
shape of a Kronecker factor; then the rank-one products of wide Linear layers as their
factors: each rank writes its rows of a ``[ranks, rows, columns]`` block and zeros elsewhere,
so the sum gathers all ranks' rows, and the product of the gathered factors is the sum over
ranks (zero rows add nothing). That is smaller than the dense sums where a rank holds fewer
inputs than about ``in / (ranks · terms)``. A product's sums of squares follow from another
product's factors by squaring and are not sent.

Ranks must pack the same keys and shapes: the buffer follows a ``Layout`` agreed by all
ranks. A rank whose sums do not fit it (the first step; a parameter, a term or more inputs
seen for the first time) says so in the header; the ranks then exchange what they hold
(``all_gather_object``), agree on the union and reduce again. The layout only grows, so
after the first step this is rare and a step costs one collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fimhooks.diagonal_terms import BatchSums

#: How long a rank that raised inside its block waits for the others to hear of it.
FAILURE_NOTICE_SECONDS = 10.0

#: Header entries after the per-rank failure flags.
_INPUTS, _NONFINITE, _MISFIT, _WITH_OUTPUTS, _OUTPUTS = range(5)

Shape = Tuple[int, ...]
#: A product's keys and the columns of its two factors (``BatchSums.products``).
Factors = Tuple[Tuple[str, ...], int, int]
#: How a product follows from another of the same parameter: ``(source, keys)``, where its
#: right factor is the source's squared, and so are its columns of ``keys`` (``{k}_sq``)
#: those of the source's ``k``.
Derivation = Tuple[Factors, Tuple[str, ...]]


@dataclass
class Held:
    """What one rank holds of one parameter's sums, as it tells the others.

    Attributes:
        shapes: ``{key: shape}`` of every sum, products counted as their dense blocks.
        aliases: ``{key: twin}``.
        products: ``{(keys, left columns, right columns): rows}`` of its products.
        derived: ``{product: Derivation}`` of those that follow from another.
    """

    shapes: Dict[str, Shape] = field(default_factory=dict)
    aliases: Dict[str, str] = field(default_factory=dict)
    products: Dict[Factors, int] = field(default_factory=dict)
    derived: Dict[Factors, Derivation] = field(default_factory=dict)


@dataclass
class Layout:
    """What every rank packs, in this order, agreed by all ranks.

    Attributes:
        keys: ``{name: {key: shape}}`` of the dense sums, in the model's parameter order.
        aliases: ``{name: {key: twin}}``: keys whose sums are those of ``twin`` on every
            rank that holds them (``I2`` where the network is piecewise linear).
        factors: ``{name: {(keys, left columns, right columns): Derivation or None}}``:
            products sent as their factors, ``rows`` rows per rank (zero-padded), where
            that is smaller; of a derived one only the columns that do not follow.
        rows: Rows of each rank's factors.
        dtype: Precision of the buffer (at least float32, so that counts stay exact).
    """

    keys: Dict[str, Dict[str, Shape]] = field(default_factory=dict)
    aliases: Dict[str, Dict[str, str]] = field(default_factory=dict)
    factors: Dict[str, Dict[Factors, Optional[Derivation]]] = field(default_factory=dict)
    rows: int = 0
    dtype: torch.dtype = torch.float32

    def offsets(self, start: int) -> Dict[str, Tuple[int, Dict[str, int]]]:
        """``{name: (offset of its flag, {key: offset})}`` after a header of ``start``."""
        out, offset = {}, start
        for name, keys in self.keys.items():
            flag, offset = offset, offset + 1
            positions = {}
            for key, shape in keys.items():
                positions[key], offset = offset, offset + math.prod(shape)
            out[name] = (flag, positions)
        return out

    def dense_size(self, start: int) -> int:
        """End of the dense part of a buffer with a header of ``start``."""
        return start + sum(1 + sum(map(math.prod, k.values())) for k in self.keys.values())

    def factor_offsets(self, start: int, world_size: int) -> Dict[Tuple[str, Factors], int]:
        """Where each product's factors begin: ``[world, rows, left]``, then the right's."""
        out, offset = {}, start
        for name, products in self.factors.items():
            for product, derivation in products.items():
                out[name, product] = offset
                offset += world_size * self.rows * sum(sent_columns(product, derivation))
        return out

    def size(self, start: int, world_size: int) -> int:
        """Numbers in a buffer with a header of ``start``."""
        columns = sum(sum(sent_columns(*f)) for p in self.factors.values() for f in p.items())
        return self.dense_size(start) + world_size * self.rows * columns


def sent_columns(product: Factors, derivation: Optional[Derivation]) -> Tuple[int, int]:
    """Columns of the left and right factors that are sent (not derived)."""
    keys, left, right = product
    if derivation is None:
        return left, right
    return left // len(keys) * (len(keys) - len(derivation[1])), 0


def squared_from(products: Dict[Factors, Tuple[Tensor, Tensor]]) -> Dict[Factors, Derivation]:
    """The products that follow from another by squaring (checked exactly).

    A rank-one layer's sums of squared summands are the product of the squared output
    terms and the squared inputs (``rank_one_batch_sums``): they need not be sent.
    """
    out = {}
    for target, (left, right) in products.items():
        if not any(k.endswith("_sq") for k in target[0]):
            continue
        for source, (left2, right2) in products.items():
            if any(k.endswith("_sq") for k in source[0]) or right2.shape != right.shape:
                continue
            if left2.shape[1] // len(source[0]) != left.shape[1] // len(target[0]):
                continue
            if not torch.equal(right2 * right2, right):
                continue
            derived = tuple(
                k
                for k, block in zip(target[0], _blocks(left, len(target[0])))
                if k[:-3] in source[0]
                and torch.equal(_blocks(left2, len(source[0]))[source[0].index(k[:-3])] ** 2, block)
            )
            if derived:
                out[target] = (source, derived)
                break
    return out


def _blocks(left: Tensor, keys: int) -> Tuple[Tensor, ...]:
    """A left factor's column blocks, one per key."""
    return left.split(left.shape[1] // keys, dim=1)


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


def merged_products(batch: BatchSums) -> Dict[Factors, Tuple[Tensor, Tensor]]:
    """A parameter's products with the same keys joined by rows (several passes a block)."""
    out: Dict[Factors, list] = {}
    for keys, left, right in batch.products:
        out.setdefault((keys, left.shape[1], right.shape[1]), []).append((left, right))
    return {
        spec: (torch.cat([f[0] for f in parts]), torch.cat([f[1] for f in parts]))
        if len(parts) > 1
        else parts[0]
        for spec, parts in out.items()
    }


def describe(pending: Dict[str, BatchSums]) -> Dict[str, Held]:
    """What a rank holds, by parameter name."""
    out = {}
    for name, batch in pending.items():
        held = Held({k: tuple(v.shape) for k, v in batch.sums.items()}, dict(batch.aliases))
        products = merged_products(batch)
        for (keys, left, right), (factor, _) in products.items():
            held.shapes.update((k, (left // len(keys), right)) for k in keys)
            held.products[keys, left, right] = factor.shape[0]
        held.derived = squared_from(products)
        out[name] = held
    return out


def fits(description: Dict[str, Held], dtype: torch.dtype, layout: Layout) -> bool:
    """Whether ``layout`` has a place of the right shape and precision for every sum."""
    if torch.promote_types(dtype, layout.dtype) != layout.dtype:
        return False
    for name, held in description.items():
        keys, twins = layout.keys.get(name), layout.aliases.get(name, {})
        if keys is None:
            return False
        in_products = {k for product in held.products for k in product[0]}
        if any(keys.get(k) != v for k, v in held.shapes.items() if k not in in_products):
            return False
        for product, rows in held.products.items():
            if product in layout.factors[name]:
                derivation = layout.factors[name][product]
                if rows > layout.rows or derivation not in (None, held.derived.get(product)):
                    return False
            elif any(keys.get(k) != held.shapes[k] for k in product[0]):
                return False
        if any(key not in keys and twins.get(key) != twin for key, twin in held.aliases.items()):
            return False
    return True


def agree(descriptions, dtypes: Sequence[str], order: Sequence[str], world_size: int):
    """The layout of the union of what the ranks hold; the same on every rank.

    A product is sent as its factors when every rank holding its keys holds that same
    product and its zero-padded factors of all ranks are smaller than the dense sums.

    Args:
        descriptions: Every rank's ``describe``, in rank order.
        dtypes: Every rank's precision (``str(dtype)``).
        order: Parameter names in the model's order; others follow, sorted.
        world_size: Ranks in the group.
    """
    names = {name for d in descriptions for name in d}
    ordered = [n for n in order if n in names] + sorted(names - set(order))
    layout = Layout()
    layout.rows = max(
        (r for d in descriptions for h in d.values() for r in h.products.values()), default=0
    )
    for name in ordered:
        held = [d[name] for d in descriptions if name in d]
        keys: Dict[str, Shape] = {}
        for h in held:
            keys.update(h.shapes)
        factors: Dict[Factors, Optional[Derivation]] = {}
        products = dict.fromkeys(p for h in held for p in h.products)
        by_derivation = sorted(products, key=lambda p: _common_derivation(p, held) is not None)
        for product in by_derivation:
            same = all(product in h.products or not set(product[0]) & h.shapes.keys() for h in held)
            derivation = _common_derivation(product, held)
            if derivation is not None and derivation[0] not in factors:
                derivation = None
            _, left, right = product
            sent = sum(sent_columns(product, derivation))
            if same and world_size * layout.rows * sent < left * right:
                factors[product] = derivation
                for key in product[0]:
                    del keys[key]
        layout.keys[name] = keys  # the first holder's order: a product's keys stay together
        layout.factors[name] = factors
        layout.aliases[name] = {k: t for h in held for k, t in h.aliases.items() if k not in keys}
    for dtype in dtypes:
        layout.dtype = torch.promote_types(layout.dtype, getattr(torch, dtype.split(".")[-1]))
    return layout


def _common_derivation(product: Factors, held: Sequence[Held]) -> Optional[Derivation]:
    """The derivation of ``product`` if every rank holding it has the same one."""
    derivations = {h.derived.get(product) for h in held if product in h.products}
    return derivations.pop() if len(derivations) == 1 else None


def pack(buffer: Tensor, header: List[float], pending, layout: Layout, rank: int, world: int):
    """Write one rank's header and sums into ``buffer`` (``layout.size``); absent ones are 0.

    A product sent dense and whose keys lie side by side is multiplied out straight into
    the buffer; one sent as factors fills this rank's rows of them.
    """
    dense_end = layout.dense_size(len(header))
    buffer[: len(header)] = torch.tensor(header, dtype=buffer.dtype)
    buffer[dense_end:].zero_()
    starts = layout.factor_offsets(dense_end, world)
    for name, (flag, positions) in layout.offsets(len(header)).items():
        batch, keys = pending.get(name), layout.keys[name]
        buffer[flag] = float(batch is not None)
        written = set()
        if batch is not None:
            for key, value in batch.sums.items():
                _place(buffer, positions[key], keys[key]).copy_(value)
                written.add(key)
            for product, (left, right) in merged_products(batch).items():
                if product in layout.factors[name]:
                    derivation = layout.factors[name][product]
                    if derivation is not None:
                        left, right = _sent_left(product, derivation, left), right[:, :0]
                    _write_factors(
                        buffer, starts[name, product], layout.rows, rank, world, left, right
                    )
                else:
                    _write_product(buffer, positions, keys, product[0], left, right, written)
            for key, twin in batch.aliases.items():
                if key in keys:  # dense here: another rank holds it apart from its twin
                    value = (
                        _place(buffer, positions[twin], keys[twin])
                        if twin in positions
                        else batch.dense()[key]
                    )
                    _place(buffer, positions[key], keys[key]).copy_(value)
                    written.add(key)
        for key in keys.keys() - written:
            _place(buffer, positions[key], keys[key]).zero_()


def _place(buffer: Tensor, offset: int, shape: Shape) -> Tensor:
    return buffer[offset : offset + math.prod(shape)].view(shape)


def _write_factors(buffer, start, rows, rank, world, left, right) -> None:
    lefts = _place(buffer, start, (world, rows, left.shape[1]))
    rights = _place(buffer, start + lefts.numel(), (world, rows, right.shape[1]))
    lefts[rank, : len(left)] = left
    rights[rank, : len(right)] = right


def _sent_left(product: Factors, derivation: Derivation, left: Tensor) -> Tensor:
    """The columns of a derived product's left factor that do not follow from its source."""
    blocks = _blocks(left, len(product[0]))
    return torch.cat([b for k, b in zip(product[0], blocks) if k not in derivation[1]], dim=1)


def _derived_left(product: Factors, derivation: Derivation, sent: Tensor, source: Tensor):
    """A derived product's left factor from its sent columns and its source's left factor."""
    (source_keys, _, _), derived = derivation
    sent_blocks = iter(_blocks(sent, len(product[0]) - len(derived)) if sent.shape[1] else ())
    source_blocks = _blocks(source, len(source_keys))
    return torch.cat(
        [
            source_blocks[source_keys.index(k[:-3])] ** 2 if k in derived else next(sent_blocks)
            for k in product[0]
        ],
        dim=1,
    )


def _write_product(buffer, positions, keys, product_keys, left, right, written) -> None:
    """``left.T @ right`` split into one block per key, accumulated into the buffer."""
    first, rows = positions[product_keys[0]], left.shape[1]
    side_by_side = all(
        positions[k] == first + i * math.prod(keys[k]) for i, k in enumerate(product_keys)
    )
    blocks = [_place(buffer, positions[k], keys[k]) for k in product_keys]
    if side_by_side and left.dtype == buffer.dtype:
        target = _place(buffer, first, (rows, right.shape[1]))
        fresh = product_keys[0] not in written
        torch.mm(left.T, right, out=target) if fresh else target.addmm_(left.T, right)
    else:
        for block, part in zip(blocks, (left.T @ right).split(rows // len(product_keys))):
            block.copy_(part) if product_keys[0] not in written else block.add_(part)
    written.update(product_keys)


def unpack(buffer: Tensor, layout: Layout, header_size: int, world: int) -> Dict[str, BatchSums]:
    """``{name: BatchSums}`` of the parameters some rank saw (views into ``buffer``).

    Products sent as factors stay products of all ranks' rows (zero rows add nothing).
    """
    pending = {}
    starts = layout.factor_offsets(layout.dense_size(header_size), world)
    for name, (flag, positions) in layout.offsets(header_size).items():
        if buffer[flag] > 0:
            keys = layout.keys[name]
            sums = {key: _place(buffer, positions[key], shape) for key, shape in keys.items()}
            factors = {}
            for product, derivation in layout.factors[name].items():
                left, right = sent_columns(product, derivation)
                rows = world * layout.rows
                lefts = _place(buffer, starts[name, product], (rows, left))
                rights = _place(buffer, starts[name, product] + lefts.numel(), (rows, right))
                if derivation is not None:  # sources come first (``agree``)
                    source_left, source_right = factors[derivation[0]]
                    lefts = _derived_left(product, derivation, lefts, source_left)
                    rights = source_right * source_right
                factors[product] = (lefts, rights)
            products = [(p[0], left, right) for p, (left, right) in factors.items()]
            pending[name] = BatchSums(sums, products, dict(layout.aliases[name]))
    return pending


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
        self.layout = Layout()
        self._buffer: Optional[Tensor] = None

    def reduce(self, step: StepSums, failed: bool = False) -> Optional[StepSums]:
        """The step's sums over all ranks; every rank must call it on every collected step.

        Args:
            step: This rank's step.
            failed: This rank raised inside the block: the others are told so.

        Returns:
            The step of all ranks' inputs (``None`` on a rank that failed), its sums views
            into a buffer that the next step overwrites.

        Raises:
            RuntimeError: naming the ranks that raised inside their block.
        """
        pending = {} if failed else step.pending
        description = describe(pending)
        dtype = self.layout.dtype
        for batch in pending.values():
            dtype = torch.promote_types(dtype, batch.dtype())
        header = [0.0] * self.world_size + [0.0] * 5
        header[self.rank] = float(failed)
        extra = self.world_size
        header[extra + _INPUTS] = 0 if failed else step.num_inputs
        header[extra + _NONFINITE] = float(step.nonfinite)
        header[extra + _MISFIT] = float(not fits(description, dtype, self.layout))
        header[extra + _WITH_OUTPUTS] = float(step.num_outputs is not None)
        header[extra + _OUTPUTS] = step.num_outputs or 0
        if failed:
            self._tell_failure(header)
            return None
        buffer = self._all_reduce(header, pending)
        head = buffer[: len(header)].tolist()
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
            buffer = self._all_reduce(header, pending)
            head = buffer[: len(header)].tolist()
        with_outputs = head[extra + _WITH_OUTPUTS]
        return StepSums(
            unpack(buffer, self.layout, len(header), self.world_size),
            int(round(head[extra + _INPUTS])),
            head[extra + _NONFINITE] > 0,
            int(round(head[extra + _OUTPUTS] / with_outputs)) if with_outputs else None,
        )

    def _all_reduce(self, header: List[float], pending: Dict[str, BatchSums]) -> Tensor:
        size, dtype = self.layout.size(len(header), self.world_size), self.layout.dtype
        if self._buffer is None or (self._buffer.numel(), self._buffer.dtype) != (size, dtype):
            self._buffer = torch.empty(size, dtype=dtype, device=self.device)
        if header[self.world_size + _MISFIT] == 0:
            pack(self._buffer, header, pending, self.layout, self.rank, self.world_size)
        else:  # a misfit rank sends its header alone
            self._buffer.zero_()
            self._buffer[: len(header)] = torch.tensor(header, dtype=self._buffer.dtype)
        dist.all_reduce(self._buffer, op=dist.ReduceOp.SUM, group=self.group)
        return self._buffer

    def _tell_failure(self, header: List[float]) -> None:
        """Tell ranks waiting in this step's sum that this one failed; wait a while only.

        Ranks still inside their own block (in DDP's backward, waiting for this rank's
        gradients) never come: then this rank goes on raising its own error.
        """
        buffer = torch.zeros(self.layout.size(len(header), self.world_size), device=self.device)
        buffer = buffer.to(self.layout.dtype)
        buffer[: len(header)] = torch.tensor(header, dtype=buffer.dtype)
        work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        try:
            work.wait(timeout=timedelta(seconds=FAILURE_NOTICE_SECONDS))
        except RuntimeError:  # the others are elsewhere; this rank's own error follows
            pass

    def _agree(self, description: Dict[str, Held], dtype: torch.dtype) -> None:
        """All ranks exchange what they hold and take the union as the new layout."""
        mine = (self._with_layout(description), str(torch.promote_types(dtype, self.layout.dtype)))
        everyone: List[Optional[tuple]] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        descriptions, dtypes = [d for d, _ in everyone], [t for _, t in everyone]
        self.layout = agree(descriptions, dtypes, self.order, self.world_size)

    def _with_layout(self, description: Dict[str, Held]) -> Dict[str, Held]:
        """A rank's description joined with the current layout, so that it only grows."""
        layout, joined = self.layout, {}
        for name, keys in layout.keys.items():
            held = Held(dict(keys), dict(layout.aliases[name]))
            for product, derivation in layout.factors[name].items():
                keys_, left, right = product
                held.shapes.update((k, (left // len(keys_), right)) for k in keys_)
                held.products[product] = layout.rows
                if derivation is not None:
                    held.derived[product] = derivation
            joined[name] = held
        for name, held in description.items():
            mine = joined.setdefault(name, Held())
            mine.shapes.update(held.shapes)
            mine.aliases.update(held.aliases)
            for product, rows in held.products.items():
                if product not in mine.products and product in held.derived:
                    mine.derived[product] = held.derived[product]
                elif mine.derived.get(product) != held.derived.get(product):
                    mine.derived.pop(product, None)  # derived only where both say so
                mine.products[product] = max(rows, mine.products.get(product, 0))
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
