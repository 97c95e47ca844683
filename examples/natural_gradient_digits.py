"""Natural gradient from fimhooks' running Fisher against SGD and Adam on digits.

Same model, data, batches and number of steps for every method, several seeds. Each
method's learning rate is the best of a three-point grid (SGD 0.1/0.3/1, Adam 1e-3/3e-3/1e-2,
natural gradient 0.01/0.02/0.05 with damping 0.03): the lowest mean final training loss
over seeds 0-2 among rates that trained on every seed. Prints a Markdown table and writes
``loss_vs_steps.png`` and ``loss_vs_time.png``:

    python examples/natural_gradient_digits.py --out ng-digits
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import fimhooks
from fimhooks.optim import FisherPreconditioner
from fimhooks.show.demo import load

METHODS = {
    "SGD": dict(optimizer="sgd", lr=1.0),
    "Adam": dict(optimizer="adam", lr=1e-2),
    "NG diag I1": dict(lr=0.05, estimators=("I1",), estimator="I1", structure="diag"),
    "NG diag I2": dict(lr=0.02, estimators=("I2",), estimator="I2", structure="diag"),
    "NG diag auto": dict(
        lr=0.02, estimators=("I1", "I2", "exact"), estimator="auto", structure="diag"
    ),
    "NG KFAC": dict(lr=0.05, estimators=("I1",), estimator="I1", structure="kfac"),
}


def load_data(seed=0):
    """Standardized digits, split 80/20 into training and test data."""
    x, y = load("digits")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def train(method, train_data, test_data, seed, epochs, batch_size=64):
    """One run; returns losses per step, wall-clock time per step and the test metrics."""
    config = METHODS[method]
    torch.manual_seed(seed)
    x, y = train_data
    model = nn.Sequential(
        nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    loss_fn = nn.CrossEntropyLoss()
    precond = monitor = None
    if config.get("optimizer") == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    if "structure" in config:
        monitor = fimhooks.FisherMonitor(
            model, loss_fn, ema_decay=0.95, estimators=config["estimators"]
        )
        precond = FisherPreconditioner(
            monitor, damping=3e-2, estimator=config["estimator"], structure=config["structure"]
        )
    losses, times, start = [], [], time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            batch = order[i : i + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            if monitor is None:
                loss.backward()
            else:
                with monitor:
                    loss.backward()
                precond.step()
            optimizer.step()
            losses.append(loss.item())
            times.append(time.perf_counter() - start)
    if monitor is not None:
        monitor.remove()
    with torch.no_grad():
        logits = model(test_data[0])
        test_loss = loss_fn(logits, test_data[1]).item()
        accuracy = (logits.argmax(1) == test_data[1]).double().mean().item()
    return losses, times, test_loss, accuracy


def smooth(values, window=10):
    return [statistics.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("ng-digits"))
    args = parser.parse_args()
    train_data, test_data = load_data()
    runs = {
        m: [train(m, train_data, test_data, s, args.epochs) for s in range(args.seeds)]
        for m in METHODS
    }

    print("| method | final train loss (last 20 steps) | test loss | test accuracy | seconds |")
    print("|---|---:|---:|---:|---:|")
    for method, results in runs.items():
        final = [statistics.mean(r[0][-20:]) for r in results]
        cells = [
            final,
            [r[2] for r in results],
            [r[3] for r in results],
            [r[1][-1] for r in results],
        ]
        print(f"| {method} | " + " | ".join(_mean_sd(c) for c in cells) + " |")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots need matplotlib: pip install 'fimhooks[examples]'")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for axis, name in ((0, "steps"), (1, "time")):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for i, (method, results) in enumerate(runs.items()):
            for j, (losses, times, *_) in enumerate(results):
                xs = range(1, len(losses) + 1) if axis == 0 else times
                ax.plot(
                    xs, smooth(losses), color=f"C{i}", alpha=0.8, label=method if j == 0 else None
                )
        ax.set(
            title=f"Digits, {args.seeds} seeds: training loss (10-step moving average)",
            xlabel="step" if axis == 0 else "wall-clock seconds",
            ylabel="cross-entropy",
        )
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(args.out / f"loss_vs_{name}.png", dpi=110)
        plt.close(fig)
    print(f"\nplots: {args.out}/loss_vs_steps.png, {args.out}/loss_vs_time.png")


def _mean_sd(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3g} ± {sd:.2g}"


if __name__ == "__main__":
    main()
