"""What the self-verification adds to the first collected step of a model structure.

A script, not a test. For each benchmark model of ``bench_overhead.py`` it times the first
collected step of a fresh monitor (``estimators=("I1", "exact")``; Î₁ alone on the language
model, whose exact pass is no benchmark row) with ``verify="first"``
and with ``verify="off"``, alternating, and prints their medians, the difference, and that
difference in plain training steps of the same run. Later steps do not verify, so the
steady-state rows of ``bench_overhead.py`` do not include it.

    python benchmarks/bench_verification.py
    python benchmarks/bench_verification.py --models mlp_tanh,cnn --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_overhead import MODELS, make_problem

import fimhooks


def first_step(model, loss_fn, x, y, verify: str, estimators) -> float:
    """Seconds of one collected step of a new monitor (built and removed outside the time)."""
    likelihood = "categorical" if isinstance(loss_fn, torch.nn.CrossEntropyLoss) else "gaussian"
    monitor = fimhooks.FisherMonitor(model, likelihood, estimators=estimators, verify=verify)
    model.zero_grad()
    start = time.perf_counter()
    loss = loss_fn(model(x), y)
    with monitor:
        loss.backward()
    seconds = time.perf_counter() - start
    monitor.remove()
    return seconds


def plain_step(model, loss_fn, x, y) -> float:
    """Seconds of a forward and backward pass without a monitor."""
    model.zero_grad()
    start = time.perf_counter()
    loss_fn(model(x), y).backward()
    return time.perf_counter() - start


def main():
    """Print one row per model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(
        "| model | first step, verify='first' (ms) | verify='off' (ms) | verification (ms) | in plain steps |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        model, loss_fn, x, y = make_problem(name, args.batch, "cpu")
        estimators = ("I1",) if name == "transformer_lm" else ("I1", "exact")
        first_step(model, loss_fn, x, y, "first", estimators)  # warm-up
        times = {"first": [], "off": [], "plain": []}
        for _ in range(args.repeats):
            times["first"].append(first_step(model, loss_fn, x, y, "first", estimators))
            times["off"].append(first_step(model, loss_fn, x, y, "off", estimators))
            times["plain"].append(plain_step(model, loss_fn, x, y))
        first, off, plain = (statistics.median(times[k]) for k in ("first", "off", "plain"))
        print(
            f"| {name} | {first * 1e3:.1f} | {off * 1e3:.1f} | {(first - off) * 1e3:.1f} "
            f"| {(first - off) / plain:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
