"""``Collector``: one backward pass through the model output, turned into a step's sums.

The flow, one way: the forward record and the output's gradient are checked; the label draw
is built in one call (``draw``); on a new model structure the rules are checked against
autograd (``verification``); the first backend of the registry that applies computes the
sums, which are added to the block's ``Step``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from fimhooks.engine import batchnorm as bn
from fimhooks.engine.backends import BatchBackend, StepPlan, backends, curvature_needed
from fimhooks.engine.graph import reentrant_checkpoint
from fimhooks.engine.memory import Budget
from fimhooks.engine.observations import (
    LabelDraw,
    data_residuals,
    draw_labels,
    position_mask,
    read_positions,
    to_output_layout,
    with_data_residuals,
)
from fimhooks.engine.recording import ForwardRecord
from fimhooks.engine.step import Step
from fimhooks.engine.verification import (
    autograd_squares,
    batch_axes,
    describe,
    disagreements,
    tolerance,
    verification_draw,
)
from fimhooks.fisher.granularity import with_cross_terms_between_inputs
from fimhooks.fisher.quantities import (
    CLOSED_FORM,
    DRAWS,
    ESTIMATOR_SPECS,
    any_needs,
    exact_pass,
    terms_for,
    without_curvature,
)


def available(device: torch.device) -> bool:
    """Whether this machine has ``device``."""
    if device.type == "cpu":
        return True
    module = getattr(torch, device.type, None)
    return bool(module is not None and module.is_available())


#: Offset of the seed of the verification's directions from the label sampler's.
VERIFICATION_SEED = 7919


class OnceWarnings:
    """``warn(key, message)`` warns once per key; ``silence(key)`` marks it as said."""

    def __init__(self):
        self.said = set()

    def __call__(self, key, message: str) -> None:
        """Warn with ``message`` unless ``key`` was said."""
        if key not in self.said:
            self.said.add(key)
            warnings.warn(f"fimhooks: {message}", RuntimeWarning, stacklevel=5)

    def silence(self, key) -> None:
        """Mark ``key`` as said, without a warning."""
        self.said.add(key)


@dataclasses.dataclass
class Sampler:
    """The monitor's own label generators, one per device.

    Under ``torch.distributed`` each rank draws from its own seed, derived from the block
    count and the draws in the block, so that a restored monitor draws the same labels.
    """

    seed: int
    rank_seed: Optional[Callable[[int, int], int]] = None  # (block, draw) -> seed
    generators: Dict[torch.device, torch.Generator] = dataclasses.field(default_factory=dict)
    block: int = 0
    draws: int = 0

    def begin(self, block: int) -> None:
        """A new ``with`` block: its draws start from its count."""
        self.block, self.draws = block, 0

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator of ``device``, seeded for the next draw."""
        if device not in self.generators:
            self.generators[device] = torch.Generator(device).manual_seed(self.seed)
        if self.rank_seed is not None:
            self.draws += 1
            self.generators[device].manual_seed(self.rank_seed(self.block, self.draws))
        return self.generators[device]

    def state_dict(self) -> dict:
        """``{device: generator state}``."""
        return {str(d): g.get_state() for d, g in self.generators.items()}

    def load_state_dict(self, states: dict) -> None:
        """Restore the generators of the devices this machine has (a warning for others)."""
        for device, state in states.items():
            if available(torch.device(device)):
                self.generator(torch.device(device)).set_state(state.cpu())
            else:
                warnings.warn(
                    f"fimhooks: the state_dict holds the label sampler of device {device}, "
                    "which this machine does not have; label draws on other devices start "
                    "from the monitor's seed.",
                    RuntimeWarning,
                    stacklevel=3,
                )


class Collector:
    """Checks, draws and computes one backward pass's sums for the watched model.

    Args:
        model: The watched model.
        structure: Returns the model's structure as it is now.
        likelihood: The likelihood (``likelihoods``).
        class_axis: The output's class axis (``1`` for ``nn.CrossEntropyLoss``'s layout).
        loss_reduction: The loss module's reduction, where one was given (for ``"EF"``).
        estimators: The estimators asked for.
        default_estimators: Whether they are the defaults (``"I2"`` may then be left out).
        mc_samples, bounds, block_errors, batchnorm, verify, batch_axis, backend,
            granularity: The monitor's options of those names.
        budget: Memory for a step's extra tensors.
        sampler: The label generators.
        warn: Warns once per key (``OnceWarnings``).
    """

    def __init__(
        self, model: nn.Module, structure: Callable, likelihood, class_axis: int,
        loss_reduction: Optional[str], estimators: tuple, default_estimators: bool,
        mc_samples: int, bounds: bool, block_errors: bool, batchnorm: str, verify: str,
        batch_axis: int, backend: str, budget: Budget, sampler: Sampler, warn: Callable,
        granularity: str = "token",
    ):  # fmt: skip
        self.model, self.likelihood, self.class_axis = model, likelihood, class_axis
        self.loss_reduction, self.default_estimators = loss_reduction, default_estimators
        self.mc_samples, self.bounds, self.block_errors = mc_samples, bounds, block_errors
        self.batchnorm, self.verify, self.backend = batchnorm, verify, backend
        self.granularity = granularity
        self.budget, self.sampler, self.warn = budget, sampler, warn
        self.kronecker = False
        self.set_estimators(estimators)
        self.backends = backends(model, structure, self.to_output, batch_axis)
        self.batch = BatchBackend(model, self.to_output)
        self._structure = structure
        self._verified = set()  # signatures of forward passes

    def set_estimators(self, estimators: tuple) -> None:
        """Collect these estimators (and the terms they need) from now on."""
        self.estimators = tuple(estimators)
        self.terms = terms_for(self.estimators, self.bounds, self.mc_samples)
        self.exact_pass = exact_pass(self.terms)
        spread = any(ESTIMATOR_SPECS[e].variance in self.terms for e in self.estimators)
        self.label_noise = CLOSED_FORM if self.exact_pass else DRAWS if spread else None

    @property
    def generic_layers(self) -> tuple:
        """Layers replayed by the generic rule so far."""
        return tuple(self.backends["general"].generic_layers)

    def plan(self, terms: Optional[frozenset] = None, granularity: str = "token") -> StepPlan:
        """What the backends compute: the estimators' terms, or ``terms`` alone at ``granularity``."""
        kappa, whole = self.likelihood.kappa, terms is None
        granularity = self.granularity if whole else granularity
        return StepPlan(
            terms or self.terms, kappa, self.budget, self.kronecker and whole, granularity
        )

    def to_output(self, h: Tensor) -> Callable:
        """``[D, N, T, C]`` vectors in the layout of the output ``h``."""
        return lambda g: to_output_layout(g, h, self.likelihood, self.class_axis)

    def collect(self, record: ForwardRecord, grad: Tensor, mask, step: Step) -> None:
        """Add the sums of one backward pass through ``record``'s output to ``step``."""
        self.check(record)
        h = record.output
        if h.shape[0] == 0:  # a batch without inputs adds nothing
            return
        values = h.detach()  # labels are drawn in float32 at least (mixed precision)
        values = values.float() if values.element_size() < 4 else values
        positions = read_positions(values, self.likelihood, self.class_axis)
        observed = position_mask(mask, h, positions, self.class_axis)
        if not torch.isfinite(positions[observed]).all():  # no labels can be drawn
            step.nonfinite = True
            return
        draw = self.draw(record, grad, positions, observed)
        if self.granularity == "batch":  # autograd alone, no per-input rule to verify
            sums = self.batch.batch_sums(record, draw, self.plan())
            step.add(sums, draw.num_inputs, positions.shape[2], positions.shape[1])
            return
        if self.verify == "always" or (
            self.verify == "first" and record.signature not in self._verified
        ):
            self.check_rules(record, positions, observed)
        backend = self.choose(record, draw)
        if backend.name == "general":
            uses = backend.uses(record)
            if not uses:
                self.warn(
                    "no parameters",
                    "no parameter of the model that requires grad reaches its output; "
                    "there is nothing to estimate.",
                )
                self.warn.silence("empty")  # said already, more precisely
                return
            if any_needs(self.estimators, "needs_curvature"):
                self.check_no_curvature(record, uses)
        sums = backend.batch_sums(record, draw, self.plan())
        if "xb" in self.terms:
            sums = with_cross_terms_between_inputs(sums)
        step.add(sums, draw.num_inputs, positions.shape[2], positions.shape[1])

    def check(self, record: ForwardRecord) -> None:
        """Clear errors for what the model's output or forward pass rules out."""
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

    def draw(self, record, grad, positions, observed) -> LabelDraw:
        """The step's whole label draw: sampled labels, block pairing, data residuals."""
        h = record.output
        generator = self.sampler.generator(h.device)
        draw = draw_labels(
            self.likelihood, positions, observed, self.mc_samples, generator,
            self.exact_pass, self.bounds, self.block_errors,
            scaled=self.granularity != "token",
        )  # fmt: skip
        if any_needs(self.estimators, "needs_data_labels"):
            read = (self.likelihood, self.class_axis, self.loss_reduction)
            residuals = data_residuals(grad, h, positions, observed, *read)
            sampled = not all(ESTIMATOR_SPECS[e].needs_data_labels for e in self.estimators)
            draw = with_data_residuals(draw, residuals, sampled=sampled)
        return draw

    def choose(self, record: ForwardRecord, draw: LabelDraw):
        """The first backend that applies (the one asked for with ``backend=``)."""
        if self.backend != "auto":
            backend = self.backends[self.backend]
            if not backend.applies(record, draw):
                raise ValueError(
                    f"fimhooks: backend={self.backend!r} does not apply to this forward "
                    "pass (a chain of supported layers, one position per input, no mask); "
                    "use backend='auto'."
                )
            return backend
        return next(b for b in self.backends.values() if b.applies(record, draw))

    def check_no_curvature(self, record: ForwardRecord, uses: dict) -> None:
        """Î₂ on the general backend: only where it equals exact.

        Elsewhere a clear error, or, where ``"I2"`` came with the default estimators, the
        others without it and one notice saying why.
        """
        reason = curvature_needed(record, uses)
        if reason is None:
            return
        if not self.default_estimators:
            raise RuntimeError(f"fimhooks: 'I2' needs {reason}. Use estimators=('I1', 'exact').")
        self.set_estimators(without_curvature(self.estimators))
        self.warn(
            "I2",
            f"'I2' is left out of the default estimators on this model: it needs {reason}. "
            f"Collecting {self.estimators}; pass estimators=('I1', 'exact') to say so.",
        )

    def check_rules(self, record: ForwardRecord, positions: Tensor, observed: Tensor) -> None:
        """Check the rules of the backend in use against autograd (``verification``).

        A chain whose rules disagree hands the structure to the general backend; a layer of
        the general backend whose rule disagrees is replayed by the generic rule from then
        on, each with one warning naming it. Where the generic rule disagrees too, the step
        is refused.
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
        generator = torch.Generator(h.device).manual_seed(self.sampler.seed + VERIFICATION_SEED)
        draw, rows = verification_draw(positions, observed, generator)
        if not rows:
            return
        # autograd reaches no parameter of a BatchNorm layer with frozen statistics: its
        # monitor's backward takes the input branch only
        frozen = {id(p) for c in record.calls if c.statistics for p in c.module.parameters()}
        params = {
            n: p
            for n, p in self.model.named_parameters()
            if p.requires_grad and id(p) not in frozen
        }
        if not params:
            return
        truth = autograd_squares(h, self.to_output(h), draw, params)
        limit = tolerance([h.dtype] + [c.output.dtype for c in record.calls])  # (relative, eps)
        # one direction per input: its position-summed backward (one pass, not one per
        # position) gives the same per-input gradients through the same rules
        plan = self.plan(frozenset({"I1"}), granularity="input")
        layer_of = self._structure().layer_of.get
        chain, general = self.backends["chain"], self.backends["general"]
        if self.backend != "general" and chain.applies(record, draw):
            errors = disagreements(chain.batch_sums(record, draw, plan, rows), truth, *limit)
            if not errors:
                self._verified.add(signature)
                return
            chain.refused.add(signature)
            self.warn(
                ("chain", signature),
                "the chain rules' per-input gradients disagree with autograd at "
                f"{describe(errors, layer_of)}; this model takes the general path.",
            )
        general.axes[signature] = batch_axes(
            h, self.to_output(h), positions, observed, record.calls, generator
        )
        errors = disagreements(general.batch_sums(record, draw, plan, rows), truth, *limit)
        own_rules = general.own_rules(record, errors)
        if own_rules:
            general.generic_paths.update(own_rules)
            named = ", ".join(f"'{p}' ({type(m).__name__})" for p, m in own_rules.items())
            self.warn(
                ("generic", tuple(own_rules)),
                f"the per-input gradients of layer {named} disagree with autograd "
                f"({describe(errors, layer_of)}); the generic rule replays it.",
            )
            errors = disagreements(general.batch_sums(record, draw, plan, rows), truth, *limit)
        if errors:
            raise RuntimeError(
                "fimhooks: the per-input gradients of "
                f"{describe(errors, layer_of)} (relative errors) disagree with "
                "autograd on the same inputs, so their Fisher estimates would be wrong. "
                "fimhooks needs every input's output to depend on that input only, and "
                "the batch axis of the model's inputs: pass batch_axis=1 for "
                "sequence-first [T, N, ...] inputs. Otherwise leave these parameters out "
                "(requires_grad=False)."
            )
        self._verified.add(signature)
