"""The estimators and the per-input terms they are built from: one declaration each.

Every other module derives its lists from these: which terms a set of estimators needs,
how a term scales on a Linear layer, which terms need their squares (sample variances),
which are label-noise variances, and which term is an estimator's closed-form variance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, Optional


@dataclass(frozen=True)
class Term:
    """A per-input quantity reduced to batch sums (SPEC §2-§3).

    Attributes:
        name: Its key in the batch sums.
        input_power: Power of a Linear layer's input with which it scales.
        summand: Whether it is an estimator's summand, whose sample variance across inputs
            is reported (its squares are summed too).
        label_variance: Whether it is the label-noise variance of one summand; across an
            input's positions it scales with the square of a position's weight.
    """

    name: str
    input_power: int
    summand: bool
    label_variance: bool


@dataclass(frozen=True)
class Estimator:
    """A diagonal Fisher estimator.

    Attributes:
        name: Its public name.
        variance: The term holding its closed-form label-noise variance (``None``: none).
        needs_exact_pass: Whether it backpropagates the likelihood's ``C`` directions
            instead of the ``M`` sampled residuals.
    """

    name: str
    variance: Optional[str]
    needs_exact_pass: bool


TERMS: Dict[str, Term] = {
    t.name: t
    for t in (
        Term("exact", input_power=2, summand=True, label_variance=False),
        Term("I1", input_power=2, summand=True, label_variance=False),
        Term("I2", input_power=2, summand=True, label_variance=False),
        Term("v1", input_power=4, summand=False, label_variance=True),
        Term("v2", input_power=4, summand=False, label_variance=True),
    )
}
ESTIMATOR_SPECS: Dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator("I1", variance="v1", needs_exact_pass=False),
        Estimator("I2", variance="v2", needs_exact_pass=True),
        Estimator("exact", variance=None, needs_exact_pass=True),
    )
}
#: The estimators' names, in the order tables show them.
ESTIMATORS = tuple(ESTIMATOR_SPECS)


def terms_for(estimators: Iterable[str]) -> FrozenSet[str]:
    """Terms to reduce for ``estimators``.

    Without the exact pass (Î₁ alone) only ``I1`` itself. With it, ``exact`` (the data
    variance's summand) and, for each estimator, its summand and its variance term.
    """
    specs = [ESTIMATOR_SPECS[e] for e in estimators]
    if not any(s.needs_exact_pass for s in specs):
        return frozenset(s.name for s in specs)
    terms = {"exact"}
    for spec in specs:
        terms |= {spec.name} | ({spec.variance} if spec.variance else set())
    return frozenset(terms)


def exact_pass(terms: FrozenSet[str]) -> bool:
    """Whether ``terms`` need the likelihood's ``C`` directions backpropagated."""
    return "exact" in terms
