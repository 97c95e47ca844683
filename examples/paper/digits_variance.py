"""Soen & Sun (2024), Fig. 2: per-layer variances of Î₁ and Î₂ and their bounds, on digits.

The paper trains on MNIST, which cannot be downloaded here; this script uses scikit-learn's
bundled 8×8 digits (1797 images, 10 classes, standardized, split 80/20). Two networks:

* ``sigmoid``: 4 Linear layers 64-64-64-64-10 with Sigmoid activations and dropout;
* ``logsigmoid``: 5 Linear layers 64-64-64-64-64-10 with LogSigmoid activations and dropout.

Each trains for 20 epochs (Adam, lr 3e-3, batch 64, dropout 0.1 active). Before training and
after every epoch the network is put in eval mode (dropout off) and fimhooks measures, on
one test input, per Linear layer: the exact Fisher diagonal, the label-noise variances
``v₁``, ``v₂`` of one draw, and their Thm 4.1 upper bounds. The standard deviations shown are
those of Î₁ and Î₂ over N = 5000 label draws, in closed form: ``sqrt(v / N)``; no label is
drawn 5000 times. Per layer, entries are combined as root mean squares (Fisher: the mean
entry; std and bound: ``sqrt(mean_i v_i / N)``), and the tightness is fimhooks' per-layer
``bound_tightness``, ``Σ_i upper_i / Σ_i v_i``. Writes ``digits_<network>.png`` and
``digits_variance.md``::

    python examples/paper/digits_variance.py --out docs/paper
    python examples/paper/digits_variance.py --quick --out /tmp/digits
"""

import argparse
import math
from pathlib import Path

import torch
from figures import save_small
from torch import nn

import fimhooks
from fimhooks.show.demo import load

DRAWS = 5000
NETWORKS = {"sigmoid": (nn.Sigmoid, 4), "logsigmoid": (nn.LogSigmoid, 5)}
ESTIMATORS = ("I1", "I2")
NAMES = {"I1": "Î₁", "I2": "Î₂"}


def network(activation, layers, width, dropout):
    """``layers`` Linear layers 64-width-...-10 with ``activation`` and dropout between."""
    sizes = [64] + [width] * (layers - 1) + [10]
    modules = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        modules.append(nn.Linear(n_in, n_out))
        if i < layers - 1:
            modules += [activation(), nn.Dropout(dropout)]
    return nn.Sequential(*modules)


def measure(model, x):
    """Per Linear layer (from 1): mean Fisher entry, std of Î₁, Î₂ over ``DRAWS`` draws, bounds.

    The Fisher is measured in eval mode (dropout off); the model's mode is restored.
    """
    training = model.training
    model.eval()
    est = fimhooks.estimate(model, "categorical", x, progress=False, bounds=True)
    model.train(training)
    fisher = est.fisher("exact")
    stats = est.layer_statistics()
    variances = {e: est.variance(e) for e in ESTIMATORS}  # one input, one draw: v(x)
    uppers = {e: est.bounds(e)[1] for e in ESTIMATORS}
    rows = {}
    linear = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    for number, (path, module) in enumerate(linear, start=1):
        names = [f"{path}.{local}" for local, _ in module.named_parameters()]
        entries = sum(fisher[n].numel() for n in names)
        row = {"fisher": sum(fisher[n].sum().item() for n in names) / entries}
        for e in ESTIMATORS:
            v = sum(variances[e][n].sum().item() for n in names)
            u = sum(uppers[e][n].sum().item() for n in names)
            row[f"std {e}"] = math.sqrt(v / entries / DRAWS)
            row[f"bound {e}"] = math.sqrt(u / entries / DRAWS)
            row[f"tightness {e}"] = stats[path][e]["bound_tightness"]
        rows[number] = row
    return rows


def train(name, epochs, width, dropout, seed, test_index):
    """Train one network.

    Returns:
        ``[{layer: measurements}]`` at epoch 0, 1, ..., epochs, and the test input's
        ``final_state`` after training.
    """
    torch.manual_seed(seed)
    x, y = load("digits")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    train_rows, test_row = order[:split], order[split + test_index]
    x_one = x[test_row : test_row + 1]
    activation, layers = NETWORKS[name]
    model = network(activation, layers, width, dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = [measure(model, x_one)]
    for _ in range(epochs):
        shuffled = train_rows[torch.randperm(len(train_rows))]
        for i in range(0, len(shuffled), 64):
            rows = shuffled[i : i + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            optimizer.step()
        history.append(measure(model, x_one))
    test_rows = order[split:]
    return history, final_state(model, x[test_rows], y[test_rows], x_one)


def final_state(model, x_test, y_test, x_one):
    """Test accuracy; ``max_c p_c``, ``m(x)``, ``λ_max(I_h)`` of the test input (eval mode).

    The paper's closed categorical bound of ``v₂`` uses ``m(x) = min(max_c p_c, 1 − ‖p‖²)``
    where fimhooks uses the exact ``λ_max(I_h)`` (at most ``m(x)``).
    """
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).double().mean().item()
        p = torch.softmax(model(x_one), dim=1)[0].double()
    model.train()
    m = min(p.max().item(), 1 - (p * p).sum().item())
    largest = torch.linalg.eigvalsh(torch.diag(p) - torch.outer(p, p))[-1].item()
    return accuracy, p.max().item(), m, largest


def table(histories, final):
    """Markdown: per layer at the last epoch, and tightness and V₁ < V₂ over all epochs.

    Then per network its test accuracy and the test input's ``final_state``.
    """
    lines = [
        "| network | layer | Fisher (mean entry) | std Î₁ | std Î₂ | upper/actual V₁ "
        "(last; median over epochs) | upper/actual V₂ (last; median) | epochs with V₁ < V₂ |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, history in histories.items():
        for layer, last in history[-1].items():
            cells = [f"{last['fisher']:.3g}", f"{last['std I1']:.3g}", f"{last['std I2']:.3g}"]
            for e in ESTIMATORS:
                over_epochs = torch.tensor([h[layer][f"tightness {e}"] for h in history])
                median = over_epochs.nanmedian().item()
                cells.append(f"{_fmt(last[f'tightness {e}'])}; {_fmt(median)}")
            smaller = sum(h[layer]["std I1"] < h[layer]["std I2"] for h in history)
            cells.append(f"{smaller}/{len(history)}")
            lines.append(f"| {name} | {layer} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| network | test accuracy | max_c p_c | m(x) | λ_max(I_h) | m(x) / λ_max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, (accuracy, p_max, m, largest) in final.items():
        cells = [
            f"{accuracy:.3f}",
            f"{p_max:.6f}",
            f"{m:.3g}",
            f"{largest:.3g}",
            f"{m / largest:.3g}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value):
    return "n/a (V₂ = 0)" if math.isnan(value) else f"{value:.3g}"


def plot(name, history, out):
    """Per layer: Fisher, std of Î₁ and Î₂ and their bounds (top), log(upper/actual) (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(history[0])
    epochs = list(range(len(history)))
    fig, axes = plt.subplots(2, len(layers), figsize=(2.8 * len(layers), 5), squeeze=False)
    colors = {"I1": "tab:blue", "I2": "tab:orange"}
    for column, layer in zip(axes.T, layers):
        series = {key: [h[layer][key] for h in history] for key in history[0][layer]}
        column[0].plot(epochs, series["fisher"], "k", label="Fisher")
        for e in ESTIMATORS:
            column[0].plot(epochs, series[f"std {e}"], color=colors[e], label=f"std {NAMES[e]}")
            column[0].plot(
                epochs, series[f"bound {e}"], "--", color=colors[e], label=f"bound {NAMES[e]}"
            )
            column[1].plot(
                epochs,
                [math.log(t) if t > 0 else math.nan for t in series[f"tightness {e}"]],
                color=colors[e],
                label=f"V{e[1]}",
            )
        column[0].set(title=f"layer {layer}", yscale="log", xlabel="epoch")
        column[1].set(xlabel="epoch", ylabel="log(upper / actual)")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    fig.suptitle(f"{name} MLP on digits, one test input, N = {DRAWS} draws")
    fig.tight_layout()
    save_small(fig, out / f"digits_{name}.png")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("paper-digits"))
    parser.add_argument("--quick", action="store_true", help="1 epoch, width 16")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-index", type=int, default=0, help="which test input")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.width = 1, 16
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    histories, final = {}, {}
    for name in NETWORKS:
        histories[name], final[name] = train(
            name, args.epochs, args.width, args.dropout, args.seed, args.test_index
        )
        plot(name, histories[name], args.out)
    text = table(histories, final)
    (args.out / "digits_variance.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
