"""The text table of ``FisherEstimates.summary``: one row per layer, and a legend of its columns."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, List

from fimhooks.fisher.quantities import DRAWS, ESTIMATOR_SPECS, label_sampled

if TYPE_CHECKING:
    from fimhooks.estimates import FisherEstimates


def summary_table(estimates: "FisherEstimates", target: float) -> str:
    """Title, per-layer table (``layer_statistics(target)``, in model order) and legend."""
    layers = estimates.layer_statistics(target)
    estimators = estimates.estimators
    exact_pass = estimates.exact_pass
    known = estimates.label_noise is not None
    sampled = [e for e in estimators if label_sampled(e)] if known else []
    biased = [e for e in estimators if ESTIMATOR_SPECS[e].needs_data_labels] if exact_pass else []
    bounded = [e for e in estimators if ESTIMATOR_SPECS[e].bounded] if estimates.has_bounds else []
    first = next(iter(layers.values()))
    zero_v2 = "zero_v2" in first
    granular = "recommended_granularity" in first
    header = ["layer", "module", "params"]
    for e in estimators:
        header += [f"tr {e}", f"rse {e}", f"N@{target:.0%} {e}"]
    header += [f"label share {e}" for e in sampled] + [f"M {e}" for e in sampled]
    header += [f"bias {e}" for e in biased] + [f"tight {e}" for e in bounded]
    header += ["zero v2", "best"] if zero_v2 else ["best"]
    header += ["best I1 at"] if granular else []
    rows = []
    for layer, stats in layers.items():
        row = [layer or "<model>", stats["module"], stats["params"]]
        for e in estimators:
            row += [_fmt(stats[e]["trace"]), _fmt(stats[e]["rse"])]
            row.append(_fmt_count(stats[e]["inputs_needed"]))
        row += [_fmt(stats[e]["label_share"]) for e in sampled]
        row += [str(stats[e]["draws_suggested"] or "n/a") for e in sampled]
        row += [_fmt(stats[e]["bias"]) for e in biased]
        row += [_fmt(stats[e]["bound_tightness"]) for e in bounded]
        if zero_v2:
            row.append(f"{stats['zero_v2']}/{stats['params']}")
        row.append(stats["recommended"])
        if granular:
            row.append(stats["recommended_granularity"])
        rows.append(row)
    title = f"fimhooks: diagonal Fisher over {estimates.num_inputs} inputs" + (
        f", {estimates.skipped} batches skipped" if estimates.skipped else ""
    )
    legend = _legend(target, sampled, biased, bounded, zero_v2, estimates.generic_layers)
    if granular:
        legend += (
            "\nbest I1 at: the granularity where Î₁ has the least variance per backpropagated "
            f"vector (this run's is {estimates.granularity!r}; per layer in "
            "layer_statistics(): rse_by_granularity, rse_at_same_cost)."
        )
    if sampled and estimates.label_noise == DRAWS:
        legend += (
            "\nLabel noise of every layer: estimated from the spread among the label draws "
            "(no exact pass), not the closed form."
        )
    if estimates.granularity == "batch":
        legend += (
            "\nGranularity 'batch': the rse holds the label noise alone; its steps have no "
            "per-input summands, so the data noise (and N@, label share) is unknown."
        )
    return title + "\n" + format_table(header, rows) + "\n" + legend


def _legend(target, sampled, biased, bounded, zero_v2, generic_layers) -> str:
    """One explanation per kind of column shown, then the layers on the generic rule."""
    parts = [
        "tr: trace; rse: relative standard error (label + data noise); "
        f"N@{target:.0%}: inputs that reach it; "
    ]
    if sampled:
        parts.append(
            "label share: part of the variance due to label noise; "
            "M: label draws per input worth taking; "
        )
    if zero_v2:
        parts.append("zero v2: entries of Î₂ without label noise; ")
    parts.append(f"best: fewest backpropagated vectors to reach {target:.0%}.")
    legend = "".join(parts)
    if biased:
        legend += (
            f"\nbias {'/'.join(biased)}: ‖EF − exact‖ / ‖exact‖ over the layer, the empirical "
            "Fisher's relative bias; compare it with the other estimators' rse (their noise)."
        )
    if bounded:
        legend += (
            "\ntight: the layer's upper bound (Soen & Sun 2024, Thm 4.1) over what it "
            "bounds: the exact trace, the variance of Î₁ or Î₂."
        )
    if generic_layers:
        legend += (
            "\nLayers on the generic per-input rule (exact, slower): "
            + ", ".join(layer or "<model>" for layer in generic_layers)
            + "."
        )
    return legend


def format_table(header: List[str], rows: List[list]) -> str:
    """Columns padded to their widest cell (the first left-aligned), a rule under the header."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3g}"


def _fmt_count(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{math.ceil(value):,}"
