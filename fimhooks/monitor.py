"""``FisherMonitor``: attaches to a model and collects diagonal Fisher estimates online."""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from fimhooks.diagonal_terms import BatchSums
from fimhooks.estimates import DEFAULT_TARGET, FisherEstimates
from fimhooks.extension import LOSSES, SAVEFIELD, SUPPORTED_MODULES, FisherExtension
from fimhooks.jsonlog import FisherLog
from fimhooks.likelihoods import likelihood_from_loss
from fimhooks.progress import progress
from fimhooks.running import ESTIMATORS, RunningDiagonal

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class FisherMonitor:
    """Running diagonal Fisher estimates Î₁, Î₂ and exact, with their variances.

    Use it around the ordinary backward pass of a training step::

        monitor = FisherMonitor(model, loss_fn)
        loss = loss_fn(model(x), y)
        with monitor:
            loss.backward()
        est = monitor.estimates()

    Labels for Î₁ and Î₂ are drawn from the model (the batch's labels are never used), and
    all numbers are per observation, independent of the loss's reduction and batch size.
    ``p.grad`` is left exactly as without the monitor.

    Args:
        model: The network; its leaves must be supported layers (checked here).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.BCEWithLogitsLoss`` or ``nn.MSELoss``.
        sigma: Gaussian noise level; only with ``nn.MSELoss`` (default 1).
        mc_samples: Label draws per input (``M``).
        every: Collect on every ``every``-th backward pass inside ``with monitor:``.
        ema_decay: ``None`` for the cumulative average, or ``β`` in ``(0, 1)`` for a
            bias-corrected exponential moving average.
        estimators: Which of ``"I1", "I2", "exact"`` to compute; fewer is cheaper. The
            closed-form variance of Î₁ and the data variance need ``"exact"`` or ``"I2"``.
        seed: Seed of the monitor's own label sampler (default: ``torch.initial_seed()``),
            so collecting never changes the user's random number stream.

    Raises:
        ValueError: for an unsupported loss or layer (with its path), BatchNorm in
            training mode, or invalid options.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        *,
        sigma: Optional[float] = None,
        mc_samples: int = 1,
        every: int = 1,
        ema_decay: Optional[float] = None,
        estimators: Sequence[str] = ESTIMATORS,
        seed: Optional[int] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        self.likelihood = likelihood_from_loss(loss_fn, sigma)
        self.estimators = _check_estimators(estimators)
        if not (isinstance(mc_samples, int) and mc_samples >= 1):
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}.")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a positive integer, got {every!r}.")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be None or in (0, 1), got {ema_decay!r}.")
        self.model, self.loss_fn = model, loss_fn
        self.mc_samples, self.every, self.ema_decay = mc_samples, every, ema_decay
        self.seed = torch.initial_seed() if seed is None else int(seed)
        self._leaves = _supported_leaves(model)
        _check_batchnorm(self._leaves)
        _check_unshared(self._leaves)
        self._param_names = {id(p): name for name, p in model.named_parameters()}
        self._layer_of = {
            f"{path}.{local}" if path else local: path
            for path, module in self._leaves.items()
            for local, _ in module.named_parameters(recurse=False)
        }
        self._extension = FisherExtension(
            self.likelihood, _terms(self.estimators), mc_samples, self._generator
        )
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._handles = []
        self._inplace = []
        self._accumulators: Dict[str, RunningDiagonal] = {}
        self.skipped = 0
        self._entries = 0
        self._collecting = False
        self._inside = False
        self._removed = False
        self._num_outputs = 1
        self.collected_steps = 0
        self._listeners: List[Callable] = []
        self._pending: Dict[str, BatchSums] = {}
        self._warned = set()
        self._reused = set()
        self._switch_inplace_off()
        self._set_hooks(True)

    # --- the context manager -------------------------------------------------------

    def __enter__(self) -> "FisherMonitor":
        if self._removed:
            raise RuntimeError("this FisherMonitor was removed; create a new one.")
        if self._inside:
            raise RuntimeError("`with monitor:` blocks cannot be nested.")
        if self._armed:
            _check_batchnorm(self._leaves)
        self._inside = True
        self._collecting = self._armed
        self._entries += 1
        if self._collecting:
            self._extension.reset()
            self._pending = {}
            self._warning_filter = warnings.catch_warnings()
            self._warning_filter.__enter__()
            # Expected for the first layer (its input needs no gradient); harmless here.
            warnings.filterwarnings("ignore", message="Full backward hook is firing when")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._inside = False
        if self._collecting:
            self._collecting = False
            self._warning_filter.__exit__(exc_type, exc, tb)
            self._cleanup_io()
            context = self._extension.context
            self._extension.reset()
            if exc_type is None:
                self._commit(context)
            self._pending = {}
        self._set_hooks(self._armed)
        return False

    @property
    def _armed(self) -> bool:
        """Whether the next (or current) ``with`` block collects."""
        return self._entries % self.every == 0

    def _commit(self, context) -> None:
        if context is None or not self._pending:
            self._warn_once(
                "empty",
                "nothing was collected inside `with monitor:`: call backward on a loss "
                "computed with the monitored loss_fn inside the block.",
            )
            return
        totals = [t for batch in self._pending.values() for t in batch.totals()]
        if not torch.isfinite(torch.stack(totals)).all():
            self.skipped += 1
            self._warn_once(
                "nonfinite",
                "a collected batch had non-finite Fisher statistics and was skipped "
                "(counted in estimates().skipped); further skips are not warned about.",
            )
            return
        self._num_outputs = context.num_outputs
        for name, sums in self._pending.items():
            if name not in self._accumulators:
                self._accumulators[name] = RunningDiagonal(self.ema_decay, self.mc_samples)
            self._accumulators[name].update(sums, context.num_inputs)
        self.collected_steps += 1
        for listener in list(self._listeners):
            listener(self)

    # --- hooks: they only move data -------------------------------------------------

    def _switch_inplace_off(self) -> None:
        for module in self._leaves.values():
            if getattr(module, "inplace", False):
                module.inplace = False  # full backward hooks fail on in-place outputs
                self._inplace.append(module)

    def _set_hooks(self, on: bool) -> None:
        """Hooks exist only around collected steps, so other steps cost nothing extra."""
        if on and not self._handles:
            for module in self._hooked_modules():
                self._handles.append(module.register_forward_hook(self._store_io))
                self._handles.append(module.register_full_backward_hook(self._run_extension))
        elif not on:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def _store_io(self, module, inputs, output) -> None:
        if torch.is_grad_enabled():
            if "output" in vars(module):  # called again before its backward ran
                self._reused.add(module)
            for i, tensor in enumerate(inputs):
                setattr(module, f"input{i}", tensor)
            module.output = output

    def _run_extension(self, module, g_inp, g_out) -> None:
        if not self._collecting:  # a backward outside `with monitor:` used the forward
            _forget_io(module)
            return
        if self._extension.context is None and module is not self.loss_fn:
            raise RuntimeError(
                "fimhooks: the backward pass inside `with monitor:` does not start at the "
                f"monitored loss ({type(self.loss_fn).__name__}); compute the loss with "
                "the loss_fn given to FisherMonitor."
            )
        if module in self._reused:
            raise RuntimeError(
                f"fimhooks: layer '{self._path_of(module)}' ({type(module).__name__}) ran more than once in "
                "the forward pass before this backward; fimhooks needs one call per layer "
                "(use a separate module for each use, and do not repeat the forward pass)."
            )
        if not hasattr(module, "output"):
            raise RuntimeError(
                f"fimhooks: no forward pass was recorded for {type(module).__name__}; run "
                "the forward pass after creating the monitor and with gradients enabled."
            )
        if module is not self.loss_fn and not self._extension.has_quantity_for(module.output):
            raise RuntimeError(
                "fimhooks: nothing was propagated back to the output of layer "
                f"'{self._path_of(module)}'. "
                "The model's forward must pass each layer's output to the next supported "
                "layer (functional operations and copying reshapes in between are not "
                "supported), and the forward pass must not be repeated before backward."
            )
        self._extension(module, g_inp, g_out)
        for param in module.parameters(recurse=False):
            sums = getattr(param, SAVEFIELD, None)
            if sums is not None:
                self._pending[self._param_names[id(param)]] = sums
                delattr(param, SAVEFIELD)
        _forget_io(module)

    def _cleanup_io(self) -> None:
        for module in self._hooked_modules():
            _forget_io(module)
        self._reused = set()

    def _hooked_modules(self) -> List[nn.Module]:
        return list(self._leaves.values()) + [self.loss_fn]

    def _path_of(self, module: nn.Module) -> str:
        return next((p for p, m in self._leaves.items() if m is module), "loss")

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"fimhooks: {message}", RuntimeWarning, stacklevel=4)

    # --- public API ----------------------------------------------------------------

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
            layer_types={path: type(m).__name__ for path, m in self._leaves.items()},
            exact_pass=self._extension.exact_pass,
            num_outputs=self._num_outputs,
            skipped=self.skipped,
        )

    def progress(self, iterable, **tqdm_options):
        """Iterate under a tqdm bar showing Fisher traces and the worst relative error.

        ``for x, y in monitor.progress(loader): ...``; the postfix is refreshed on
        collected steps only.
        """
        return progress(self, iterable, **tqdm_options)

    def log_to(self, target, writer=None, *, target_rse: float = DEFAULT_TARGET) -> FisherLog:
        """Log one JSON line per collected step to ``target`` (a path or a text file).

        Args:
            target: Path of the JSON-lines file (overwritten) or an open text file.
            writer: Optional ``torch.utils.tensorboard.SummaryWriter`` for the same scalars.
            target_rse: Relative standard error that the logged guidance aims at.

        Returns:
            The log; ``close()`` it to stop logging. Schema: ``fimhooks.jsonlog``.
        """
        log = FisherLog(self, target, writer, target_rse)
        self._listeners.append(log)
        return log

    def reset(self) -> None:
        """Forget all collected statistics (hooks stay attached)."""
        self._accumulators = {}
        self.skipped = 0

    def remove(self) -> None:
        """Remove all hooks and leave model and loss exactly as they were."""
        self._set_hooks(False)
        self._removed = True
        for module in self._inplace:
            module.inplace = True
        self._inplace = []
        self._cleanup_io()
        for param in self.model.parameters():
            if hasattr(param, SAVEFIELD):
                delattr(param, SAVEFIELD)

    def state_dict(self) -> dict:
        """Statistics, schedule and sampler state, to restore the monitor exactly."""
        return {
            "options": self._options(),
            "entries": self._entries,
            "skipped": self.skipped,
            "accumulators": {n: a.state_dict() for n, a in self._accumulators.items()},
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict`` of a monitor with the same options."""
        if state["options"] != self._options():
            raise ValueError(
                f"state_dict was saved with options {state['options']}, "
                f"this monitor has {self._options()}."
            )
        self._entries = state["entries"]
        if not self._removed:
            self._set_hooks(self._armed)
        self.skipped = state["skipped"]
        self._accumulators = {
            name: RunningDiagonal.from_state_dict(acc_state)
            for name, acc_state in state["accumulators"].items()
        }
        for device, gen_state in state["generators"].items():
            self._generator(torch.device(device)).set_state(gen_state)

    def _options(self) -> dict:
        return {
            "likelihood": self.likelihood.name,
            "mc_samples": self.mc_samples,
            "every": self.every,
            "ema_decay": self.ema_decay,
            "estimators": list(self.estimators),
        }


def _check_estimators(estimators: Iterable[str]) -> tuple:
    estimators = tuple(estimators)
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if not estimators or unknown or len(set(estimators)) != len(estimators):
        raise ValueError(
            f"estimators must be distinct names among {ESTIMATORS}, got {estimators!r}."
        )
    return estimators


def _terms(estimators: tuple) -> frozenset:
    """Per-parameter terms to reduce (``diagonal_terms``) for the chosen estimators."""
    if set(estimators) == {"I1"}:
        return frozenset({"I1"})
    terms = {"exact"}
    if "I1" in estimators:
        terms |= {"I1", "v1"}
    if "I2" in estimators:
        terms |= {"I2", "v2"}
    return frozenset(terms)


def _supported_leaves(model: nn.Module) -> Dict[str, nn.Module]:
    """Leaf modules by path; raises for unsupported ones and for stray parameters."""
    leaves = {}
    for path, module in model.named_modules():
        children = list(module.children())
        if children:
            if list(module.parameters(recurse=False)):
                raise ValueError(
                    f"module '{path or '<model>'}' ({type(module).__name__}) holds "
                    "parameters directly and also has submodules; fimhooks supports "
                    "parameters only inside supported layers."
                )
            continue
        if isinstance(module, LOSSES):
            continue
        if not isinstance(module, SUPPORTED_MODULES):
            supported = ", ".join(sorted(cls.__name__ for cls in SUPPORTED_MODULES))
            raise ValueError(
                f"unsupported layer '{path or '<model>'}' ({type(module).__name__}). "
                f"fimhooks supports: {supported}."
            )
        if getattr(module, "_backpack_extend", False):
            raise ValueError(
                f"layer '{path}' was extended with backpack.extend(); fimhooks installs "
                "its own hooks: pass a model that was not extended."
            )
        leaves[path] = module
    return leaves


def _check_unshared(leaves: Dict[str, nn.Module]) -> None:
    """A parameter used by two layers has one score, not one per layer: not supported."""
    owner = {}
    for path, module in leaves.items():
        for local, param in module.named_parameters(recurse=False):
            if id(param) in owner:
                raise ValueError(
                    f"parameter '{path}.{local}' is shared with '{owner[id(param)]}'; "
                    "fimhooks supports parameters used by one layer only."
                )
            owner[id(param)] = f"{path}.{local}"


def _check_batchnorm(leaves: Dict[str, nn.Module]) -> None:
    for path, module in leaves.items():
        if isinstance(module, _BATCHNORM) and module.training:
            raise ValueError(
                f"BatchNorm layer '{path}' is in training mode: per-sample quantities are "
                "undefined there because each output depends on the whole batch. Put it "
                "in eval mode (module.eval()) while monitoring."
            )


def _forget_io(module: nn.Module) -> None:
    for attr in [a for a in vars(module) if a == "output" or a.startswith("input")]:
        if attr == "output" or attr[len("input") :].isdigit():
            delattr(module, attr)
