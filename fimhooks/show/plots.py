"""Plots of a fimhooks JSON log (matplotlib, an optional extra).

Each function takes the log's records and a path, writes one PNG and returns the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from fimhooks.fisher.quantities import label_sampled

STYLES = {"I1": "-", "I2": "--", "exact": ":", "EF": "-."}


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'fimhooks[plots]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layer_name(layer: str, record: dict) -> str:
    module = record["layers"][layer].get("module")
    return f"{layer or '<model>'} ({module})" if module else layer or "<model>"


def plot_traces(records: List[dict], path: Path) -> Path:
    """Per-layer Fisher trace over collected steps, one panel per estimator."""
    plt = _pyplot()
    estimators = records[-1]["estimators"]
    fig, axes = plt.subplots(
        1, len(estimators), figsize=(4.5 * len(estimators), 3.6), squeeze=False
    )
    steps = [r["step"] for r in records]
    for ax, e in zip(axes[0], estimators):
        for layer in records[-1]["layers"]:
            values = [r["layers"].get(layer, {}).get(e, {}).get("trace") for r in records]
            ax.plot(steps, [_positive(v) for v in values], label=_layer_name(layer, records[-1]))
        ax.set(
            title=f"Fisher trace, {e}", xlabel="collected step", ylabel="trace (per observation)"
        )
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(title="layer", fontsize="small")
    return _save(fig, path)


def plot_rse(records: List[dict], path: Path) -> Path:
    """Relative standard error of each estimator over collected steps, per layer."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    steps = [r["step"] for r in records]
    for i, layer in enumerate(records[-1]["layers"]):
        for e in records[-1]["estimators"]:
            values = [r["layers"].get(layer, {}).get(e, {}).get("rse") for r in records]
            ax.plot(
                steps,
                [_positive(v) for v in values],
                STYLES[e],
                color=f"C{i}",
                label=f"{_layer_name(layer, records[-1])} {e}",
            )
    ax.set(
        title="Relative standard error of the running estimate",
        xlabel="collected step",
        ylabel="relative standard error",
    )
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    return _save(fig, path)


def plot_noise_shares(records: List[dict], path: Path) -> Path:
    """Label-noise versus data-noise share of the variance per layer (last record)."""
    plt = _pyplot()
    last = records[-1]
    sampled = [e for e in last["estimators"] if label_sampled(e)]
    layers = list(last["layers"])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(layers) * max(1, len(sampled))), 3.8))
    width = 0.8 / max(1, len(sampled))
    for j, e in enumerate(sampled):
        label = [last["layers"][layer][e]["label_share"] or 0.0 for layer in layers]
        xs = [i + j * width for i in range(len(layers))]
        ax.bar(xs, label, width, color="C3", alpha=0.5 + 0.4 * j, label=f"label noise, {e}")
        ax.bar(
            xs,
            [1 - v for v in label],
            width,
            bottom=label,
            color="C0",
            alpha=0.5 + 0.4 * j,
            label=f"data noise, {e}",
        )
    ax.set_xticks([i + width * (len(sampled) - 1) / 2 for i in range(len(layers))])
    ax.set_xticklabels([_layer_name(layer, last) for layer in layers])
    ax.set(
        title="Where the variance comes from",
        xlabel="layer",
        ylabel="share of the variance",
        ylim=(0, 1),
    )
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    return _save(fig, path)


def plot_rse_distribution(records: List[dict], path: Path) -> Path:
    """Distribution of the per-parameter relative standard error (last record)."""
    plt = _pyplot()
    last = records[-1]
    edges = last["rse_bins"]
    fig, axes = plt.subplots(
        1, len(last["estimators"]), figsize=(4.5 * len(last["estimators"]), 3.6), squeeze=False
    )
    for ax, e in zip(axes[0], last["estimators"]):
        for layer, stats in last["layers"].items():
            ax.stairs(stats[e]["rse_histogram"], edges, label=_layer_name(layer, records[-1]))
        ax.set(
            title=f"Per-parameter relative standard error, {e}",
            xlabel="relative standard error",
            ylabel="parameters",
        )
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(title="layer", fontsize="small")
    return _save(fig, path)


PLOTS = {
    "traces.png": plot_traces,
    "rse.png": plot_rse,
    "noise_shares.png": plot_noise_shares,
    "rse_distribution.png": plot_rse_distribution,
}


def _positive(value):
    return value if value is not None and value > 0 else float("nan")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return Path(path)
