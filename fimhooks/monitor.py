"""``FisherMonitor``: attaches to a model and collects diagonal Fisher estimates online.

The monitor holds the hooks, the ``with`` blocks and their schedule, and the public API.
What one backward pass computes is the engine's (``engine.collect``); the running
statistics are the store's (``engine.store``).
"""

from __future__ import annotations

import weakref
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fimhooks import checks
from fimhooks.distributed import rank_setup, unwrap
from fimhooks.engine import batchnorm as bn
from fimhooks.engine.backends import BACKEND_OPTIONS
from fimhooks.engine.collect import Collector, OnceWarnings, Sampler
from fimhooks.engine.handles import Block, Listening
from fimhooks.engine.memory import DEFAULT_MAX_MEMORY, Budget, check_max_memory
from fimhooks.engine.recorder import Recorder
from fimhooks.engine.recording import ForwardRecord
from fimhooks.engine.step import Step
from fimhooks.engine.store import ADDED, NOTICES, Store, check_state
from fimhooks.engine.structure import ModelStructure
from fimhooks.engine.verification import OPTIONS as VERIFY_OPTIONS
from fimhooks.estimates import DEFAULT_TARGET, FisherEstimates
from fimhooks.fisher.granularity import GRANULARITIES
from fimhooks.fisher.likelihoods import likelihood_from
from fimhooks.fisher.quantities import DEFAULT_ESTIMATORS, without_curvature
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
        granularity: Where Î₁ squares the score (docs/math.md §7d): ``"token"`` once per
            observation; ``"input"`` once per input, the square of its score summed over
            its positions divided by their number: the same Fisher, with more label noise
            (reported), for one backward per draw instead of one per position. Outputs
            with one observation per input give the same numbers either way. ``"batch"``:
            once per step, the batch's score (one backward of the sampled-label loss, no
            per-input tensor): ``"I1"`` only (its default), without a data variance.
            ``"auto"`` (default): ``"input"``, or ``"token"`` where ``"EF"``, ``bounds``
            or ``block_errors`` are asked for (they are per observation); estimates name
            ``"token"`` where every input had one position.
        backend: ``"auto"`` (default): the chain backend where the forward pass is a chain
            of supported layers, else the general one; ``"general"``: always the general
            backend (any graph); ``"chain"``: the chain backend, an error where it does not
            apply.

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
        granularity: str = "auto",
        backend: str = "auto",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        model, process_group = unwrap(model, process_group)
        self.likelihood = likelihood_from(likelihood, sigma)
        default_estimators = estimators is None
        if estimators is None:  # one backward of the batch serves Î₁ alone
            estimators = ("I1",) if granularity == "batch" else DEFAULT_ESTIMATORS
        estimators = checks.check_estimators(estimators)
        choices = {
            "verify": (verify, VERIFY_OPTIONS),
            "batchnorm": (batchnorm, bn.OPTIONS),
            "backend": (backend, BACKEND_OPTIONS),
            "granularity": (granularity, ("auto",) + GRANULARITIES),
        }
        checks.check_options(mc_samples, every, ema_decay, output, batch_axis, choices)
        check_max_memory(max_memory)
        self.model, self.mc_samples = model, mc_samples
        self.every, self.ema_decay = every, ema_decay
        self.batchnorm, self.max_memory, self.batch_axis = batchnorm, max_memory, batch_axis
        self.verify, self.backend, self.granularity = verify, backend, granularity
        self.bounds, self.block_errors = bool(bounds), bool(block_errors)
        self.seed = torch.initial_seed() if seed is None else int(seed)
        checks.check_not_extended(model)
        bn.check_model(self.model, self.batchnorm)
        checks.check_not_watched(model, _ATTACHED)
        loss_reduction = getattr(likelihood, "reduction", None)
        checks.check_empirical(estimators, self.likelihood, loss_reduction)
        extras = {"bounds": bounds, "block_errors": block_errors}
        self._granularity = checks.resolve_granularity(granularity, estimators, extras)
        checks.check_granularity(estimators, self._granularity, backend, extras)
        self._sampler, self._warn = Sampler(self.seed), OnceWarnings()
        self._recorder = Recorder(model, output, batchnorm, self._on_output_grad)
        self._collector = Collector(
            model, self._recorder.structure, self.likelihood,
            class_axis=1 if isinstance(likelihood, nn.CrossEntropyLoss) else -1,
            loss_reduction=loss_reduction, estimators=estimators,
            default_estimators=default_estimators, mc_samples=mc_samples, bounds=self.bounds,
            block_errors=self.block_errors, batchnorm=batchnorm, verify=verify,
            batch_axis=batch_axis, backend=backend, budget=Budget(max_memory),
            sampler=self._sampler, warn=self._warn, granularity=self._granularity,
        )  # fmt: skip
        for option, value in (("bounds", bounds), ("block_errors", block_errors)):
            if value and not self._collector.exact_pass:
                raise ValueError(
                    f"{option}=True needs the exact pass (the output Jacobian's C directions): "
                    f"include 'exact' or 'I2' in estimators, got {estimators!r}."
                )
        self._store, self._step = Store(ema_decay, mc_samples), Step()
        self._entries = 0
        self._collecting = self._inside = self._removed = self._started = False
        self._listeners: List[Callable] = []
        self._mask = self._started_mask = None
        self._rank, self._sampler.rank_seed, self._reducer = rank_setup(
            model, process_group, self.seed, sync
        )
        self._recorder.set_hooks(True)
        _ATTACHED[model] = self

    # --- the context manager -------------------------------------------------------

    def __call__(self, *, mask: Optional[Tensor] = None) -> Block:
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
        return Block(self._enter, self.__exit__, mask)

    def __enter__(self) -> "FisherMonitor":
        return self._enter(None)

    def _enter(self, mask: Optional[Tensor]) -> "FisherMonitor":
        self._check_attached("with monitor")
        if self._inside:
            raise RuntimeError("`with monitor:` blocks cannot be nested.")
        if self._armed:
            bn.check_model(self.model, self.batchnorm)
        self._mask = mask
        self._inside = self._recorder.keep_all = True
        self._collecting = self._armed
        self._entries += 1
        self._step = Step()
        self._sampler.begin(self._entries)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._inside = self._recorder.keep_all = False
        try:
            if self._collecting and not self._removed:  # removed inside: nothing collected
                if exc_type is None:
                    self._commit()
                elif self._reducer is not None:  # the other ranks wait for this one
                    self._reducer.reduce(self._step, failed=True)
        finally:
            self._collecting, self._step, self._mask = False, Step(), None
            self._recorder.clear()
            if not self._removed:
                self._recorder.set_hooks(self._armed or self._started)
        return False

    @property
    def _armed(self) -> bool:
        """Whether the next (or current) ``with`` block collects."""
        return self._entries % self.every == 0

    def _commit(self) -> None:
        step = self._step
        if self._reducer is not None:  # the sums of all ranks' inputs, on every rank
            step = self._reducer.reduce(step)
        outcome = self._store.commit(step)
        if outcome in NOTICES:
            self._warn(outcome, NOTICES[outcome])
        elif outcome == ADDED:
            for listener in list(self._listeners):
                listener(self)

    # --- hooks: they only move data -------------------------------------------------

    def structure(self) -> ModelStructure:
        """Paths, parameter names and watched modules of the model as it is now.

        Layers added after the monitor was built and parameters replaced (``load_state_dict
        (assign=True)``) are picked up before the next collected step's forward pass.
        """
        return self._recorder.structure()

    def _on_output_grad(self, record: Optional[ForwardRecord], grad: Tensor) -> None:
        """The backward pass reached the model output: collect before it goes further."""
        if self._started and not self._inside:  # start(): this backward is one block
            mask, self._started_mask = self._started_mask, None
            with Block(self._enter, self.__exit__, mask):
                self._take(record, grad)
            return
        self._take(record, grad)

    def _take(self, record: Optional[ForwardRecord], grad: Tensor) -> None:
        if not self._collecting:
            return
        if record is None:
            self._warn(
                "dropped",
                "a backward pass inside `with monitor:` went through a forward pass that "
                "the monitor no longer holds, and was not collected: outside the block only "
                "the latest forward pass is kept, so run each forward pass right before its "
                "backward pass (or both inside the block).",
            )
            return
        if record.consumed:
            return
        self._recorder.busy, record.consumed = True, True
        try:
            self._collector.collect(record, grad, self._mask, self._step)
        finally:
            self._recorder.busy = False

    # --- public API ----------------------------------------------------------------

    @property
    def estimators(self) -> tuple:
        """The estimators collected (the defaults may leave ``"I2"`` out, with a notice)."""
        return self._collector.estimators

    @property
    def skipped(self) -> int:
        """Collected steps skipped for a non-finite output or statistic."""
        return self._store.skipped

    @property
    def collected_steps(self) -> int:
        """Collected steps added to the statistics."""
        return self._store.collected_steps

    @property
    def is_main_process(self) -> bool:
        """Whether this is rank 0 (or no process group): the one that logs and shows."""
        return self._rank == 0

    @property
    def reducer(self):
        """The ``StepReducer`` summing collected steps over the ranks (``None``: no sync)."""
        return self._reducer

    @property
    def backward_passes(self) -> int:
        """``with monitor:`` blocks entered so far."""
        return self._entries

    @property
    def held_forward_passes(self) -> int:
        """Forward passes held for a backward pass (none between steps)."""
        return len(self._recorder.records)

    def estimates(self) -> FisherEstimates:
        """A detached snapshot of the running estimates."""
        return self._estimates(self._store.snapshot())

    def live_estimates(self) -> FisherEstimates:
        """The running estimates without a copy: read them before the next step."""
        return self._estimates(self._store.accumulators)

    def _estimates(self, accumulators) -> FisherEstimates:
        return FisherEstimates(
            accumulators,
            layer_of=self.structure().layer_of,
            estimators=self.estimators,
            layer_types={path: type(m).__name__ for path, m in self.model.named_modules()},
            exact_pass=self._collector.exact_pass,
            label_noise=self._collector.label_noise,
            granularity=self._granularity_used(),
            bounds=self.bounds,
            block_errors=self.block_errors,
            num_outputs=self._store.num_outputs,
            positions_per_input=self._store.positions_per_input,
            skipped=self.skipped,
            generic_layers=self._collector.generic_layers,
        )

    def _granularity_used(self) -> str:
        """Where Î₁ squared the score: ``"auto"`` resolved, ``"token"`` if no input had positions."""
        single = self._store.positions_per_input <= 1
        return "token" if self.granularity == "auto" and single else self._granularity

    def progress(self, iterable, **tqdm_options):
        """Iterate under a tqdm bar showing Fisher traces and the worst relative error.

        ``for x, y in monitor.progress(loader): ...``; the postfix is refreshed on
        collected steps only. Under ``torch.distributed`` only rank 0 shows the bar.
        """
        if not self.is_main_process:
            tqdm_options = {**tqdm_options, "disable": True}
        return progress(self, iterable, **tqdm_options)

    def add_listener(self, listener: Callable) -> Listening:
        """Call ``listener(monitor)`` after each collected step.

        Returns:
            A handle; ``remove()`` it to stop.
        """
        self._listeners.append(listener)
        return Listening(self._listeners, listener)

    def log_to(self, target, writer=None, *, target_rse: float = DEFAULT_TARGET) -> FisherLog:
        """Log one JSON line per collected step to ``target`` (a path or a text file).

        Args:
            target: Path of the JSON-lines file (overwritten) or an open text file;
                under ``torch.distributed`` only rank 0 writes it.
            writer: Optional ``torch.utils.tensorboard.SummaryWriter`` for the same scalars.
            target_rse: Relative standard error that the logged guidance aims at.

        Returns:
            The log; ``close()`` it (or ``remove()``) to stop logging. Schema:
            ``fimhooks.show.jsonlog``.
        """
        self._check_attached("log_to")
        if not self.is_main_process:  # under torch.distributed rank 0 alone writes
            return FisherLog(self, None, None, target_rse)
        log = FisherLog(self, target, writer, target_rse)
        log.listening = self.add_listener(log)
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
        self._recorder.set_hooks(True)
        return self

    def stop(self) -> None:
        """End ``start()``: collect inside ``with monitor:`` blocks only."""
        self._started, self._started_mask = False, None
        self._recorder.set_hooks(self._armed)

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
        self._collector.kronecker = True

    def reset(self) -> None:
        """Forget all collected statistics (hooks stay attached)."""
        self._store.reset()

    def remove(self) -> None:
        """Remove all hooks and leave the model exactly as it was."""
        self._recorder.set_hooks(False)
        self._removed = True
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]
        self._recorder.clear()

    def state_dict(self) -> dict:
        """Statistics, schedule, sampler state and the parameters they belong to.

        Everything needed to resume exactly, also in a monitor on another device.
        """
        return {
            "options": self._options(),
            "parameters": self._parameter_shapes(),
            "entries": self._entries,
            **self._store.state_dict(),
            "generators": self._sampler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict`` of a monitor with the same options and parameters.

        Raises:
            ValueError: naming what differs, before anything is restored: a missing key, an
                option (likelihood, ``sigma``, ...), the parameters' names and shapes, or
                statistics of another parameter or shape.
        """
        options = self._options()
        if self._collector.default_estimators:  # the saving monitor may have left 'I2' out
            dropped = list(without_curvature(options["estimators"]))
            if isinstance(state, dict) and state.get("options", {}).get("estimators") == dropped:
                options["estimators"] = dropped
        check_state(state, options, self._parameter_shapes())
        self._collector.set_estimators(tuple(options["estimators"]))
        self._entries = state["entries"]
        if not self._removed:
            self._recorder.set_hooks(self._armed)
        devices = {name: p.device for name, p in self.model.named_parameters()}
        self._store.load_state_dict(state, devices)
        self._sampler.load_state_dict(state["generators"])

    def _parameter_shapes(self) -> dict:
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
            "granularity": self.granularity,
        }


#: The monitor attached to each model (one at a time).
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, FisherMonitor]" = weakref.WeakKeyDictionary()
