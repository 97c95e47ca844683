"""Sample-size guidance from the variance terms of docs/math.md §4, as pure functions.

For a layer with diagonal estimate ``F`` (entries ``i``), the variance of an estimator over
``N`` inputs with ``M`` label draws each is ``Σ_i Var_i = (L / M + D) / N`` where, summed
over the layer's entries, ``L = Σ_i E_x v_i`` is the label noise of one input and one draw
and ``D = Σ_i Var_x g_i`` the data noise of one input. Its relative standard error is
``sqrt(Σ_i Var_i) / ‖F‖``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

from fimhooks.fisher.quantities import ESTIMATOR_SPECS

#: Most label draws per input that guidance suggests.
MAX_DRAWS = 64


def inputs_needed(
    label_noise: float, data_noise: float, fisher_sq_norm: float, target: float, draws: int = 1
) -> float:
    """Inputs for a relative standard error of ``target``: ``(L/M + D) / (target² ‖F‖²)``.

    Args:
        label_noise: ``L``, label-noise variance of one input and one draw (0 for exact).
        data_noise: ``D``, data-noise variance of one input.
        fisher_sq_norm: ``‖F‖²`` of the layer's diagonal.
        target: The relative standard error to reach, e.g. 0.05.
        draws: Label draws per input ``M``.
    """
    if fisher_sq_norm <= 0:
        return math.inf
    return (label_noise / draws + data_noise) / (target**2 * fisher_sq_norm)


def draws_suggested(label_noise: float, data_noise: float) -> Optional[int]:
    """Fewest draws per input after which label noise is at most the data noise, ``⌈L/D⌉``.

    More draws than that buy less than doubling the inputs would. ``None`` while a noise is
    not known yet (a sample variance needs two inputs).
    """
    if not (math.isfinite(label_noise) and math.isfinite(data_noise)):
        return None
    if label_noise <= 0:
        return 1
    if data_noise <= 0:
        return MAX_DRAWS
    return int(min(MAX_DRAWS, max(1, math.ceil(label_noise / data_noise))))


def cost_per_input(estimator: str, draws: int, outputs: int) -> int:
    """Vectors backpropagated per input, as ``Estimator.directions`` declares.

    ``M`` for Î₁ alone, ``C`` for exact and Î₂, one (the data's residual) for the empirical
    Fisher.
    """
    return ESTIMATOR_SPECS[estimator].directions_per_input(draws, outputs)


def recommended_granularity(rse: Dict[str, float], vectors: Dict[str, float]) -> str:
    """The granularity of least variance per backpropagated vector, ``argmin rse² · vectors``.

    Ties go to the first (finest) of ``rse``: on outputs with one position per input
    ``"token"`` and ``"input"`` are the same estimator.
    """
    return min(rse, key=lambda g: rse[g] ** 2 * vectors[g])


def rse_at_same_cost(
    rse: Dict[str, float], vectors: Dict[str, float], own: str
) -> Dict[str, float]:
    """Each granularity's rse had it spent the vectors that ``own`` did: ``rse · √(c / c_own)``."""
    return {g: r * math.sqrt(vectors[g] / vectors[own]) for g, r in rse.items()}
