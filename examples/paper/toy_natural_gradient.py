"""Soen & Sun (2024), Fig. 1: natural gradient with Î₁ against Î₂ on a 2-D toy problem.

Inputs ``x ~ N(0, I₂)``, ``θ_true = (1, 1)``; linear regression (``y = θ_trueᵀx + ε``,
``ε ~ N(0, 1)``) and logistic regression (``y ~ Bernoulli(sigmoid(θ_trueᵀx))``), a model
``h = θᵀx`` without bias. 256 training and 4096 test points, 4 points per step, one label
drawn per input, learning rate 0.01, 256 epochs. Each step preconditions with the Fisher of
its own mini-batch (the monitor is reset before the step), estimated by Î₁ or by Î₂.

``h`` is affine in ``θ``, so Î₂ has no label noise here: it equals the exact Fisher of the
mini-batch, while Î₁ varies with the labels it draws. Writes ``toy_natural_gradient.png``
and ``toy_natural_gradient.md``::

    python examples/paper/toy_natural_gradient.py --out docs/paper
    python examples/paper/toy_natural_gradient.py --quick --out /tmp/toy
"""

import argparse
import math
import statistics
from pathlib import Path

import torch
from figures import save_small
from torch import nn

import fimhooks
from fimhooks.optim import FisherPreconditioner

THETA_TRUE = (1.0, 1.0)
THETA_START = (-1.0, 2.0)
ESTIMATORS = ("I1", "I2")
NAMES = {"I1": "Î₁", "I2": "Î₂"}
#: Per-observation negative log-likelihood of each problem; its gradient is the natural
#: gradient's scale (``lr`` is the step size itself).
PROBLEMS = {
    "linear regression": "gaussian",
    "logistic regression": "bernoulli",
}


def make_data(likelihood, n, generator):
    """``n`` inputs ``[n, 2]`` and labels ``[n, 1]`` drawn from ``θ_true``."""
    x = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    h = x @ torch.tensor(THETA_TRUE, dtype=torch.float64).unsqueeze(1)
    if likelihood == "gaussian":
        return x, h + torch.randn(h.shape, generator=generator, dtype=h.dtype)
    return x, torch.bernoulli(torch.sigmoid(h), generator=generator)


def nll(likelihood, h, y):
    """Mean negative log-likelihood per observation (σ = 1 for the Gaussian)."""
    if likelihood == "gaussian":
        return 0.5 * ((h - y) ** 2).mean() + 0.5 * math.log(2 * math.pi)
    return nn.functional.binary_cross_entropy_with_logits(h, y)


def train(likelihood, estimator, seed, epochs, n_train, n_test, batch, lr, damping):
    """One run.

    Returns:
        Test NLL per epoch (from epoch 0), the mean over each epoch's steps of the summed
        label-noise variance of the step's estimate, θ per epoch, and the test NLL at
        ``θ_true``.
    """
    generator = torch.Generator().manual_seed(seed)
    x, y = make_data(likelihood, n_train, generator)
    x_test, y_test = make_data(likelihood, n_test, generator)
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([THETA_START]))
    monitor = fimhooks.FisherMonitor(model, likelihood, estimators=("I1", "I2", "exact"), seed=seed)
    precond = FisherPreconditioner(monitor, damping=damping, estimator=estimator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def test_nll():
        with torch.no_grad():
            return nll(likelihood, model(x_test), y_test).item()

    losses, variances, path = [test_nll()], [], [model.weight.detach().flatten().tolist()]
    for _ in range(epochs):
        order = torch.randperm(n_train, generator=generator)
        epoch_variance = []
        for i in range(0, n_train, batch):
            rows = order[i : i + batch]
            optimizer.zero_grad()
            loss = nll(likelihood, model(x[rows]), y[rows])
            monitor.reset()  # the Fisher of this mini-batch alone
            with monitor:
                loss.backward()
            variance = monitor.live_estimates().variance(estimator)["weight"]
            epoch_variance.append(variance.sum().item())
            precond.step()
            optimizer.step()
        losses.append(test_nll())
        variances.append(statistics.fmean(epoch_variance))
        path.append(model.weight.detach().flatten().tolist())
    monitor.remove()
    with torch.no_grad():
        best = nll(likelihood, x_test @ torch.tensor([THETA_TRUE]).double().T, y_test).item()
    return losses, variances, path, best


def run(args):
    """All problems × estimators × seeds: ``{(problem, estimator): [run, ...]}``."""
    results = {}
    for problem, likelihood in PROBLEMS.items():
        for estimator in ESTIMATORS:
            results[problem, estimator] = [
                train(
                    likelihood,
                    estimator,
                    seed,
                    args.epochs,
                    args.train,
                    args.test,
                    args.batch,
                    args.lr,
                    args.damping,
                )
                for seed in range(args.seeds)
            ]
    return results


def _mean_sd(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd


def table(results, epochs):
    """Markdown table: final test NLL and label-noise variance, mean ± sd over seeds."""
    half = max(epochs // 2, 1)
    lines = [
        f"| problem | estimator | test NLL, epoch {half} | test NLL, epoch {epochs} | "
        "test NLL at θ_true | Σ variance, epoch 1 | Σ variance, last epoch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (problem, estimator), runs in results.items():
        cells = [
            _mean_sd([r[0][half] for r in runs]),
            _mean_sd([r[0][-1] for r in runs]),
            _mean_sd([r[3] for r in runs]),
            _mean_sd([r[1][0] for r in runs]),
            _mean_sd([r[1][-1] for r in runs]),
        ]
        text = [f"{m:.4f} ± {s:.4f}" for m, s in cells[:3]]
        text += [f"{m:.3g} ± {s:.2g}" for m, s in cells[3:]]
        lines.append(f"| {problem} | {NAMES[estimator]} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def plot(results, out):
    """Per problem: test NLL, summed label-noise variance (log axis) and one seed's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"I1": "tab:blue", "I2": "tab:orange"}
    fig, axes = plt.subplots(len(PROBLEMS), 3, figsize=(11, 6.2))
    for row, problem in zip(axes, PROBLEMS):
        for estimator in ESTIMATORS:
            runs = results[problem, estimator]
            label = NAMES[estimator]
            losses = torch.tensor([r[0] for r in runs])
            epochs = torch.arange(losses.shape[1])
            mean, sd = losses.mean(0), losses.std(0) if len(runs) > 1 else 0 * losses[0]
            row[0].plot(epochs, mean, color=colors[estimator], label=label)
            row[0].fill_between(epochs, mean - sd, mean + sd, color=colors[estimator], alpha=0.25)
            variances = torch.tensor([r[1] for r in runs]).mean(0)
            if (variances > 0).any():
                row[1].plot(epochs[1:], variances, color=colors[estimator], label=label)
            else:
                row[1].plot([], [], color=colors[estimator], label=f"{label}: 0 at every step")
            path = torch.tensor(runs[0][2])
            row[2].plot(path[:, 0], path[:, 1], color=colors[estimator], lw=1, label=label)
        best = statistics.fmean(r[3] for r in results[problem, "I2"])
        row[0].axhline(best, color="k", ls=":", lw=1, label="at θ_true")
        start = losses[:, 0].max().item()
        row[0].set_ylim(best - 0.05 * (start - best), start * 1.05)
        row[2].plot(*THETA_TRUE, "k*", ms=9, label="θ_true")
        row[2].plot(*THETA_START, "ko", ms=4)
        row[0].set(title=f"{problem}: test NLL (mean ± sd)", xlabel="epoch", xscale="symlog")
        row[0].set_xlim(0, losses.shape[1] - 1)
        row[1].set(title="Σ label-noise variance per step", xlabel="epoch", yscale="log")
        row[2].set(title="θ (seed 0)", xlabel="θ₁", ylabel="θ₂")
        for ax in row:
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_small(fig, out / "toy_natural_gradient.png")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("paper-toy"))
    parser.add_argument(
        "--quick", action="store_true", help="2 epochs, 2 seeds, 64 training and 256 test points"
    )
    parser.add_argument("--epochs", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--test", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--damping", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.train, args.test = 2, 2, 64, 256
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(args)
    text = table(results, args.epochs)
    (args.out / "toy_natural_gradient.md").write_text(text)
    plot(results, args.out)
    print(text)


if __name__ == "__main__":
    main()
