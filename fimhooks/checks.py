"""Checks of the monitor's options and of the model it is given: clear errors, early."""

from __future__ import annotations

from typing import Optional

from torch import nn

from fimhooks.fisher.quantities import ESTIMATORS, any_needs, label_sampled


def check_not_watched(model: nn.Module, attached) -> None:
    """One monitor per model: none on ``model``, inside it or around it."""
    watched = [m for m in attached if m is model or m in model.modules() or model in m.modules()]
    if watched:
        what = "this" if watched[0] is model else "a module containing or inside this"
        raise ValueError(
            f"{what} {type(model).__name__} is already watched by a FisherMonitor; call "
            "remove() on that monitor first (two monitors would each collect every step)."
        )


def check_options(mc_samples, every, ema_decay, output, batch_axis, choices: dict) -> None:
    """The monitor's scalar options; ``choices``: ``{option: (value, allowed values)}``."""
    for option, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{option} must be one of {allowed}, got {value!r}.")
    if not (isinstance(mc_samples, int) and mc_samples >= 1):
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}.")
    if not (isinstance(every, int) and every >= 1):
        raise ValueError(f"every must be a positive integer, got {every!r}.")
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise ValueError(f"ema_decay must be None or in (0, 1), got {ema_decay!r}.")
    if output is not None and not callable(output):
        raise TypeError(f"output must be a callable, got {type(output).__name__}.")
    if isinstance(batch_axis, bool) or not isinstance(batch_axis, int) or batch_axis < 0:
        raise ValueError(f"batch_axis must be a non-negative integer, got {batch_axis!r}.")


def check_empirical(estimators: tuple, likelihood, loss_reduction: Optional[str]) -> None:
    """``"EF"`` with the Gaussian likelihood needs the loss's reduction."""
    if any_needs(estimators, "needs_data_labels") and likelihood.name == "gaussian":
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(
                "'EF' with the Gaussian likelihood reads (f − y) from the loss's gradient, "
                "whose scale depends on the loss: pass the nn.MSELoss module itself "
                "(reduction 'mean' or 'sum') as the likelihood."
            )


def resolve_granularity(granularity: str, estimators: tuple, extras: dict) -> str:
    """The granularity that ``"auto"`` stands for, else ``granularity`` itself.

    ``"input"``, the same estimator as ``"token"`` where each input has one position, except
    where ``"EF"``, bounds or block errors (``extras``) need each observation's square.
    """
    if granularity != "auto":
        return granularity
    per_observation = any_needs(estimators, "needs_data_labels") or any(extras.values())
    return "token" if per_observation else "input"


def check_granularity(estimators: tuple, granularity: str, backend: str, extras: dict) -> None:
    """What a coarser granularity serves.

    The bounds, block errors and ``"EF"`` are those of the per-observation square;
    ``"batch"`` squares the batch's sampled score: Î₁ alone, on any backend.

    Args:
        estimators: The estimators asked for.
        granularity: The monitor's granularity.
        backend: The monitor's backend option.
        extras: ``{"bounds": bool, "block_errors": bool}`` as asked.
    """
    if granularity == "token":
        return
    if any_needs(estimators, "needs_data_labels"):
        raise ValueError(
            f"'EF' squares the gradient of each observation; granularity={granularity!r} "
            "applies to the sampled-label estimators only: collect 'EF' with "
            "granularity='token' (a monitor of its own)."
        )
    asked = [name for name, on in extras.items() if on]
    if asked:
        raise ValueError(
            f"{' and '.join(asked)} hold for granularity 'token' (the square of each "
            f"observation's score); got granularity={granularity!r}: collect them with a "
            "monitor at 'token'."
        )
    if granularity != "batch":
        return
    others = [e for e in estimators if not label_sampled(e) or any_needs([e], "needs_curvature")]
    if others or backend != "auto":
        raise ValueError(
            "granularity='batch' squares the score summed over the batch, one backward of "
            "the sampled-label loss: it serves estimators=('I1',) with backend='auto' "
            f"(got estimators={estimators!r}, backend={backend!r}). Take the others in a "
            "monitor with granularity 'token' or 'input'; with mc_samples >= 2 the "
            "spread among the draws gives the label noise."
        )


def check_estimators(estimators) -> tuple:
    """Distinct known estimator names, as a tuple."""
    estimators = tuple(estimators)
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if not estimators or unknown or len(set(estimators)) != len(estimators):
        raise ValueError(
            f"estimators must be distinct names among {ESTIMATORS}, got {estimators!r}."
        )
    return estimators


def check_not_extended(model: nn.Module) -> None:
    """Fimhooks installs its own hooks: no model extended by BackPACK."""
    for path, module in model.named_modules():
        if getattr(module, "_backpack_extend", False):
            raise ValueError(
                f"layer '{path}' was extended with backpack.extend(); fimhooks installs "
                "its own hooks: pass a model that was not extended."
            )
