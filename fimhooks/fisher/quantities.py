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
    """A per-input quantity reduced to batch sums (docs/math.md §2-§3).

    Attributes:
        name: Its key in the batch sums.
        input_power: Power of a Linear layer's input with which it scales.
        summand: Whether it is an estimator's summand, whose sample variance across inputs
            is reported (its squares are summed too).
        label_variance: Whether it is the label-noise variance of one summand; across an
            input's positions it scales with the square of a position's weight.
        bounds: For a bound term (docs/math.md §7), the term it bounds, else ``None``.
    """

    name: str
    input_power: int
    summand: bool
    label_variance: bool
    bounds: Optional[str] = None


@dataclass(frozen=True)
class Estimator:
    """A diagonal Fisher estimator.

    Attributes:
        name: Its public name.
        variance: The term holding its closed-form label-noise variance (``None``: none).
        needs_exact_pass: Whether it backpropagates the likelihood's ``C`` directions
            instead of the ``M`` sampled residuals.
        bounded: The term that ``FisherEstimates.bounds`` bounds for it (docs/math.md §7): its
            summand's mean for ``exact``, its label-noise variance for Î₁ and Î₂; ``None``
            for the empirical Fisher.
        directions: What it backpropagates per input, which sets its cost
            (``directions_per_input``): ``"draws"`` (the ``M`` sampled residuals),
            ``"outputs"`` (the ``C`` output directions) or ``"data"`` (the data's residual).
        unbiased: Whether its expectation is the Fisher (not the empirical Fisher's).
        needs_curvature: Whether it needs the network's second derivatives (Î₂).
        needs_data_labels: Whether it uses the data's labels (the empirical Fisher,
            docs/math.md §7b) instead of labels drawn from the model.
        block: The term of its full-block expected squared Frobenius error, if any.
    """

    name: str
    variance: Optional[str]
    needs_exact_pass: bool
    bounded: Optional[str]
    directions: str
    unbiased: bool = True
    needs_curvature: bool = False
    needs_data_labels: bool = False
    block: Optional[str] = None

    def directions_per_input(self, draws: int, outputs: int) -> int:
        """Vectors backpropagated per input with ``draws`` label draws and ``outputs`` ``C``."""
        return {"draws": draws, "outputs": outputs, "data": 1}[self.directions]


_BASE_TERMS = (
    Term("exact", input_power=2, summand=True, label_variance=False),
    Term("I1", input_power=2, summand=True, label_variance=False),
    Term("I2", input_power=2, summand=True, label_variance=False),
    Term("EF", input_power=2, summand=True, label_variance=False),
    Term("v1", input_power=4, summand=False, label_variance=True),
    Term("v2", input_power=4, summand=False, label_variance=True),
    # the cross terms an input's square adds to v1: (Σ_t w g)² − Σ_t w² g² (docs/math.md §7d)
    Term("x1", input_power=4, summand=False, label_variance=True),
    # the cross terms between a backward pass's inputs that squaring its summed score adds:
    # (Σ_n e_n)² − Σ_n e_n², e_n an input's exact summand; formed from exact's batch sums
    Term("xb", input_power=4, summand=False, label_variance=True),
)
#: The two sides of a bound term's name: ``"v1_lower"`` bounds ``v1`` from below.
BOUND_SIDES = ("lower", "upper")


def bound_term(term: str, side: str) -> str:
    """Name of the term bounding ``term`` from ``side`` (``"lower"`` or ``"upper"``)."""
    return f"{term}_{side}"


#: Per layer: ``Σ_n E_y‖Î_B − I_B(x_n)‖²_F`` of its full block (``blocks``), kept in the
#: batch sums of the layer's first parameter (a scalar; no per-entry input power).
_BLOCK_TERMS = tuple(
    Term(f"block_{v}", input_power=0, summand=False, label_variance=True) for v in ("v1", "v2")
)

TERMS: Dict[str, Term] = {
    t.name: t
    for t in _BASE_TERMS
    + _BLOCK_TERMS
    + tuple(
        Term(bound_term(t.name, side), t.input_power, False, t.label_variance, bounds=t.name)
        for t in _BASE_TERMS
        if t.name in ("exact", "v1", "v2")
        for side in BOUND_SIDES
    )
}
ESTIMATOR_SPECS: Dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator(
            "I1", variance="v1", needs_exact_pass=False, bounded="v1", directions="draws",
            block="block_v1",
        ),
        Estimator(
            "I2", variance="v2", needs_exact_pass=True, bounded="v2", directions="outputs",
            needs_curvature=True, block="block_v2",
        ),
        Estimator(
            "exact", variance=None, needs_exact_pass=True, bounded="exact",
            directions="outputs",
        ),
        Estimator(
            "EF", variance=None, needs_exact_pass=False, bounded=None, directions="data",
            unbiased=False, needs_data_labels=True,
        ),
    )
}  # fmt: skip
#: The estimators' names, in the order tables show them.
ESTIMATORS = tuple(ESTIMATOR_SPECS)
#: The estimators whose expectation is the Fisher (what may precondition or be recommended).
UNBIASED_ESTIMATORS = tuple(e for e, spec in ESTIMATOR_SPECS.items() if spec.unbiased)
#: Where label-noise variances come from (``FisherEstimates.label_noise``): the exact
#: pass's closed form, or the spread among ``M ≥ 2`` label draws (docs/math.md §7d).
CLOSED_FORM, DRAWS = "closed form", "draws"
#: What a monitor computes unless told otherwise (the empirical Fisher only when asked).
DEFAULT_ESTIMATORS = ("I1", "I2", "exact")


def any_needs(estimators: Iterable[str], need: str) -> bool:
    """Whether one of ``estimators`` has the declaration's ``need`` (``"needs_curvature"``)."""
    return any(getattr(ESTIMATOR_SPECS[e], need) for e in estimators)


def without_curvature(estimators: Iterable[str]) -> tuple:
    """``estimators`` less those that need the network's second derivatives."""
    return tuple(e for e in estimators if not ESTIMATOR_SPECS[e].needs_curvature)


def label_sampled(estimator: str) -> bool:
    """Whether ``estimator`` draws labels from the model (it has label noise)."""
    return ESTIMATOR_SPECS[estimator].variance is not None


def terms_for(
    estimators: Iterable[str], bounds: bool = False, mc_samples: int = 1
) -> FrozenSet[str]:
    """Terms to reduce for ``estimators``.

    Without the exact pass (Î₁, ``EF``) the summands themselves and, with ``mc_samples ≥
    2``, the label-noise variances of those that draw labels, estimated from the spread
    among the draws (docs/math.md §7d). With the exact pass, ``exact``
    (the data variance's summand) and, for each estimator, its summand and its variance
    term (for Î₁ also ``x1`` and ``xb``, its cross terms between an input's positions
    and between a pass's inputs); with ``bounds``, also the two bound terms of each
    estimator's bounded term (docs/math.md §7).
    """
    specs = [ESTIMATOR_SPECS[e] for e in estimators]
    if not any(s.needs_exact_pass for s in specs):
        spread = {s.variance for s in specs if s.variance} if mc_samples >= 2 else set()
        return frozenset(s.name for s in specs) | spread
    terms = {"exact"} | ({"x1", "xb"} if "I1" in estimators else set())
    for spec in specs:
        terms |= {spec.name} | ({spec.variance} if spec.variance else set())
        if bounds and spec.bounded:
            terms |= {bound_term(spec.bounded, side) for side in BOUND_SIDES}
    return frozenset(terms)


def bound_terms(terms: Iterable[str]) -> FrozenSet[str]:
    """The bound terms among ``terms``."""
    return frozenset(t for t in terms if TERMS[t].bounds is not None)


def exact_pass(terms: FrozenSet[str]) -> bool:
    """Whether ``terms`` need the likelihood's ``C`` directions backpropagated."""
    return "exact" in terms
