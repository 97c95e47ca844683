"""``Store``: the running statistics of every parameter, and what was committed to them."""

from __future__ import annotations

from typing import Dict, Optional

from torch import Tensor

from fimhooks.engine.step import Step
from fimhooks.fisher.running import RunningDiagonal

#: What ``Store.commit`` did with a step.
ADDED, NONFINITE, EMPTY, MASKED = "added", "nonfinite", "empty", "masked"

#: What the user is told (once) of an outcome.
NOTICES = {
    NONFINITE: "a collected batch had a non-finite model output or Fisher statistic and "
    "was skipped (counted in estimates().skipped); further skips are not warned about.",
    EMPTY: "nothing was collected inside `with monitor:`: call backward on a loss computed "
    "from the monitored model's output inside the block.",
}


class Store:
    """Accumulators by parameter name, the skipped and the collected steps.

    Args:
        ema_decay: ``None`` for the cumulative average, else the EMA's ``β``.
        mc_samples: Label draws per observation.
    """

    def __init__(self, ema_decay: Optional[float], mc_samples: int):
        self.ema_decay, self.mc_samples = ema_decay, mc_samples
        self.accumulators: Dict[str, RunningDiagonal] = {}
        self.skipped = 0
        self.collected_steps = 0
        self.num_outputs = 1
        self.positions = 0.0  # Σ over the added steps of their positions per input

    def commit(self, step: Step) -> str:
        """Add a step to the statistics, unless it is not finite, empty or all masked.

        Returns:
            ``ADDED``, ``NONFINITE`` (counted in ``skipped``), ``EMPTY`` or ``MASKED``.
        """
        self.num_outputs = step.num_outputs or self.num_outputs
        if not step.finite:
            self.skipped += 1
            return NONFINITE
        if not step.sums:
            return EMPTY
        if not step.num_inputs:  # every position was masked: nothing to add
            return MASKED
        for name, sums in step.sums.items():
            if name not in self.accumulators:
                self.accumulators[name] = RunningDiagonal(self.ema_decay, self.mc_samples)
            self.accumulators[name].update(sums, step.num_inputs)
        self.collected_steps += 1
        self.positions += step.positions
        return ADDED

    @property
    def positions_per_input(self) -> float:
        """Mean positions per input (``T``, padded) over the added steps; 1 before any."""
        steps = max((a.num_steps for a in self.accumulators.values()), default=0)
        return self.positions / steps if steps and self.positions else 1.0

    def snapshot(self) -> Dict[str, RunningDiagonal]:
        """Detached copies of the accumulators."""
        return {name: acc.copy() for name, acc in self.accumulators.items()}

    def reset(self) -> None:
        """Forget the statistics (the count of collected steps stays)."""
        self.accumulators, self.skipped, self.positions = {}, 0, 0.0

    def state_dict(self) -> dict:
        """The counts and every accumulator's state."""
        return {
            "skipped": self.skipped,
            "collected_steps": self.collected_steps,
            "num_outputs": self.num_outputs,
            "positions": self.positions,
            "accumulators": {n: a.state_dict() for n, a in self.accumulators.items()},
        }

    def load_state_dict(self, state: dict, devices: Dict[str, object]) -> None:
        """Restore; ``devices``: ``{parameter name: device}`` the statistics go to."""
        self.skipped = state["skipped"]
        self.collected_steps = state["collected_steps"]
        self.num_outputs = state["num_outputs"]
        self.positions = state.get("positions", 0.0)  # older states: unknown
        self.accumulators = {
            name: RunningDiagonal.from_state_dict(acc).to(devices[name])
            for name, acc in state["accumulators"].items()
        }


#: Keys of ``FisherMonitor.state_dict()`` and of each accumulator's state in it.
STATE_KEYS = (
    "options", "parameters", "entries", "skipped", "collected_steps", "num_outputs",
    "accumulators", "generators",
)  # fmt: skip
ACCUMULATOR_KEYS = (
    "ema_decay", "mc_samples", "num_inputs", "num_steps", "single_input_steps", "stats",
    "aliases",
)  # fmt: skip


def check_state(state, options: dict, shapes: Dict[str, list]) -> None:
    """A clear error, naming what differs, for a state this monitor cannot load.

    Args:
        state: What ``FisherMonitor.state_dict()`` returned.
        options: The loading monitor's options.
        shapes: ``{parameter name: shape}`` of its parameters.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state).__name__}.")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(
            f"state_dict has no {missing}: pass what FisherMonitor.state_dict() returned."
        )
    saved = {"batchnorm": "error", "granularity": "token", **state["options"]}  # older states
    if saved != options:
        raise ValueError(f"state_dict was saved with options {saved}, this monitor has {options}.")
    if state["parameters"] != shapes:
        saved, here = state["parameters"], shapes
        differ = sorted(k for k in saved.keys() | here.keys() if saved.get(k) != here.get(k))
        raise ValueError(
            "state_dict was saved for a model with other parameters; they differ at "
            f"{differ[:5]} (name: saved shape vs this model's: "
            f"{[(k, saved.get(k), here.get(k)) for k in differ[:3]]})."
        )
    for name, acc in state["accumulators"].items():
        if name not in shapes:
            raise ValueError(
                f"state_dict['accumulators'] holds statistics of parameter '{name}', which "
                "is not among its parameters."
            )
        missing = [k for k in ACCUMULATOR_KEYS if k not in acc]
        if missing:
            raise ValueError(f"state_dict['accumulators']['{name}'] has no {missing}.")
        for key, value in acc["stats"].items():
            if not isinstance(value, Tensor) or (value.dim() and list(value.shape) != shapes[name]):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"state_dict['accumulators']['{name}']['stats']['{key}'] has shape "
                    f"{shape}; parameter '{name}' has shape {tuple(shapes[name])}."
                )
