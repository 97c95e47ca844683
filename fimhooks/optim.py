"""``FisherPreconditioner``: natural-gradient steps from a monitor's running Fisher estimates."""

from __future__ import annotations

import math
import warnings
from typing import Dict

import torch

from fimhooks.engine.layers import spec_for
from fimhooks.fisher.preconditioning import (
    damped_kronecker_inverses,
    diagonal_denominator,
    kronecker_solve,
)
from fimhooks.fisher.quantities import ESTIMATOR_SPECS, UNBIASED_ESTIMATORS

#: The unbiased estimators, or ``"auto"``: the empirical Fisher does not precondition.
ESTIMATOR_CHOICES = UNBIASED_ESTIMATORS + ("auto",)
STRUCTURES = ("diag", "kfac")


class FisherPreconditioner:
    """Rewrites ``p.grad`` into ``(Ī + λ I)⁻¹ p.grad`` before any ``torch.optim`` step.

    ``Ī`` is the monitor's running Fisher estimate (docs/math.md §8), per observation. With
    ``structure="diag"`` the solve is elementwise; ``estimator="auto"`` takes, per layer,
    the estimator with the smaller relative standard error at each refresh, and
    ``uncertainty_damping=κ`` adds ``κ ·`` (standard error of the entry) to its damping.
    With ``structure="kfac"`` Linear layers use Kronecker factors ``A ⊗ G`` (sampled for
    ``"I1"``, exact otherwise) collected in the monitor's backward pass, inverted with the
    damping split between the factors; other layers fall back to the diagonal.

    Steps before the monitor's first collection, parameters without gradient and frozen
    parameters pass through untouched.

    Args:
        monitor: The ``FisherMonitor`` whose estimates precondition.
        damping: ``λ > 0``.
        estimator: ``"I1"``, ``"I2"``, ``"exact"`` or ``"auto"``.
        structure: ``"diag"`` or ``"kfac"``.
        uncertainty_damping: ``κ ≥ 0`` (``structure="diag"`` only).
        update_every: Refresh the preconditioner from the estimates every this many steps.
    """

    def __init__(
        self,
        monitor,
        *,
        damping: float = 1e-3,
        estimator: str = "auto",
        structure: str = "diag",
        uncertainty_damping: float = 0.0,
        update_every: int = 1,
    ):
        if isinstance(damping, bool) or not isinstance(damping, (int, float)):
            raise TypeError(f"damping must be a number, got {type(damping).__name__}.")
        if not 0 < damping < math.inf:
            raise ValueError(f"damping must be positive and finite, got {damping!r}.")
        if estimator not in ESTIMATOR_CHOICES:
            raise ValueError(f"estimator must be one of {ESTIMATOR_CHOICES}, got {estimator!r}.")
        if estimator != "auto" and estimator not in monitor.estimators:
            raise ValueError(
                f"estimator {estimator!r} is not collected by the monitor "
                f"(estimators={monitor.estimators})."
            )
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}.")
        if uncertainty_damping < 0 or (uncertainty_damping and structure != "diag"):
            raise ValueError("uncertainty_damping must be ≥ 0, and is for structure='diag'.")
        if not (isinstance(update_every, int) and update_every >= 1):
            raise ValueError(f"update_every must be a positive integer, got {update_every!r}.")
        if monitor.removed:
            raise RuntimeError(
                "FisherPreconditioner: the monitor was removed and collects nothing; create "
                "a new monitor."
            )
        self.monitor = monitor
        self.damping, self.estimator, self.structure = damping, estimator, structure
        self.uncertainty_damping, self.update_every = uncertainty_damping, update_every
        self.steps = 0
        self.choices: Dict[str, str] = {}
        self._diagonal: Dict[str, torch.Tensor] = {}
        self._kronecker: Dict[str, tuple] = {}
        self._warned_general = False
        self._not_finite: set = set()
        if structure == "kfac":
            monitor.collect_kronecker_factors()
            others = [
                path
                for path, m in monitor.model.named_modules()
                if list(m.parameters(recurse=False)) and not spec_for(m).kfac
            ]
            if others:
                warnings.warn(
                    f"fimhooks: layers {others} have no Kronecker factors; they use the "
                    "diagonal estimate.",
                    RuntimeWarning,
                    stacklevel=2,
                )

    @torch.no_grad()
    def step(self) -> None:
        """Precondition every parameter's ``.grad`` in place."""
        if self.monitor.collected_steps == 0:
            return
        if self.steps % self.update_every == 0 or not (self._diagonal or self._kronecker):
            self._refresh()
        self.steps += 1
        params = dict(self.monitor.model.named_parameters())
        for layer, (A_inverse, G_inverse) in self._kronecker.items():
            weight, bias = params[_join(layer, "weight")], params.get(_join(layer, "bias"))
            if weight.grad is None or not weight.requires_grad:
                continue
            grads = [weight.grad]
            if bias is not None:  # the factors' last input column; zero if it has no grad
                bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
                grads.append(bias_grad.unsqueeze(1))
            solved = kronecker_solve(torch.cat(grads, 1).double(), A_inverse, G_inverse)
            self._write(_join(layer, "weight"), weight.grad, solved[:, : weight.shape[1]])
            if bias is not None and bias.grad is not None and bias.requires_grad:
                self._write(_join(layer, "bias"), bias.grad, solved[:, -1])
        for name, denominator in self._diagonal.items():
            p = params[name]
            if p.grad is not None and p.requires_grad:
                self._write(name, p.grad, p.grad / denominator)

    def _write(self, name: str, grad: torch.Tensor, preconditioned: torch.Tensor) -> None:
        """Replace ``grad``, unless the preconditioned one is not finite (then say so)."""
        if torch.isfinite(preconditioned).all():
            grad.copy_(preconditioned)
            return
        if name not in self._not_finite:
            self._not_finite.add(name)
            warnings.warn(
                f"fimhooks: the preconditioned gradient of '{name}' is not finite (a Fisher "
                f"entry near zero against damping {self.damping}); its gradient was left "
                "as it was. Increase the damping.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _refresh(self) -> None:
        est = self.monitor.live_estimates()
        self._kronecker = {}
        if self.structure == "kfac":
            sampled = (
                self.estimator != "auto" and not ESTIMATOR_SPECS[self.estimator].needs_exact_pass
            )
            kind = "sampled" if sampled or not est.exact_pass else "exact"
            for layer, (A, G) in est.kronecker_factors(kind).items():
                self._kronecker[layer] = damped_kronecker_inverses(A, G, self.damping)
                self.choices[layer] = f"kfac-{kind}"
            self._warn_missing_factors()
        errors = est.relative_errors() if self.estimator == "auto" else None
        names = {}  # estimator -> parameter names it preconditions
        for name, layer in est.layers.items():
            if layer in self._kronecker or not est.has(name):
                continue
            found = (errors or {}).get(layer, {})
            unbiased = {e: v for e, v in found.items() if ESTIMATOR_SPECS[e].unbiased} or found
            chosen = self.estimator if errors is None else min(unbiased, key=unbiased.get)
            self.choices[layer] = chosen
            names.setdefault(chosen, []).append(name)
        self._diagonal = {}
        for estimator, chosen_names in names.items():
            fisher = est.fisher(estimator)
            std = est.standard_errors(estimator) if self.uncertainty_damping else {}
            for name in chosen_names:
                self._diagonal[name] = diagonal_denominator(
                    fisher[name], self.damping, std.get(name), self.uncertainty_damping
                )

    def _warn_missing_factors(self) -> None:
        """Kronecker factors come from the chain path only: say so once where they lack."""
        model = self.monitor.model
        missing = [
            path
            for path, m in model.named_modules()
            if spec_for(m).kfac and path not in self._kronecker and m.weight.requires_grad
        ]
        if missing and not self._warned_general:
            self._warned_general = True
            warnings.warn(
                f"fimhooks: layers {missing} got no Kronecker factors (the model's forward "
                "pass is not a chain of layers); they use the diagonal estimate.",
                RuntimeWarning,
                stacklevel=3,
            )

    def state_dict(self) -> dict:
        """Steps, choices and the current preconditioner, to restore it exactly."""
        return {
            "steps": self.steps,
            "choices": dict(self.choices),
            "diagonal": {n: t.clone() for n, t in self._diagonal.items()},
            "kronecker": {k: tuple(t.clone() for t in v) for k, v in self._kronecker.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``."""
        self.steps = state["steps"]
        self.choices = dict(state["choices"])
        self._diagonal = {n: t.clone() for n, t in state["diagonal"].items()}
        self._kronecker = {k: tuple(t.clone() for t in v) for k, v in state["kronecker"].items()}


def _join(layer: str, local: str) -> str:
    return f"{layer}.{local}" if layer else local
