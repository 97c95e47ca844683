"""The demo: train a small MLP on scikit-learn's bundled data with a monitor attached."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fimhooks.fisher.quantities import label_sampled
from fimhooks.monitor import FisherMonitor
from fimhooks.show.jsonlog import read_log
from fimhooks.show.report import write_report

LOG_NAME = "fimhooks_log.jsonl"
CONSOLE_WIDTH = 120  # characters: the demo's table fits a 1280-pixel terminal window


@dataclass(frozen=True)
class Dataset:
    """A bundled data set and the likelihood that fits it."""

    loader: str
    loss: type
    outputs: int
    description: str


DATASETS = {
    "digits": Dataset(
        "load_digits", nn.CrossEntropyLoss, 10, "8x8 digits, 10 classes: categorical"
    ),
    "breast_cancer": Dataset(
        "load_breast_cancer", nn.BCEWithLogitsLoss, 1, "tumours, binary: Bernoulli"
    ),
    "diabetes": Dataset("load_diabetes", nn.MSELoss, 1, "disease progression: Gaussian"),
}


def load(name: str):
    """Standardized features and targets of a bundled scikit-learn data set."""
    try:
        import sklearn.datasets
    except ImportError as error:
        raise ImportError(
            "the demo needs scikit-learn: pip install 'fimhooks[examples]'"
        ) from error
    spec = DATASETS[name]
    data = getattr(sklearn.datasets, spec.loader)()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    y = torch.tensor(data.target)
    if spec.loss is nn.CrossEntropyLoss:
        y = y.long()
    else:
        y = y.float().unsqueeze(1)
        if spec.loss is nn.MSELoss:
            y = (y - y.mean()) / y.std()
    return x, y


def run_demo(
    dataset: str = "digits",
    epochs: int = 20,
    out: Path = Path("fimhooks-demo"),
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> FisherMonitor:
    """Train with a monitor attached; write the log, the plots and the report to ``out``.

    Returns:
        The monitor, still attached, holding the final estimates.
    """
    spec = DATASETS[dataset]
    torch.manual_seed(seed)
    x, y = load(dataset)
    model = nn.Sequential(
        nn.Linear(x.shape[1], 32),
        nn.Tanh(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, spec.outputs),
    )
    loss_fn = spec.loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = FisherMonitor(model, loss_fn, ema_decay=0.95)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = monitor.log_to(out / LOG_NAME)
    batches = [
        (epoch, order[i : i + batch_size])
        for epoch in range(epochs)
        for order in [torch.randperm(len(x))]
        for i in range(0, len(x), batch_size)
    ]
    for _, batch in monitor.progress(
        batches, disable=not progress, desc=f"fimhooks demo ({dataset})"
    ):
        optimizer.zero_grad()
        loss = loss_fn(model(x[batch]), y[batch])
        with monitor:
            loss.backward()
        optimizer.step()
    log.close()
    write_report(
        read_log(out / LOG_NAME), out, title=f"fimhooks demo: {dataset} ({spec.description})"
    )
    return monitor


def _cell(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3g}"


def console_summary(estimates, target: float = 0.05) -> str:
    """The per-layer table the demo prints, at most ``CONSOLE_WIDTH`` characters wide.

    Per estimator the trace and the relative standard error; the label share of the
    sampled estimators; the recommended estimator and the inputs it needs to reach
    ``target``. The full table (``FisherEstimates.summary``, with every estimator's
    guidance, label draws and ``zero v2``) is in ``report.md`` and ``report.html``.
    """
    layers = estimates.layer_statistics(target)
    estimators = list(estimates.estimators)
    sampled = [e for e in estimators if label_sampled(e)] if estimates.label_noise else []
    header = ["layer", "module", "params"]
    header += [f"{key} {e}" for e in estimators for key in ("tr", "rse")]
    header += [f"label {e}" for e in sampled] + ["best", f"N@{target:.0%}"]
    rows = [header]
    for layer, stats in layers.items():
        row = [layer or "<model>", str(stats["module"]), str(stats["params"])]
        row += [_cell(stats[e][key]) for e in estimators for key in ("trace", "rse")]
        row += [_cell(stats[e]["label_share"]) for e in sampled]
        best = stats["recommended"]
        needed = stats[best]["inputs_needed"] if best in stats else math.nan
        row += [best, "n/a" if not math.isfinite(needed) else f"{math.ceil(needed):,}"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    legend = (
        f"tr: trace; rse: relative standard error (label + data noise); label: part of the "
        f"variance due to label noise; best: the estimator that reaches {target:.0%} with the "
        f"fewest backpropagated vectors; N@{target:.0%}: the inputs it needs. The full table "
        "is in report.md."
    )
    title = f"fimhooks: diagonal Fisher over {estimates.num_inputs} inputs"
    if estimates.skipped:
        title += f", {estimates.skipped} batches skipped"
    return "\n".join([title, *lines, textwrap.fill(legend, CONSOLE_WIDTH)])
