"""Peak memory and time of a collected step under ``max_memory`` budgets.

A script, not a test. Each row runs in its own subprocess. It reports the median step
time, its ratio to a plain step timed alternately in the same process, and the step's peak
memory above the plain step's, for the monitor with no bound (``max_memory=None``: the
step's tensors at full size), the default budget (1 GiB) and a small one (256 MiB).

    python benchmarks/bench_memory.py                       # CPU
    python benchmarks/bench_memory.py --device cuda --batch-i2 2048
    PYTHONPATH=../old python benchmarks/bench_memory.py --budgets none   # an older version

Cases:

    classes1000   MLP 784-2048-2048-1000 (ReLU), cross-entropy, I1 and exact: the exact
                  pass backpropagates C = 1000 directions per input
    tanh_i2       MLP 784-2048-2048-2048-10 (Tanh, 4 Linear layers), all estimators: Î₂'s
                  curvature through three curved layers
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from bench_overhead import _peak_rss_mb, _reset_peak_rss
from torch import nn

import fimhooks

CASES = ["classes1000", "tanh_i2"]
#: glibc keeps freed blocks below its (growing) mmap threshold in the heap, so the resident
#: memory of many chunk-sized tensors would measure the allocator's retention, not the
#: tensors: the workers hand every block above 128 KiB back when it is freed.
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
BUDGETS = {"none": None, "default (1 GiB)": 2**30, "256 MiB": 2**28}


def make_case(name: str, batch: int, device: str):
    """Model, inputs, labels and the monitor's estimators of one case."""
    torch.manual_seed(0)
    if name == "classes1000":
        widths, act, estimators, classes = [784, 2048, 2048, 1000], nn.ReLU, ("I1", "exact"), 1000
    else:
        widths, act, estimators, classes = [784, 2048, 2048, 2048, 10], nn.Tanh, None, 10
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([act()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*layers).to(device)
    x = torch.randn(batch, widths[0], device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    return model, x, y, estimators


def run_worker(case: str, budget: str, batch: int, device: str, repeats: int) -> dict:
    """Median step time, ratio to plain and peak memory above the start (MB) of one row."""
    model, x, y, estimators = make_case(case, batch, device)
    options = {"estimators": estimators} if estimators else {}
    if "max_memory" in inspect.signature(fimhooks.FisherMonitor).parameters:
        options["max_memory"] = BUDGETS[budget]  # (earlier versions had no bound)
    monitor = fimhooks.FisherMonitor(model, "categorical", **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(collect: bool):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if collect:
            with monitor:
                loss.backward()
        else:
            loss.backward()
        optimizer.step()

    def timed(collect: bool) -> float:
        start = time.perf_counter()
        step(collect)
        sync()
        return time.perf_counter() - start

    timed(False), timed(True)
    plain, collected = [], []
    for _ in range(repeats):
        plain.append(timed(False))
        collected.append(timed(True))
    peaks = {}
    for collect in (False, True):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _reset_peak_rss()
        timed(collect)
        if device == "cuda":
            peaks[collect] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peaks[collect] = _peak_rss_mb() - base
    median = statistics.median(collected)
    return {
        "plain_s": statistics.median(plain),
        "median_s": median,
        "ratio": median / statistics.median(plain),
        "extra_mb": peaks[True] - peaks[False],
    }


def main():
    """Run every case and budget in its own process and print Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-classes", type=int, default=512)
    parser.add_argument("--batch-i2", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--budgets", default=",".join(BUDGETS))
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "BUDGET", "BATCH"))
    args = parser.parse_args()
    if args.worker:
        case, budget, batch = args.worker
        print(json.dumps(run_worker(case, budget, int(batch), args.device, args.repeats)))
        return

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"device {args.device}, repeats {args.repeats}"
    )
    for case in args.cases.split(","):
        batch = args.batch_classes if case == "classes1000" else args.batch_i2
        print(f"\n## {case}, batch {batch}\n")
        print(
            "| max_memory | plain step (ms) | collected step (ms) | ratio to plain "
            "| peak above plain (MB) |"
        )
        print("|---|---:|---:|---:|---:|")
        for budget in args.budgets.split(","):
            cmd = [sys.executable, __file__, "--worker", case, budget, str(batch)]
            cmd += ["--device", args.device, "--repeats", str(args.repeats)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=WORKER_ENV)
            if done.returncode != 0:
                reason = done.stderr.strip().splitlines()[-1] if done.stderr else "failed"
                print(f"| {budget} | failed: {reason[:80]} | | | |", flush=True)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"| {budget} | {1e3 * r['plain_s']:.0f} | {1e3 * r['median_s']:.0f} "
                f"| {r['ratio']:.2f} | {r['extra_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
