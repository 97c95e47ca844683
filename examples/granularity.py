"""Which granularity: label noise, its calibration and its cost, measured during training.

Two models: a character-level causal transformer trained on the Python standard library's
own source files (on disk, no download), where "token", "input" and "batch" are three
different estimators, and a 64-32-10 tanh MLP on scikit-learn's digits, where "token" and
"input" coincide (one observation per input). At several points of training, on a fixed
evaluation batch, each granularity gets

* the closed-form label-noise variance of one collected step (token, input: the exact
  pass's ``variance("I1")``; batch: the input monitor's ``variance("I1",
  granularity="batch")``, docs/granularity.md), and the draws' estimate of it (``estimators=("I1",)``,
  ``mc_samples >= 2``);
* the variance observed over ``--repeats`` independent collected steps on the same batch,
  against the closed form (calibration, ≈ 1);
* the seconds of a collected step with ``estimators=("I1",)``, against a plain step
  (zero_grad, forward, backward) of an unhooked copy of the model timed alternately;
* variance × seconds (lower is better) and the relative standard error that one second of
  collection reaches, without and with the data noise of fresh batches.

Prints the tables and writes them as JSON to ``--out``:

    python examples/granularity.py --out granularity-run    # about 3 minutes on 2 CPU cores
    python examples/granularity.py --quick                  # about 30 seconds
"""

import argparse
import collections
import copy
import glob
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fimhooks
from fimhooks.show.demo import load

GRANULARITIES = ("token", "input", "batch")


class CausalBlock(nn.Module):
    """Pre-norm transformer block, causal attention computed functionally."""

    def __init__(self, d: int, heads: int):
        """Layers of one block.

        Args:
            d: Width.
            heads: Attention heads (dividing ``d``).
        """
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        """Residual attention and MLP.

        Args:
            x: ``[N, T, d]``.
        """
        n, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class CharTransformer(nn.Module):
    """Character-level causal language model: embeddings, blocks, final norm, head."""

    def __init__(self, vocab: int, d: int, length: int, layers: int, heads: int = 2):
        """Modules of the model.

        Args:
            vocab: Vocabulary size.
            d: Width.
            length: Longest sequence (position embeddings).
            layers: Transformer blocks.
            heads: Attention heads per block.
        """
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.blocks = nn.Sequential(*[CausalBlock(d, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, tokens):
        """Logits ``[N, T, vocab]``.

        Args:
            tokens: ``[N, T]`` character ids.
        """
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)[None]
        return self.head(self.norm(self.blocks(x)))


def stdlib_text(max_chars: int) -> str:
    """The first ``max_chars`` characters of the standard library's ``.py`` files, by name.

    Args:
        max_chars: How many characters to read.
    """
    parts, size = [], 0
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
        size += len(parts[-1])
        if size >= max_chars:
            break
    return "".join(parts)[:max_chars]


def encode(text: str, vocab: int):
    """Character ids: the ``vocab - 1`` most frequent characters, every other one id.

    Args:
        text: The corpus.
        vocab: Vocabulary size, the shared id of rare characters included.

    Returns:
        ``(ids, coverage)``: a ``[len(text)]`` long tensor and the share of characters that
        have their own id.
    """
    counts = collections.Counter(text)
    common = [c for c, _ in counts.most_common(vocab - 1)]
    index = {c: i for i, c in enumerate(common)}
    ids = torch.tensor([index.get(c, vocab - 1) for c in text])
    return ids, sum(counts[c] for c in common) / len(text)


def sequences(ids, starts, length: int):
    """Inputs and next-character targets of the windows that begin at ``starts``.

    Args:
        ids: The encoded corpus.
        starts: ``[N]`` window starts.
        length: Window length ``T``.
    """
    x = torch.stack([ids[s : s + length] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + length + 1] for s in starts.tolist()])
    return x, y


def cross_entropy(logits, targets):
    """Mean cross-entropy over every position, class axis last.

    Args:
        logits: ``[N, C]`` or ``[N, T, C]``.
        targets: ``[N]`` or ``[N, T]``.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def language_model(args):
    """The character-level language model's problem: model, batches, evaluation batch.

    Args:
        args: The command line.
    """
    ids, coverage = encode(stdlib_text(args.chars), args.vocab)
    split = int(0.9 * len(ids))
    generator = torch.Generator().manual_seed(args.seed)
    model = CharTransformer(args.vocab, args.width, args.length, args.layers)

    def batch():
        starts = torch.randint(0, split - args.length - 1, (args.batch,), generator=generator)
        return sequences(ids, starts, args.length)

    starts = torch.randint(
        split, len(ids) - args.length - 1, (args.eval_batch,), generator=generator
    )
    description = (
        f"causal transformer ({args.layers} block, d {args.width}, 2 heads), vocabulary "
        f"{args.vocab} ({100 * coverage:.1f}% of the characters have their own id), "
        f"T {args.length}, {len(ids)} characters of the standard library's source"
    )
    return dict(
        name="char LM",
        description=description,
        model=model,
        batch=batch,
        eval=sequences(ids, starts, args.length),
        lr=3e-3,
    )


def digits(args):
    """The digits MLP's problem: model, batches, evaluation batch.

    Args:
        args: The command line.
    """
    x, y = load("digits")
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(x), generator=generator)
    train, held_out = order[: int(0.8 * len(x))], order[int(0.8 * len(x)) :]
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def batch():
        pick = train[torch.randint(0, len(train), (args.digits_batch,), generator=generator)]
        return x[pick], y[pick]

    evaluation = held_out[: args.digits_eval_batch]
    return dict(
        name="digits MLP",
        description="MLP 64-32-10 (tanh) on scikit-learn's digits, one observation per input",
        model=model,
        batch=batch,
        eval=(x[evaluation], y[evaluation]),
        lr=1e-2,
    )


def plain_step(model, x, y, monitor=None):
    """zero_grad, forward, backward; in the monitor's ``with`` block when one is given.

    Args:
        model: The network.
        x: Inputs.
        y: Targets (the loss's; the monitor draws its own labels).
        monitor: A ``FisherMonitor`` on ``model``, or ``None``.

    Returns:
        The step's seconds.
    """
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    loss = cross_entropy(model(x), y)
    if monitor is None:
        loss.backward()
    else:
        with monitor:
            loss.backward()
    return time.perf_counter() - start


def by_layer(diagonal, estimates):
    """Flatten a per-parameter diagonal into one float64 vector per layer, and ``"model"``.

    Args:
        diagonal: ``{param name: tensor}``.
        estimates: The ``FisherEstimates`` that name each parameter's layer.
    """
    layers = collections.defaultdict(list)
    for name, value in diagonal.items():
        layers[estimates.layer_of(name)].append(value.detach().double().flatten())
    out = {layer: torch.cat(values) for layer, values in layers.items()}
    out["model"] = torch.cat(list(out.values()))
    return out


def closed_forms(model, x, y, args):
    """Exact diagonal, data variance and closed-form label variance of one step, per entry.

    Token and input from their exact pass; batch from the input one's
    ``variance("I1", granularity="batch")``: the batch's square is that of the sum of the
    inputs' summed scores, so its variance adds the cross terms
    ``2[(Σ f_n)² − Σ f_n²] / (N² M)`` of the inputs' exact diagonals ``f_n``.

    Args:
        model: The network.
        x: The evaluation inputs.
        y: Their targets.
        args: The command line (``mc_samples``, ``seed``).

    Returns:
        ``{"exact", "data", "token", "input", "batch", "input_from_token"}``, each
        ``{layer: vector}``; the last is the token monitor's ``variance("I1",
        granularity="input")``, a check of ``"input"``.
    """
    out = {}
    for granularity in ("token", "input"):
        monitor = fimhooks.FisherMonitor(
            model,
            "categorical",
            estimators=("I1", "exact"),
            mc_samples=args.mc_samples,
            granularity=granularity,
            seed=args.seed,
        )
        plain_step(model, x, y, monitor)
        estimates = monitor.estimates()
        monitor.remove()
        assert estimates.label_noise == "closed form", estimates.label_noise
        out[granularity] = by_layer(estimates.variance("I1"), estimates)
        if granularity == "token":  # the same closed form, had the square been per input
            other = estimates.variance("I1", granularity="input")
            out["input_from_token"] = by_layer(other, estimates)
        else:  # had the square been per batch (same inputs, one backward pass)
            out["batch"] = by_layer(estimates.variance("I1", granularity="batch"), estimates)
        out.setdefault("exact", by_layer(estimates.fisher("exact"), estimates))
        out.setdefault("data", by_layer(estimates.data_variance(), estimates))
    return out


def repeated_draws(model, x, y, granularity, args):
    """``args.repeats`` collected steps with ``estimators=("I1",)`` on the same batch.

    Each step starts from ``monitor.reset()``, so its estimates are that step's alone; its
    labels continue the monitor's generator, so the steps' draws are independent. A plain
    step of an unhooked copy of the model is timed before each collected step.

    Args:
        model: The network.
        x: The evaluation inputs.
        y: Their targets.
        granularity: One of ``GRANULARITIES``.
        args: The command line (``repeats``, ``mc_samples``, ``seed``).

    Returns:
        ``{"values": {layer: [R, entries]}, "draws": {layer: [R]} (the draws' variance
        estimate, summed over the layer), "collected_s": [R], "plain_s": [R]}``.
    """
    twin = copy.deepcopy(model)
    monitor = fimhooks.FisherMonitor(
        model,
        "categorical",
        estimators=("I1",),
        mc_samples=args.mc_samples,
        granularity=granularity,
        seed=args.seed + 1 + GRANULARITIES.index(granularity),
    )
    values, draws = collections.defaultdict(list), collections.defaultdict(list)
    collected, plain = [], []
    for _ in range(args.repeats):
        plain.append(plain_step(twin, x, y))
        monitor.reset()
        collected.append(plain_step(model, x, y, monitor))
        estimates = monitor.estimates()
        for layer, vector in by_layer(estimates.fisher("I1"), estimates).items():
            values[layer].append(vector)
        for layer, vector in by_layer(estimates.variance("I1"), estimates).items():
            draws[layer].append(vector.sum().item())
    monitor.remove()
    return dict(
        values={layer: torch.stack(v) for layer, v in values.items()},
        draws=dict(draws),
        collected_s=collected,
        plain_s=plain,
    )


def one_draw_cost(model, x, y, granularity, args):
    """Median seconds of a collected step with ``mc_samples=1`` and of a plain step.

    With one draw, ``"input"`` and ``"batch"`` take a plain backward (no ``vmap``); the
    label variance is then exactly ``M`` times that at ``M`` draws.

    Args:
        model: The network.
        x: The evaluation inputs.
        y: Their targets.
        granularity: One of ``GRANULARITIES``.
        args: The command line (``cost_repeats``, ``seed``).
    """
    twin = copy.deepcopy(model)
    monitor = fimhooks.FisherMonitor(
        model, "categorical", estimators=("I1",), granularity=granularity, seed=args.seed
    )
    collected, plain = [], []
    for _ in range(args.cost_repeats + 1):
        plain.append(plain_step(twin, x, y))
        collected.append(plain_step(model, x, y, monitor))
    monitor.remove()
    return statistics.median(collected[1:]), statistics.median(plain[1:])


def observed_variance(values):
    """Sum over entries of the sample variance across steps, and its standard error.

    Args:
        values: ``[R, entries]`` one value per step and entry.
    """
    r = values.shape[0]
    deviations = ((values - values.mean(0)) ** 2).sum(1) * (r / (r - 1))  # [R]
    mean = deviations.mean().item()
    return mean, deviations.std().item() / math.sqrt(r)


def measure(model, x, y, args, granularities):
    """Every granularity's numbers on one batch at the model's current parameters.

    Args:
        model: The network.
        x: The evaluation inputs.
        y: Their targets.
        args: The command line.
        granularities: Those to measure.

    Returns:
        ``{granularity: {layer: row}}``; a row holds the per-step label variance (closed
        form), the data variance, the squared norm of the exact diagonal, the observed
        variance and its standard error, the mean draws' estimate and (``"model"`` rows)
        the seconds per collected and plain step.
    """
    closed = closed_forms(model, x, y, args)
    out = {}
    for granularity in granularities:
        draws = repeated_draws(model, x, y, granularity, args)
        timed = slice(1, None)  # the first collected step checks the rules (verify="first")
        seconds = statistics.median(draws["collected_s"][timed])
        plain = statistics.median(draws["plain_s"][timed])
        rows = {}
        for layer, exact in closed["exact"].items():
            observed, error = observed_variance(draws["values"][layer])
            rows[layer] = dict(
                entries=exact.numel(),
                fisher_sq_norm=(exact**2).sum().item(),
                label_variance=closed[granularity][layer].sum().item(),
                data_variance=closed["data"][layer].sum().item(),
                observed_variance=observed,
                observed_se=error,
                draws_variance=statistics.mean(draws["draws"][layer]),
            )
            if granularity == "input":
                rows[layer]["label_variance_from_token"] = (
                    closed["input_from_token"][layer].sum().item()
                )
        one, one_plain = one_draw_cost(model, x, y, granularity, args)
        rows["model"].update(
            seconds=seconds, plain_seconds=plain, seconds_m1=one, plain_seconds_m1=one_plain
        )
        out[granularity] = rows
    return out


def derived(row, seconds, draws):
    """The comparisons of one row: calibration ratios, rse per step and per second.

    Args:
        row: A row of ``measure``.
        seconds: Seconds per collected step.
        draws: The row's ``mc_samples``.
    """
    variance, norm = row["label_variance"], math.sqrt(row["fisher_sq_norm"])
    total = variance + row["data_variance"]
    return dict(
        observed_over_closed=row["observed_variance"] / variance,
        observed_over_closed_se=row["observed_se"] / variance,
        draws_over_closed=row["draws_variance"] / variance,
        rse_step=math.sqrt(variance) / norm,
        variance_x_seconds=variance * seconds,
        rse_1s=math.sqrt(variance * seconds) / norm,
        rse_1s_with_data=math.sqrt(total * seconds) / norm,
        seconds_to_5pct=variance * seconds / (0.05**2 * norm**2),
        variance_x_seconds_m1=variance * draws * row["seconds_m1"] if "seconds_m1" in row else None,
    )


def train(problem, steps, lr):
    """Adam steps on the problem's batches.

    Args:
        problem: From ``language_model`` or ``digits``.
        steps: How many.
        lr: Adam's learning rate.

    Returns:
        The mean training loss over these steps (NaN for none).
    """
    model = problem["model"]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        x, y = problem["batch"]()
        optimizer.zero_grad()
        loss = cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return statistics.mean(losses) if losses else float("nan")


def run(problem, args, granularities):
    """Train the problem's model and measure at ``args.checkpoints`` evenly spaced points.

    Args:
        problem: From ``language_model`` or ``digits``.
        args: The command line.
        granularities: Those to measure.
    """
    steps = args.steps if problem["name"] == "char LM" else args.digits_steps
    marks = [round(i * steps / (args.checkpoints - 1)) for i in range(args.checkpoints)]
    x, y = problem["eval"]
    points, done = [], 0
    for mark in marks:
        train_loss = train(problem, mark - done, problem["lr"])
        done = mark
        with torch.no_grad():
            eval_loss = cross_entropy(problem["model"](x), y).item()
        start = time.perf_counter()
        rows = measure(problem["model"], x, y, args, granularities)
        points.append(
            dict(
                step=mark,
                train_loss=train_loss,
                eval_loss=eval_loss,
                seconds=time.perf_counter() - start,
                granularities=rows,
            )
        )
        print_point(problem, points[-1], args.mc_samples)
        if "input" in rows:
            check = rows["input"]["model"]
            print(
                "input's closed form from the token monitor (variance(granularity='input')) "
                f"/ from the input monitor: {check['label_variance_from_token'] / check['label_variance']:.4f}"
            )
    return points


def print_point(problem, point, draws):
    """The whole model's table at one point of training.

    Args:
        problem: From ``language_model`` or ``digits``.
        point: One entry of ``run``'s list.
        draws: ``mc_samples`` of the measured steps.
    """
    print(
        f"\n{problem['name']}, step {point['step']}: eval loss {point['eval_loss']:.3f} "
        f"(measured in {point['seconds']:.0f} s)"
    )
    print(
        "| granularity | label var / step | rse / step | observed / closed | draws / closed "
        "| ms / step | × plain | var × s | rse in 1 s | with data noise | ms, M=1 "
        "| var × s, M=1 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for granularity, rows in point["granularities"].items():
        row = rows["model"]
        d = derived(row, row["seconds"], draws)
        print(
            f"| {granularity} | {row['label_variance']:.3g} | {d['rse_step']:.3f} "
            f"| {d['observed_over_closed']:.2f} ± {d['observed_over_closed_se']:.2f} "
            f"| {d['draws_over_closed']:.2f} | {1e3 * row['seconds']:.1f} "
            f"| {row['seconds'] / row['plain_seconds']:.1f} | {d['variance_x_seconds']:.3g} "
            f"| {d['rse_1s']:.4f} | {d['rse_1s_with_data']:.4f} "
            f"| {1e3 * row['seconds_m1']:.1f} | {d['variance_x_seconds_m1']:.3g} |"
        )


def print_layers(problem, point):
    """Per layer at one point: label variance against token's, and calibration.

    Args:
        problem: From ``language_model`` or ``digits``.
        point: One entry of ``run``'s list.
    """
    rows = point["granularities"]
    names = [g for g in GRANULARITIES if g in rows]
    print(f"\n{problem['name']}, step {point['step']}, per layer:")
    print(
        "| layer | entries | token rse / step | data / token label var | "
        + " | ".join(f"{g} / token" for g in names[1:])
        + " | "
        + " | ".join(f"observed / closed {g}" for g in names)
        + " |"
    )
    print("|---|---:|---:|---:|" + "---:|" * (2 * len(names) - 1))
    for layer, token in rows["token"].items():
        cells = [
            layer,
            str(token["entries"]),
            f"{math.sqrt(token['label_variance'] / token['fisher_sq_norm']):.3f}",
            f"{token['data_variance'] / token['label_variance']:.2f}",
        ]
        cells += [
            f"{rows[g][layer]['label_variance'] / token['label_variance']:.2f}" for g in names[1:]
        ]
        cells += [
            f"{rows[g][layer]['observed_variance'] / rows[g][layer]['label_variance']:.2f}"
            for g in names
        ]
        print("| " + " | ".join(cells) + " |")


def parse_args():
    """The command line, ``--quick`` applied."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for granularity.json; None: a new temporary directory",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer steps, points, repeats, smaller batch: about 30 seconds",
    )
    parser.add_argument("--models", default="lm,digits", help="comma-separated: lm, digits")
    parser.add_argument("--steps", type=int, default=450, help="language model's Adam steps")
    parser.add_argument("--digits-steps", type=int, default=300, help="digits MLP's Adam steps")
    parser.add_argument(
        "--checkpoints",
        type=int,
        default=4,
        help="points of training measured, the first at initialisation",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=100,
        help="independent collected steps per granularity and point (R)",
    )
    parser.add_argument(
        "--cost-repeats", type=int, default=20, help="steps timed with mc_samples=1"
    )
    parser.add_argument(
        "--mc-samples",
        type=int,
        default=2,
        help="label draws per observation (M >= 2: batch needs it)",
    )
    parser.add_argument("--batch", type=int, default=16, help="language model's training batch")
    parser.add_argument(
        "--eval-batch", type=int, default=16, help="language model's evaluation batch (sequences)"
    )
    parser.add_argument("--digits-batch", type=int, default=64, help="digits' training batch")
    parser.add_argument(
        "--digits-eval-batch", type=int, default=128, help="digits' evaluation batch"
    )
    parser.add_argument("--length", type=int, default=32, help="sequence length T")
    parser.add_argument(
        "--vocab", type=int, default=64, help="vocabulary, one id for all rare characters included"
    )
    parser.add_argument("--width", type=int, default=32, help="transformer width d")
    parser.add_argument("--layers", type=int, default=1, help="transformer blocks")
    parser.add_argument(
        "--chars", type=int, default=300_000, help="characters of standard-library source read"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 keeps timings steady on a shared machine)",
    )
    parser.add_argument("--seed", type=int, default=0, help="of the data, model and monitors")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.digits_steps, args.checkpoints = 150, 150, 2
        args.repeats, args.eval_batch, args.cost_repeats = 24, 8, 8
    if args.mc_samples < 2:
        parser.error(
            "--mc-samples must be at least 2 (granularity 'batch' estimates its variance from the draws)"
        )
    return args


def main():
    """Run the experiment, print the tables, write the JSON."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="fimhooks-granularity-"))
    out.mkdir(parents=True, exist_ok=True)
    problems = {"lm": language_model, "digits": digits}
    start = time.perf_counter()
    results = {}
    for key in args.models.split(","):
        torch.manual_seed(args.seed)
        problem = problems[key](args)
        print(f"\n## {problem['name']}: {problem['description']}")
        points = run(problem, args, GRANULARITIES)
        print_layers(problem, points[-1])
        for point in points:
            for rows in point["granularities"].values():
                row = rows["model"]
                row.update(derived(row, row["seconds"], args.mc_samples))
        results[problem["name"]] = dict(description=problem["description"], points=points)
    seconds = time.perf_counter() - start
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = dict(settings=settings, torch=torch.__version__, seconds=seconds, results=results)
    path = out / "granularity.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"\n{seconds:.0f} s in all; the numbers: {path}")


if __name__ == "__main__":
    main()
