"""The demo: train a small MLP on scikit-learn's bundled data with a monitor attached."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fimhooks.monitor import FisherMonitor
from fimhooks.show.jsonlog import read_log
from fimhooks.show.report import write_report

LOG_NAME = "fimhooks_log.jsonl"


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
