"""``FisherMonitor``: attaches to a model and collects diagonal Fisher estimates online."""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.nn.modules.batchnorm import _BatchNorm

from fimhooks.distributed import (
    StepReducer,
    StepSums,
    check_every_rank_builds,
    process_group_of,
    rank_seed,
    unwrap,
)
from fimhooks.engine import batchnorm as bn
from fimhooks.engine.chain import chain_batch_sums
from fimhooks.engine.general import general_batch_sums
from fimhooks.engine.graph import broadcast_sums, curved_layer, reentrant_checkpoint
from fimhooks.engine.layers import affine_in, generic_grads, per_input_rule, random_inside, spec_for
from fimhooks.engine.memory import DEFAULT_MAX_MEMORY, Budget, check_max_memory
from fimhooks.engine.observations import (
    data_residuals,
    draw_labels,
    position_mask,
    read_positions,
    to_output_layout,
    with_data_residuals,
)
from fimhooks.engine.recording import ForwardRecord, chain_of
from fimhooks.engine.verification import OPTIONS as VERIFY_OPTIONS
from fimhooks.engine.verification import (
    autograd_squares,
    batch_axes,
    describe,
    disagreements,
    tolerance,
    verification_draw,
)
from fimhooks.estimates import DEFAULT_TARGET, FisherEstimates
from fimhooks.fisher.diagonal_terms import BatchSums
from fimhooks.fisher.likelihoods import likelihood_from
from fimhooks.fisher.quantities import DEFAULT_ESTIMATORS, ESTIMATORS, exact_pass, terms_for
from fimhooks.fisher.running import RunningDiagonal
from fimhooks.show.jsonlog import FisherLog
from fimhooks.show.progress import progress


class FisherMonitor:
    """Running diagonal Fisher estimates Î₁, Î₂ and exact, with their variances.

    Use it around the ordinary backward pass of a training step::

        monitor = FisherMonitor(model, "categorical")
        loss = F.cross_entropy(model(x), y)
        with monitor:
            loss.backward()
        est = monitor.estimates()

    The monitor attaches at the model's output: any loss computed from it works, and the
    labels it uses never enter the estimates. Labels for Î₁ and Î₂ are drawn from the
    model, and all numbers are per observation, independent of the loss's reduction and
    batch size. ``p.grad`` is left exactly as without the monitor.

    Args:
        model: The network. Any graph autograd can differentiate; layers without a
            declaration of their own use an exact generic per-input rule.
        likelihood: ``"categorical"`` (logits ``[N, C]`` or ``[N, *, C]``, class axis
            last), ``"bernoulli"``, ``"gaussian"``, or the loss module that encodes it:
            ``nn.CrossEntropyLoss`` (its ``[N, C, *]`` layout), ``nn.BCEWithLogitsLoss``,
            ``nn.MSELoss``.
        sigma: Gaussian noise level (default 1); Gaussian likelihood only.
        output: Callable from whatever the model's forward returns to the output tensor
            (e.g. ``lambda out: out.logits``); default: the return value itself.
        mc_samples: Label draws per observation (``M``).
        every: Collect on every ``every``-th ``with monitor:`` block.
        ema_decay: ``None`` for the cumulative average, or ``β`` in ``(0, 1)`` for a
            bias-corrected exponential moving average.
        estimators: Which of ``"I1", "I2", "exact"`` to compute; fewer is cheaper. The
            closed-form variance of Î₁ and the data variance need ``"exact"`` or ``"I2"``.
            Default: all three, where the model allows: a model on which ``"I2"`` cannot be
            computed gets the others and one notice saying why (asked for explicitly,
            ``"I2"`` raises the error instead).
            ``"EF"`` adds the empirical Fisher: squared gradients of the negative
            log-likelihood at the data's labels, read from the training loss's gradient
            (biased; docs/math.md §7b). With the Gaussian likelihood it needs the ``nn.MSELoss``
            module (its reduction gives the gradient's scale).
        seed: Seed of the monitor's own label sampler (default: ``torch.initial_seed()``),
            so collecting never changes the user's random number stream. Under
            ``torch.distributed`` each rank draws its own labels from ``seed`` and its rank.
        batchnorm: ``"error"`` (default): BatchNorm normalising with the batch's statistics
            (training mode) is refused, since per-input quantities are undefined there.
            ``"frozen-batch-stats"``: each batch's mean and biased variance are treated as
            constants of every input's map, exactly as eval mode with the running
            statistics set to the batch's. Training itself is unchanged.
        max_memory: Bytes the extra tensors of a collected step may take (default 1 GiB;
            ``None``: no bound). Inputs, label directions and curvature entries are taken
            a chunk at a time to stay within it; a smaller budget costs time, not accuracy.
        sync: Under ``torch.distributed`` (a ``DistributedDataParallel`` model, or any
            model while a process group is initialised), sum each collected step over the
            ranks, so that every rank holds the estimates of one process on all ranks'
            inputs; ``False`` keeps each rank's own. Every rank must then run the same
            collected steps. A DDP model is watched through its inner module: parameter
            names carry no ``module.`` prefix.
        process_group: The group to sum over (default: the DDP model's, else the default
            group).
        bounds: Also collect the lower and upper bounds of docs/math.md §7 on the exact
            diagonal and on the variances of Î₁ and Î₂ (``FisherEstimates.bounds``): two
            more per-entry terms for each of them. Needs ``"exact"`` or ``"I2"``.
        block_errors: Also collect each layer's full-block expected squared Frobenius
            error (``FisherEstimates.frobenius_error``), from per-input ``C × C`` Gram
            matrices. Needs ``"exact"`` or ``"I2"``; chain path only.
        verify: When to check the per-input gradients that the rules produce against
            autograd on a few inputs (``verification``): ``"first"`` (default) on the first
            collected step of each model structure, ``"always"`` on every collected step,
            ``"off"`` never. A layer whose rule disagrees is replayed by the generic rule
            (with one warning); where that disagrees too, the step is refused.
        batch_axis: The batch axis of the model's tensor inputs: ``1`` for sequence-first
            ``[T, N, ...]`` inputs (the output's is always the first). The layers' own
            batch axes are read from the data flow; this one is needed where the model
            replays as a whole (parameters of its own, such as a class token).

    Raises:
        ValueError: for an unsupported likelihood, BatchNorm in training mode, or invalid
            options.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Union[str, nn.Module],
        *,
        sigma: Optional[float] = None,
        output: Optional[Callable] = None,
        mc_samples: int = 1,
        every: int = 1,
        ema_decay: Optional[float] = None,
        estimators: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
        batchnorm: str = bn.REFUSE,
        max_memory: Optional[float] = DEFAULT_MAX_MEMORY,
        sync: bool = True,
        process_group=None,
        bounds: bool = False,
        block_errors: bool = False,
        verify: str = "first",
        batch_axis: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        model, process_group = unwrap(model, process_group)
        self.likelihood = likelihood_from(likelihood, sigma)
        self._class_axis = 1 if isinstance(likelihood, nn.CrossEntropyLoss) else -1
        self._default_estimators = estimators is None
        self.estimators = _check_estimators(
            DEFAULT_ESTIMATORS if estimators is None else estimators
        )
        _check_options(mc_samples, every, ema_decay, output)
        check_max_memory(max_memory)
        if isinstance(batch_axis, bool) or not isinstance(batch_axis, int) or batch_axis < 0:
            raise ValueError(f"batch_axis must be a non-negative integer, got {batch_axis!r}.")
        self.batch_axis = batch_axis
        if verify not in VERIFY_OPTIONS:
            raise ValueError(f"verify must be one of {VERIFY_OPTIONS}, got {verify!r}.")
        if batchnorm not in bn.OPTIONS:
            raise ValueError(f"batchnorm must be one of {bn.OPTIONS}, got {batchnorm!r}.")
        self.batchnorm = batchnorm
        self.max_memory, self._budget = max_memory, Budget(max_memory)
        self.model, self._output_of = model, output
        self.mc_samples, self.every, self.ema_decay = mc_samples, every, ema_decay
        self.seed = torch.initial_seed() if seed is None else int(seed)
        _check_not_extended(model)
        self._check_batchnorm()
        watched = [
            m for m in _ATTACHED if m is model or m in model.modules() or model in m.modules()
        ]
        if watched:
            what = "this" if watched[0] is model else "a module containing or inside this"
            raise ValueError(
                f"{what} {type(model).__name__} is already watched by a FisherMonitor; call "
                "remove() on that monitor first (two monitors would each collect every step)."
            )
        self._structure, self._handles, self._hooked = None, [], set()
        self._read_structure()
        self._terms = terms_for(self.estimators, bounds)
        self._exact_pass = exact_pass(self._terms)
        for option, value in (("bounds", bounds), ("block_errors", block_errors)):
            if value and not self._exact_pass:
                raise ValueError(
                    f"{option}=True needs the exact pass (the output Jacobian's C directions): "
                    f"include 'exact' or 'I2' in estimators, got {self.estimators!r}."
                )
        self.bounds, self.block_errors = bool(bounds), bool(block_errors)
        self._loss_reduction = getattr(likelihood, "reduction", None)
        if "EF" in self.estimators and self.likelihood.name == "gaussian":
            if self._loss_reduction not in ("mean", "sum"):
                raise ValueError(
                    "'EF' with the Gaussian likelihood reads (f − y) from the loss's gradient, "
                    "whose scale depends on the loss: pass the nn.MSELoss module itself "
                    "(reduction 'mean' or 'sum') as the likelihood."
                )
        self._kronecker = False
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._accumulators: Dict[str, RunningDiagonal] = {}
        self.skipped = 0
        self._entries = 0
        self._collecting = False
        self._inside = False
        self._removed = False
        self._busy = False
        self._num_outputs = 1
        self.collected_steps = 0
        self._listeners: List[Callable] = []
        self._pending: Dict[str, BatchSums] = {}
        self._pending_inputs = 0
        self._pending_nonfinite = False
        self._records: List[ForwardRecord] = []
        self._recording: Optional[ForwardRecord] = None
        self._mask = self._started_mask = None
        self._started = False
        self._generic_layers: Dict[str, None] = {}  # an ordered set
        self.verify = verify
        self._verified, self._unchained = set(), set()  # signatures of forward passes
        self._axes: Dict[tuple, dict] = {}  # by signature: batch axes derived per call
        self._generic_paths: set = set()  # layers whose own rule disagreed
        self._warned = set()
        self._set_hooks(True)
        self._rank, world_size = process_group_of(process_group)
        self._reducer = None
        if sync and world_size > 1:
            device = next(model.parameters(), torch.empty(0)).device
            names = [n for n, _ in model.named_parameters()]
            check_every_rank_builds(process_group)
            self._reducer = StepReducer(process_group, names, device)
        self._distributed = world_size > 1
        self._draws = 0  # label draws in the current block (their seeds under distributed)
        _ATTACHED[model] = self

    # --- the context manager -------------------------------------------------------

    def __call__(self, *, mask: Optional[Tensor] = None) -> "_Block":
        """A ``with`` block with options: ``with monitor(mask=attention_mask):``.

        Args:
            mask: Which positions are observed (``True``), shaped like the output without
                its class axis, or ``[N]`` (one flag per input). Masked positions (padding)
                are neither drawn nor counted. It holds for that block only; after
                ``start()``, ``monitor(mask=...)`` without a block gives the next backward
                pass its mask.
        """
        if self._started:
            self._started_mask = mask
        return _Block(self._enter, self.__exit__, mask)

    def __enter__(self) -> "FisherMonitor":
        return self._enter(None)

    def _enter(self, mask: Optional[Tensor]) -> "FisherMonitor":
        self._check_attached("with monitor")
        if self._inside:
            raise RuntimeError("`with monitor:` blocks cannot be nested.")
        if self._armed:
            self._check_batchnorm()
        self._mask = mask
        self._inside = True
        self._collecting = self._armed
        self._entries += 1
        self._pending, self._pending_inputs, self._pending_nonfinite = {}, 0, False
        self._draws = 0
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._inside = False
        if self._removed:  # remove() was called inside the block: nothing is collected
            self._collecting, self._pending = False, {}
            return False
        try:
            if self._collecting:
                self._collecting = False
                if exc_type is None:
                    self._commit()
                elif self._reducer is not None:  # the other ranks wait for this one
                    self._reducer.reduce(self._step(), failed=True)
        finally:
            self._pending, self._pending_inputs = {}, 0
            self._records, self._mask = [], None
            self._set_hooks(self._armed or self._started)
        return False

    @staticmethod
    def _finite(pending: Dict[str, BatchSums]) -> bool:
        totals = [t for batch in pending.values() for t in batch.totals()]
        return not totals or bool(torch.isfinite(torch.stack(totals)).all())

    @property
    def _armed(self) -> bool:
        """Whether the next (or current) ``with`` block collects."""
        return self._entries % self.every == 0

    def _step(self) -> StepSums:
        outputs = self._num_outputs if self._pending_inputs else None
        return StepSums(self._pending, self._pending_inputs, self._pending_nonfinite, outputs)

    def _commit(self) -> None:
        if self._reducer is not None:  # the sums of all ranks' inputs, on every rank
            step = self._reducer.reduce(self._step())
            self._pending, self._pending_inputs = step.pending, step.num_inputs
            self._pending_nonfinite = step.nonfinite
            self._num_outputs = step.num_outputs or self._num_outputs
        if self._pending_nonfinite or not self._finite(self._pending):
            self.skipped += 1
            self._warn_once(
                "nonfinite",
                "a collected batch had a non-finite model output or Fisher statistic and "
                "was skipped (counted in estimates().skipped); further skips are not "
                "warned about.",
            )
            return
        if not self._pending:
            self._warn_once(
                "empty",
                "nothing was collected inside `with monitor:`: call backward on a loss "
                "computed from the monitored model's output inside the block.",
            )
            return
        if not self._pending_inputs:  # every position was masked: nothing to add
            return
        for name, sums in self._pending.items():
            if name not in self._accumulators:
                self._accumulators[name] = RunningDiagonal(self.ema_decay, self.mc_samples)
            self._accumulators[name].update(sums, self._pending_inputs)
        self.collected_steps += 1
        for listener in list(self._listeners):
            listener(self)

    def _check_batchnorm(self) -> None:
        for path, module in self.model.named_modules():
            if not bn.normalises_with_batch(module):
                continue
            if self.batchnorm == bn.FROZEN_BATCH_STATS:
                if spec_for(module).grads is not None:
                    continue
                raise ValueError(
                    f"BatchNorm layer '{path}' ({type(module).__name__}) overrides the "
                    "forward pass of torch's BatchNorm (timm's BatchNormAct2d also applies "
                    "its activation), so batchnorm='frozen-batch-stats', which holds the "
                    "statistics of torch's own BatchNorm layers, does not apply to it. Put "
                    "it in eval mode (module.eval()) while monitoring."
                )
            mode = "is in training mode" if module.training else "tracks no running statistics"
            raise ValueError(
                f"BatchNorm layer '{path}' {mode}, so it normalises with the batch's "
                "statistics: per-input quantities are undefined there because each "
                "output depends on the whole batch. Put it in eval mode (module.eval()) "
                "while monitoring, or pass batchnorm='frozen-batch-stats' to treat each "
                "batch's statistics as constants of every input's map."
            )

    # --- hooks: they only move data -------------------------------------------------

    def _read_structure(self) -> None:
        """Paths, parameter names and watched modules, read again when the model changed.

        Layers added after the monitor was built and parameters replaced (``load_state_dict
        (assign=True)``) are picked up before the next collected step's forward pass.
        """
        model = self.model
        structure = tuple(map(id, model.modules())) + tuple(map(id, model.parameters()))
        if structure == self._structure:
            return
        self._structure = structure
        self._paths = {id(m): path for path, m in model.named_modules()}
        self._param_names = {id(p): name for name, p in model.named_parameters()}
        self._declared = _declarations(model)
        self._layer_of = {name: self._declared[id(p)][0][0] for name, p in model.named_parameters()}
        self._leaves = {path: m for path, m in model.named_modules() if not list(m.children())}
        self._chain_leaves = _chain_leaves(model, self._leaves, self._declared)
        self._watched = [m for m in model.modules() if _has_params(m) or isinstance(m, _BatchNorm)]
        if self._chain_leaves is not None:  # the chain check needs every layer's call
            self._watched += [m for m in self._leaves.values() if not _has_params(m)]
        if self._handles:
            self._hook_watched()

    def _set_hooks(self, on: bool) -> None:
        """Hooks exist only around collected steps, so other steps cost nothing extra."""
        if on and not self._handles:
            self._read_structure()
            start, finish = _Hook(self, "_start_record"), _Hook(self, "_finish_record")
            self._handles.append(self.model.register_forward_pre_hook(start))
            self._hook_watched()
            self._handles.append(self.model.register_forward_hook(finish))
        elif not on:
            for handle in self._handles:
                handle.remove()
            self._handles, self._hooked = [], set()

    def _hook_watched(self) -> None:
        """Record hooks on the watched modules that have none yet."""
        record = _Hook(self, "_record_call")
        for module in self._watched:
            if id(module) not in self._hooked:
                self._hooked.add(id(module))
                self._handles.append(module.register_forward_hook(record, with_kwargs=True))

    def _start_record(self, module, args) -> None:
        # not while collecting (the generic rule may replay the model itself), nor inside a
        # torch.func transform of the user's (its tensors are not the model's batch)
        if torch.is_grad_enabled() and not self._busy and not _inside_transform():
            self._read_structure()  # layers added since the hooks were set get theirs now
            self._recording = ForwardRecord()

    def _record_call(self, module, args, kwargs, output) -> None:
        path = self._paths.get(id(module))  # None: a layer taken out of the model
        if self._recording is None or path is None:
            return
        if not bn.normalises_with_batch(module):
            self._recording.add(module, path, args, kwargs, output)
            return None
        self._recording.batch_statistics = path
        if self.batchnorm != bn.FROZEN_BATCH_STATS:
            self._recording.add(module, path, args, kwargs, output)
            return None
        statistics = bn.batch_statistics(args[0])
        monitor = weakref.ref(self)
        output = bn.frozen(module, args[0], output, statistics, lambda: _busy(monitor))
        self._recording.add(module, path, args, kwargs, output, statistics)
        return output

    def _finish_record(self, module, args, output) -> None:
        record, self._recording = self._recording, None
        if record is None:
            return
        h = output if self._output_of is None else self._output_of(output)
        if not isinstance(h, Tensor):
            raise TypeError(
                f"fimhooks: the model's forward returned {type(h).__name__}, not a tensor; "
                "pass output= to FisherMonitor to select it, e.g. "
                "output=lambda out: out.logits."
            )
        if not h.requires_grad:
            return
        record.output, record.output_version = h, h._version
        if not self._inside:  # outside a block only the latest forward pass is kept
            self._records = []
        self._records.append(record)
        monitor, weak_record = weakref.ref(self), weakref.ref(record)
        h.register_hook(lambda grad: monitor() and monitor()._on_output_grad(weak_record(), grad))

    def _on_output_grad(self, record: Optional[ForwardRecord], grad: Tensor) -> None:
        """The backward pass reached the model output: collect before it goes further."""
        if self._busy:
            return
        if self._started and not self._inside:  # start(): this backward is one block
            mask, self._started_mask = self._started_mask, None
            with _Block(self._enter, self.__exit__, mask):
                self._take(record, grad)
            return
        self._take(record, grad)

    def _take(self, record: Optional[ForwardRecord], grad: Tensor) -> None:
        if not self._collecting:
            return
        if record is None:
            self._warn_once(
                "dropped",
                "a backward pass inside `with monitor:` went through a forward pass that "
                "the monitor no longer holds, and was not collected: outside the block only "
                "the latest forward pass is kept, so run each forward pass right before its "
                "backward pass (or both inside the block).",
            )
            return
        if record.consumed:
            return
        self._busy, record.consumed = True, True
        try:
            self._collect(record, grad)
        finally:
            self._busy = False

    def _collect(self, record: ForwardRecord, grad: Tensor) -> None:
        if record.batch_statistics is not None and self.batchnorm == bn.REFUSE:
            raise ValueError(
                f"BatchNorm layer '{record.batch_statistics}' normalised with the batch's "
                "statistics (training mode) in the forward pass of this step: per-input "
                "quantities are undefined there. Put it in eval mode (module.eval()) before "
                "the forward pass, or pass batchnorm='frozen-batch-stats' to FisherMonitor "
                "to treat each batch's statistics as constants."
            )
        h = record.output
        if h.dim() == 0:
            raise ValueError(
                "fimhooks: the watched model's output is a scalar, not one output per input "
                "[N, ...]: is it a loss? Watch the network that computes the outputs (with "
                "Lightning: FisherCallback(..., model='net')), or select them with output=."
            )
        if h.is_complex() or not h.is_floating_point():
            raise TypeError(
                f"fimhooks: the model output has dtype {h.dtype}; the likelihoods read real "
                "floating-point outputs (logits or means). Select a real output with output=."
            )
        if h._version != record.output_version:
            raise RuntimeError(
                "fimhooks: the model output was changed in place after the forward pass "
                "(e.g. out.div_(2)), so it no longer holds the model's values: write "
                "out = out / 2 instead, or apply the change inside the model."
            )
        if h.shape[0] == 0:  # a batch without inputs adds nothing
            return
        values = h.detach()  # labels are drawn in float32 at least (mixed precision)
        values = values.float() if values.element_size() < 4 else values
        positions = read_positions(values, self.likelihood, self._class_axis)
        observed = position_mask(self._mask, h, positions, self._class_axis)
        if not torch.isfinite(positions[observed]).all():  # no labels can be drawn
            self._pending_nonfinite = True
            return
        generator = self._generator(h.device)
        M, exact_pass = self.mc_samples, self._exact_pass
        draw = draw_labels(
            self.likelihood, positions, observed, M, generator, exact_pass, self.bounds
        )
        if self.block_errors:
            draw = dataclasses.replace(draw, gram_pairing=self.likelihood.gram_pairing)
        if "EF" in self._terms:
            read = (self.likelihood, self._class_axis, self._loss_reduction)
            residuals = data_residuals(grad, h, positions, observed, *read)
            draw = with_data_residuals(draw, residuals, sampled=self._terms != {"EF"})
        chain = None
        chained = positions.shape[1] == 1 and self._mask is None and not record.batch_statistics
        signature = record.signature
        if self._chain_leaves is not None and chained and signature not in self._unchained:
            chain = chain_of(record, h, self._chain_leaves)
        if self.verify == "always" or (self.verify == "first" and signature not in self._verified):
            chain = self._verify(record, positions, observed, chain)
        if chain:
            sums = self._chain_sums(chain, h, draw)
        else:
            uses = self._uses(record)
            if not uses:
                self._warn_once(
                    "no parameters",
                    "no parameter of the model that requires grad reaches its output; "
                    "there is nothing to estimate.",
                )
                self._warned.add("empty")  # said already, more precisely
                return
            if "I2" in self.estimators:
                self._check_no_curvature(record, uses)
            sums = self._general_sums(record, uses, draw, self._terms)
        for name, value in sums.items():
            pending = self._pending.get(name)
            self._pending[name] = value if pending is None else pending.add(value)
        self._pending_inputs += draw.num_inputs
        self._num_outputs = positions.shape[2]

    def _verify(self, record, positions, observed, chain):
        """Check the rules of the path in use against autograd (``verification``).

        A chain whose rules disagree hands the structure to the general path; a layer of
        the general path whose rule disagrees is replayed by the generic rule from then
        on, each with one warning naming it. Where the generic rule disagrees too, the
        step is refused.

        Returns:
            The chain to use (``None``: the general path).
        """
        h, signature = record.output, record.signature
        if reentrant_checkpoint(h.grad_fn):
            raise RuntimeError(
                "fimhooks: the model uses torch.utils.checkpoint with use_reentrant=True, "
                "whose layers no per-input backward pass reaches. Use "
                "checkpoint(..., use_reentrant=False) (Hugging Face: "
                "gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                '{"use_reentrant": False})).'
            )
        generator = torch.Generator(h.device).manual_seed(self.seed + _VERIFICATION_SEED)
        draw, rows = verification_draw(positions, observed, generator)
        if not rows:
            return chain
        # autograd reaches no parameter of a BatchNorm layer with frozen statistics: its
        # monitor's backward takes the input branch only
        frozen = {id(p) for c in record.calls if c.statistics for p in c.module.parameters()}
        params = {
            n: p
            for n, p in self.model.named_parameters()
            if p.requires_grad and id(p) not in frozen
        }
        if not params:
            return chain
        truth = autograd_squares(h, self._to_output(h), draw, params)
        limit = tolerance([h.dtype] + [c.output.dtype for c in record.calls])  # (relative, eps)
        terms = frozenset({"I1"})
        if chain:
            errors = disagreements(self._chain_sums(chain, h, draw, terms, rows), truth, *limit)
            if not errors:
                self._verified.add(signature)
                return chain
            self._unchained.add(signature)
            self._warn_once(
                ("chain", signature),
                "the chain rules' per-input gradients disagree with autograd at "
                f"{describe(errors, self._layer_of.get)}; this model takes the general path.",
            )
        self._axes[signature] = batch_axes(
            h, self._to_output(h), positions, observed, record.calls, generator
        )
        uses = self._uses(record)
        errors = disagreements(self._general_sums(record, uses, draw, terms, rows), truth, *limit)
        own_rules = {
            c.path: c.module
            for name in errors
            for c, local in uses.get(name, ())
            if per_input_rule(c, [local]) is not generic_grads
        }
        if own_rules:
            self._generic_paths.update(own_rules)
            named = ", ".join(f"'{p}' ({type(m).__name__})" for p, m in own_rules.items())
            self._warn_once(
                ("generic", tuple(own_rules)),
                f"the per-input gradients of layer {named} disagree with autograd "
                f"({describe(errors, self._layer_of.get)}); the generic rule replays it.",
            )
            uses = self._uses(record)
            sums = self._general_sums(record, uses, draw, terms, rows)
            errors = disagreements(sums, truth, *limit)
        if errors:
            raise RuntimeError(
                "fimhooks: the per-input gradients of "
                f"{describe(errors, self._layer_of.get)} (relative errors) disagree with "
                "autograd on the same inputs, so their Fisher estimates would be wrong. "
                "fimhooks needs every input's output to depend on that input only, and "
                "the batch axis of the model's inputs: pass batch_axis=1 for "
                "sequence-first [T, N, ...] inputs. Otherwise leave these parameters out "
                "(requires_grad=False)."
            )
        self._verified.add(signature)
        return None

    def _to_output(self, h: Tensor) -> Callable:
        """``[D, N, T, C]`` vectors in the layout of the output ``h``."""
        return lambda g: to_output_layout(g, h, self.likelihood, self._class_axis)

    def _chain_sums(self, chain, h, draw, terms=None, rows=None) -> Dict[str, BatchSums]:
        """The fast path for chains of supported layers (BackPACK's module derivatives)."""
        layers = [(c.module, c.inputs[0], c.output) for c in chain]
        rules = [spec_for(c.module).chain_rule(c.module) for c in chain]
        draw = draw.to(h.dtype)  # the chain computes in the model's precision
        kappa, kronecker = self.likelihood.kappa, self._kronecker and terms is None
        terms, budget = terms or self._terms, self._budget
        sums = chain_batch_sums(layers, rules, h, draw, kappa, terms, kronecker, budget, rows)
        names = self._param_names  # read at the forward pass; later parameters had no use
        return {names[key]: value for key, value in sums.items() if key in names}

    def _general_sums(self, record, uses, draw, terms, rows=None) -> Dict[str, BatchSums]:
        """Any graph: directions backpropagated by autograd (``general``)."""
        for call in {id(c): c for u in uses.values() for c, _ in u}.values():
            names = [local for u in uses.values() for c, local in u if c is call]
            if per_input_rule(call, names) is generic_grads:
                self._generic_layers[call.path] = None
                reason = random_inside(call.module)
                if reason:
                    raise RuntimeError(
                        f"fimhooks: layer '{call.path}' ({type(call.module).__name__}) is "
                        f"replayed one input at a time, but {reason}; set that dropout to 0 "
                        "or call model.eval() while collecting."
                    )
        h = record.output
        kappa = self.likelihood.kappa
        return general_batch_sums(
            h, self._to_output(h), draw, uses, kappa, terms, self._budget, rows
        )

    def _uses(self, record: ForwardRecord) -> dict:
        """``{parameter name: [(call, name inside the called module), ...]}``."""
        calls_at: Dict[str, list] = {}
        for call in _per_input_calls(record, self._axes.get(record.signature)):
            if call.path in self._generic_paths:
                call = dataclasses.replace(call, generic=True)
            if call.module is self.model and self.batch_axis:
                call = dataclasses.replace(call, input_axis=self.batch_axis)
            calls_at.setdefault(call.path, []).append(call)
        uses = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            found, called = [], False
            # a parameter set after this forward pass has no use in its graph
            for path, local in self._declared.get(id(param), ()):
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

    def _check_no_curvature(self, record: ForwardRecord, uses: dict) -> None:
        """Î₂ on the general path: only where it equals exact.

        Elsewhere a clear error, or, where ``"I2"`` came with the default estimators, the
        others without it and one notice saying why.
        """
        reason = _curvature_needed(record, uses)
        if reason is None:
            return
        if not self._default_estimators:
            raise RuntimeError(f"fimhooks: 'I2' needs {reason}. Use estimators=('I1', 'exact').")
        self.estimators = tuple(e for e in self.estimators if e != "I2")
        self._terms = terms_for(self.estimators, self.bounds)
        self._warn_once(
            "I2",
            f"'I2' is left out of the default estimators on this model: it needs {reason}. "
            f"Collecting {self.estimators}; pass estimators=('I1', 'exact') to say so.",
        )

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        if self._distributed:  # each rank its own draws, restored by the block count alone
            self._draws += 1
            seed = rank_seed(self.seed, self._rank, self._entries, self._draws)
            self._generators[device].manual_seed(seed)
        return self._generators[device]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"fimhooks: {message}", RuntimeWarning, stacklevel=4)

    # --- public API ----------------------------------------------------------------

    @property
    def is_main_process(self) -> bool:
        """Whether this is rank 0 (or no process group): the one that logs and shows."""
        return self._rank == 0

    @property
    def backward_passes(self) -> int:
        """``with monitor:`` blocks entered so far."""
        return self._entries

    def estimates(self) -> FisherEstimates:
        """A detached snapshot of the running estimates."""
        return self._estimates({n: acc.copy() for n, acc in self._accumulators.items()})

    def live_estimates(self) -> FisherEstimates:
        """The running estimates without a copy: read them before the next step."""
        return self._estimates(self._accumulators)

    def _estimates(self, accumulators) -> FisherEstimates:
        return FisherEstimates(
            accumulators,
            layer_of=self._layer_of,
            estimators=self.estimators,
            layer_types={path: type(m).__name__ for path, m in self.model.named_modules()},
            exact_pass=self._exact_pass,
            bounds=self.bounds,
            block_errors=self.block_errors,
            num_outputs=self._num_outputs,
            skipped=self.skipped,
            generic_layers=tuple(self._generic_layers),
        )

    def progress(self, iterable, **tqdm_options):
        """Iterate under a tqdm bar showing Fisher traces and the worst relative error.

        ``for x, y in monitor.progress(loader): ...``; the postfix is refreshed on
        collected steps only. Under ``torch.distributed`` only rank 0 shows the bar.
        """
        if not self.is_main_process:
            tqdm_options = {**tqdm_options, "disable": True}
        return progress(self, iterable, **tqdm_options)

    def log_to(self, target, writer=None, *, target_rse: float = DEFAULT_TARGET) -> FisherLog:
        """Log one JSON line per collected step to ``target`` (a path or a text file).

        Args:
            target: Path of the JSON-lines file (overwritten) or an open text file;
                under ``torch.distributed`` only rank 0 writes it.
            writer: Optional ``torch.utils.tensorboard.SummaryWriter`` for the same scalars.
            target_rse: Relative standard error that the logged guidance aims at.

        Returns:
            The log; ``close()`` it to stop logging. Schema: ``fimhooks.show.jsonlog``.
        """
        self._check_attached("log_to")
        if not self.is_main_process:  # under torch.distributed rank 0 alone writes
            return FisherLog(self, None, None, target_rse)
        log = FisherLog(self, target, writer, target_rse)
        self._listeners.append(log)
        return log

    def start(self) -> "FisherMonitor":
        """Collect without ``with`` blocks, for training loops you do not own.

        Until ``stop()``, every backward pass through the model's output counts as one
        ``with monitor:`` block (``every`` applies), collected when it reaches the output.
        Forward hooks stay on for every step while started, so that each backward is
        counted.

        Returns:
            The monitor.
        """
        self._check_attached("start")
        if self._inside:
            raise RuntimeError("start() inside a `with monitor:` block: use one or the other.")
        self._started = True
        self._set_hooks(True)
        return self

    def stop(self) -> None:
        """End ``start()``: collect inside ``with monitor:`` blocks only."""
        self._started, self._started_mask = False, None
        self._set_hooks(self._armed)

    @property
    def removed(self) -> bool:
        """Whether ``remove()`` was called: the monitor collects nothing any more."""
        return self._removed

    def _check_attached(self, what: str) -> None:
        if self._removed:
            raise RuntimeError(
                f"{what}: this FisherMonitor was removed and collects nothing; create a new "
                "monitor."
            )

    def collect_kronecker_factors(self) -> None:
        """Also collect the Kronecker factors of Linear layers on chains (for KFAC).

        ``estimates().kronecker_factors(kind)`` then returns them, averaged like the
        estimates. Layers on the general path have none.
        """
        self._kronecker = True

    def reset(self) -> None:
        """Forget all collected statistics (hooks stay attached)."""
        self._accumulators = {}
        self.skipped = 0

    def remove(self) -> None:
        """Remove all hooks and leave the model exactly as it was."""
        self._set_hooks(False)
        self._removed = True
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]
        self._records, self._recording = [], None

    def state_dict(self) -> dict:
        """Statistics, schedule, sampler state and the parameters they belong to.

        Everything needed to resume exactly, also in a monitor on another device.
        """
        return {
            "options": self._options(),
            "parameters": self._parameter_shapes(),
            "entries": self._entries,
            "skipped": self.skipped,
            "collected_steps": self.collected_steps,
            "num_outputs": self._num_outputs,
            "accumulators": {n: a.state_dict() for n, a in self._accumulators.items()},
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict`` of a monitor with the same options and parameters.

        Raises:
            ValueError: naming what differs, before anything is restored: a missing key, an
                option (likelihood, ``sigma``, ...), the parameters' names and shapes, or
                statistics of another parameter or shape.
        """
        _check_state(state)
        saved = {"batchnorm": bn.REFUSE, **state["options"]}  # states from before the option
        options = self._options()
        without_i2 = [e for e in options["estimators"] if e != "I2"]
        if self._default_estimators and saved.get("estimators") == without_i2:
            options["estimators"] = without_i2  # the saving monitor left 'I2' out
        if saved != options:
            raise ValueError(
                f"state_dict was saved with options {saved}, this monitor has {options}."
            )
        if state["parameters"] != self._parameter_shapes():
            saved, here = state["parameters"], self._parameter_shapes()
            differ = sorted(k for k in saved.keys() | here.keys() if saved.get(k) != here.get(k))
            raise ValueError(
                "state_dict was saved for a model with other parameters; they differ at "
                f"{differ[:5]} (name: saved shape vs this model's: "
                f"{[(k, saved.get(k), here.get(k)) for k in differ[:3]]})."
            )
        self.estimators = tuple(options["estimators"])
        self._terms = terms_for(self.estimators, self.bounds)
        self._entries = state["entries"]
        if not self._removed:
            self._set_hooks(self._armed)
        self.skipped = state["skipped"]
        self.collected_steps = state["collected_steps"]
        self._num_outputs = state["num_outputs"]
        params = dict(self.model.named_parameters())
        self._accumulators = {
            name: RunningDiagonal.from_state_dict(acc_state).to(params[name].device)
            for name, acc_state in state["accumulators"].items()
        }
        for device, gen_state in state["generators"].items():
            if _available(torch.device(device)):
                self._generator(torch.device(device)).set_state(gen_state.cpu())
            else:
                warnings.warn(
                    f"fimhooks: the state_dict holds the label sampler of device {device}, "
                    "which this machine does not have; label draws on other devices start "
                    "from the monitor's seed.",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def _parameter_shapes(self) -> Dict[str, list]:
        return {n: list(p.shape) for n, p in self.model.named_parameters() if p.requires_grad}

    def _options(self) -> dict:
        return {
            "likelihood": self.likelihood.name,
            "sigma": getattr(self.likelihood, "sigma", None),
            "mc_samples": self.mc_samples,
            "every": self.every,
            "ema_decay": self.ema_decay,
            "estimators": list(self.estimators),
            "batchnorm": self.batchnorm,
            "bounds": self.bounds,
            "block_errors": self.block_errors,
        }


class _Block:
    """A ``with monitor(mask=...):`` block: the monitor's own, with its options.

    Args:
        enter: The monitor's ``_enter``.
        exit: Its ``__exit__``.
        mask: The block's mask.
    """

    def __init__(self, enter: Callable, exit: Callable, mask: Optional[Tensor]):
        self._enter, self._exit, self._mask = enter, exit, mask

    def __enter__(self) -> "FisherMonitor":
        return self._enter(self._mask)

    def __exit__(self, exc_type, exc, tb) -> bool:
        return self._exit(exc_type, exc, tb)


class _Hook:
    """Calls a method of the monitor, which it does not keep alive.

    Copies of the model (``copy.deepcopy``, ``torch.save``) get an inert hook instead: they
    are not watched, and carry no hidden copy of the monitor.
    """

    def __init__(self, monitor: "FisherMonitor", method: str):
        self._monitor, self._method = weakref.ref(monitor), method

    def __call__(self, *args, **kwargs):
        monitor = self._monitor()
        return None if monitor is None else getattr(monitor, self._method)(*args, **kwargs)

    def __deepcopy__(self, memo) -> "_Inert":
        return _Inert()

    def __reduce__(self):
        return (_Inert, ())


class _Inert:
    """The hook a copy of a watched model carries: it does nothing."""

    def __call__(self, *args, **kwargs) -> None:
        return None


#: Offset of the seed of the verification's directions from the label sampler's.
_VERIFICATION_SEED = 7919


def _inside_transform() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ...) is running."""
    return torch._C._functorch.maybe_current_level() is not None


#: The monitor attached to each model (one at a time).
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, FisherMonitor]" = weakref.WeakKeyDictionary()


def _available(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    module = getattr(torch, device.type, None)
    return bool(module is not None and module.is_available())


def _check_options(mc_samples, every, ema_decay, output) -> None:
    if not (isinstance(mc_samples, int) and mc_samples >= 1):
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}.")
    if not (isinstance(every, int) and every >= 1):
        raise ValueError(f"every must be a positive integer, got {every!r}.")
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise ValueError(f"ema_decay must be None or in (0, 1), got {ema_decay!r}.")
    if output is not None and not callable(output):
        raise TypeError(f"output must be a callable, got {type(output).__name__}.")


#: Keys of ``FisherMonitor.state_dict()`` and of each accumulator's state in it.
_STATE_KEYS = (
    "options", "parameters", "entries", "skipped", "collected_steps", "num_outputs",
    "accumulators", "generators",
)  # fmt: skip
_ACCUMULATOR_KEYS = (
    "ema_decay", "mc_samples", "num_inputs", "num_steps", "single_input_steps", "stats",
    "aliases",
)  # fmt: skip


def _check_state(state) -> None:
    """A clear error, naming the key, for a state that ``state_dict()`` did not make."""
    if not isinstance(state, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state).__name__}.")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ValueError(
            f"state_dict has no {missing}: pass what FisherMonitor.state_dict() returned."
        )
    shapes = state["parameters"]
    for name, acc in state["accumulators"].items():
        if name not in shapes:
            raise ValueError(
                f"state_dict['accumulators'] holds statistics of parameter '{name}', which "
                "is not among its parameters."
            )
        missing = [k for k in _ACCUMULATOR_KEYS if k not in acc]
        if missing:
            raise ValueError(f"state_dict['accumulators']['{name}'] has no {missing}.")
        for key, value in acc["stats"].items():
            if not isinstance(value, Tensor) or (value.dim() and list(value.shape) != shapes[name]):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"state_dict['accumulators']['{name}']['stats']['{key}'] has shape "
                    f"{shape}; parameter '{name}' has shape {tuple(shapes[name])}."
                )


def _check_estimators(estimators: Iterable[str]) -> tuple:
    estimators = tuple(estimators)
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if not estimators or unknown or len(set(estimators)) != len(estimators):
        raise ValueError(
            f"estimators must be distinct names among {ESTIMATORS}, got {estimators!r}."
        )
    return estimators


def _curvature_needed(record: ForwardRecord, uses: dict) -> Optional[str]:
    """Why Î₂ would need curvature that the general path does not follow, or ``None``."""
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


def _per_input_calls(record: ForwardRecord, axes: Optional[dict] = None) -> list:
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


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _declarations(model: nn.Module) -> Dict[int, list]:
    """``{id(parameter): [(path of a module declaring it, local name), ...]}``."""
    declared: Dict[int, list] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for local, param in module.named_parameters(recurse=False):
            entry = declared.setdefault(id(param), [])
            if (path, local) not in entry:
                entry.append((path, local))
    return declared


def _chain_leaves(model, leaves: dict, declared: dict) -> Optional[Dict[int, nn.Module]]:
    """Leaves by id when the fast chain path may apply, else ``None``.

    It needs supported layers only, each parameter declared once, and no module holding
    parameters of its own besides the leaves.
    """
    if not all(spec_for(m).chain_rule(m) is not None for m in leaves.values()):
        return None
    if any(len(d) > 1 for d in declared.values()):
        return None
    if any(list(m.parameters(recurse=False)) for m in model.modules() if list(m.children())):
        return None
    return {id(m): m for m in leaves.values()}


def _check_not_extended(model: nn.Module) -> None:
    for path, module in model.named_modules():
        if getattr(module, "_backpack_extend", False):
            raise ValueError(
                f"layer '{path}' was extended with backpack.extend(); fimhooks installs "
                "its own hooks: pass a model that was not extended."
            )


def _busy(monitor: "weakref.ref[FisherMonitor]") -> bool:
    """Whether the monitor runs its own backward pass now."""
    return monitor() is not None and monitor()._busy


def _forget_io(module: nn.Module) -> None:
    for attr in ("input0", "output"):
        if attr in vars(module):
            delattr(module, attr)
