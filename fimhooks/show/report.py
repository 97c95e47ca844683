"""A report of a fimhooks log: the plots and the per-layer table, as Markdown and HTML."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import List

from fimhooks.fisher.quantities import label_sampled
from fimhooks.show.plots import PLOTS

REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def layer_table(record: dict) -> List[List[str]]:
    """Header and rows of the per-layer table of one log record."""
    estimators = record["estimators"]
    target = record["target_rse"]
    sampled = [e for e in estimators if label_sampled(e)]
    header = ["layer", "module", "params"]
    for e in estimators:
        header += [f"trace {e}", f"rse {e}", f"inputs for {target:.0%} {e}"]
    header += [f"label share {e}" for e in sampled] + [f"draws {e}" for e in sampled]
    first = next(iter(record["layers"].values()))
    bounded = [e for e in estimators if "bound_tightness" in first[e]]
    biased = [e for e in estimators if "bias" in first[e]]
    header += [f"bias {e}" for e in biased] + [f"bound tightness {e}" for e in bounded]
    header += ["zero-variance I2", "recommended"]
    granular = "recommended_granularity" in first
    header += ["I1 rse at token / input / batch", "I1 best at"] if granular else []
    rows = [header]
    for layer, stats in record["layers"].items():
        row = [layer or "<model>", stats["module"], str(stats["params"])]
        for e in estimators:
            s = stats[e]
            row += [number(s["trace"]), number(s["rse"]), count(s["inputs_needed"])]
        row += [number(stats[e]["label_share"]) for e in sampled]
        row += [str(stats[e]["draws_suggested"] or "n/a") for e in sampled]
        row += [number(stats[e]["bias"]) for e in biased]
        row += [number(stats[e]["bound_tightness"]) for e in bounded]
        zero = stats.get("zero_v2")
        row += ["n/a" if zero is None else f"{zero}/{stats['params']}", stats["recommended"]]
        if granular:
            rse = stats["I1"]["rse_by_granularity"]
            row += [" / ".join(number(rse[g]) for g in rse), stats["recommended_granularity"]]
        rows.append(row)
    return rows


def number(value) -> str:
    """Six significant digits, or n/a."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.6g}"


def count(value) -> str:
    """A whole number of inputs, or n/a."""
    return "n/a" if value is None or not math.isfinite(value) else str(math.ceil(value))


def write_report(records: List[dict], out_dir: Path, title: str = "fimhooks report") -> dict:
    """Write the plots, ``report.md`` and a self-contained ``report.html`` into ``out_dir``.

    Returns:
        ``{name: path}`` of every file written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: plot(records, out_dir / name) for name, plot in PLOTS.items()}
    last = records[-1]
    rows = layer_table(last)
    intro = (
        f"{last['inputs']} inputs over {last['step']} collected steps "
        f"({last['backward']} backward passes), {last['skipped']} skipped. Estimators: "
        f"{', '.join(last['estimators'])}. Relative standard error (rse) = sqrt(sum of the "
        "variances of a layer's entries) / norm of its diagonal; 'inputs for' = inputs that "
        "reach the target rse at the monitor's label draws; 'draws' = label draws per input "
        "worth taking; 'recommended' = the estimator reaching the target with the fewest "
        "backpropagated vectors."
    )
    if any("recommended_granularity" in s for s in last["layers"].values()):
        intro += (
            f" Î₁ squares the score at granularity '{last.get('granularity', 'token')}'; "
            "'I1 rse at' = the rse it would have had squared per observation, per input or "
            "per batch on the same inputs; 'I1 best at' = the granularity of least variance "
            "per backpropagated vector."
        )
    if any("bound_tightness" in s[e] for s in last["layers"].values() for e in last["estimators"]):
        intro += (
            " 'bound tightness' = the layer's upper bound (Soen & Sun 2024, Thm 4.1) over "
            "what it bounds: the exact trace, the variance of Î₁ or Î₂."
        )
    if "EF" in last["estimators"] and last["layers"]:
        intro += (
            " 'bias EF' = ‖EF − exact‖ / ‖exact‖ over the layer: the empirical Fisher's "
            "relative bias, to compare with the rse (the noise) of Î₁ and Î₂."
        )
    md = [f"# {title}", "", intro, "", _markdown_table(rows), ""]
    md += [f"![{name}]({name})" for name in files]
    files[REPORT_MD] = out_dir / REPORT_MD
    files[REPORT_MD].write_text("\n".join(md) + "\n", encoding="utf-8")
    files[REPORT_HTML] = out_dir / REPORT_HTML
    files[REPORT_HTML].write_text(_html(title, intro, rows, files), encoding="utf-8")
    return files


def _markdown_table(rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def _html(title: str, intro: str, rows: List[List[str]], files: dict) -> str:
    cells = "".join(
        "<tr>"
        + "".join(
            f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>"
            for c in row
        )
        + "</tr>"
        for i, row in enumerate(rows)
    )
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(Path(path).read_bytes()).decode()}"></figure>'
        for name, path in files.items()
        if name.endswith(".png")
    )
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}"
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(intro)}</p><table>{cells}</table>{images}</body></html>\n"
    )
