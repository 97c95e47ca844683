"""Cost of summing a collected step over processes, against the step's gradient all-reduce.

A script, not a test. Two gloo processes on CPU train the benchmark MLP (784-512-512-10,
ReLU, float32) under ``DistributedDataParallel`` with a ``FisherMonitor`` (all estimators)
on every step; each holds half of the batch. Reported, as medians over the timed steps:

    gradient all-reduce   one all_reduce of all gradients, flat (what DDP's buckets send)
    fimhooks sync         the monitor's per-step sync: packing, the collective, unpacking
    floats sent           numbers each rank puts on the wire, for each of them

Both are timed after a barrier, so that neither waits for the other rank, at the same point
of each step (where the monitor syncs, after the backward pass), taking turns to go first. Also reported:
the median step (zero_grad, forward, backward, SGD step) of the model without DDP (each
rank alone), and under DDP without the monitor, with it and ``sync=False``, and synced.

    python benchmarks/bench_sync.py                 # batch 128 in all, 2 processes
    python benchmarks/bench_sync.py --batch 256 --estimators I1,exact
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import fimhooks


def mlp() -> nn.Module:
    """The benchmark MLP of ``bench_overhead.py``: 784-512-512-10, ReLU."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def timed_steps(model, optimizer, x, y, monitor, steps: int, after=None) -> list:
    """Median-ready times of ``steps`` DDP steps (each after a barrier); ``after()`` follows."""
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        with monitor if monitor is not None else contextlib.nullcontext():
            loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        if after is not None:
            after()
    return times


def timed(function, times: list):
    """``function`` timed after a barrier, so that no rank waits for another's work."""

    def call(*args, **kwargs):
        dist.barrier()
        start = time.perf_counter()
        result = function(*args, **kwargs)
        times.append(time.perf_counter() - start)
        return result

    return call


def worker(rank: int, world_size: int, init_file: str, args, queue) -> None:
    """One rank: step times, then the sync and a gradient all-reduce interleaved."""
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    per_rank = args.batch // world_size
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(per_rank, 784, generator=generator)
    y = torch.randint(0, 10, (per_rank,), generator=generator)
    estimators = tuple(args.estimators.split(","))
    rows = {}
    for name, sync in (
        ("without DDP", None),
        ("no monitor", None),
        ("sync=False", False),
        ("synced", True),
    ):
        model = mlp() if name == "without DDP" else DistributedDataParallel(mlp())
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        monitor = None
        if sync is not None:
            monitor = fimhooks.FisherMonitor(model, "categorical", estimators=estimators, sync=sync)
        timed_steps(model, optimizer, x, y, monitor, args.warmup)
        rows[name] = statistics.median(timed_steps(model, optimizer, x, y, monitor, args.steps))
        if monitor is not None:
            monitor.remove()

    model = DistributedDataParallel(mlp())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    monitor = fimhooks.FisherMonitor(model, "categorical", estimators=estimators)
    sync_times, grad_times = [], []
    reducer = monitor._reducer
    reduce, sync = reducer.reduce, timed(reducer.reduce, sync_times)
    gradients = torch.cat([p.detach().flatten() for p in model.parameters()])
    all_reduce = timed(dist.all_reduce, grad_times)

    def both(step, failed=False):
        """At the same point of the step, in turns first: the sync and a gradient all-reduce.

        The gradients are written into the all-reduced buffer first, as the backward pass
        writes DDP's buckets: the collective then reads freshly written memory, as the sync.
        """
        torch.cat([p.grad.flatten() for p in model.parameters()], out=gradients)
        if len(sync_times) % 2:
            return sync(step, failed), all_reduce(gradients)
        return all_reduce(gradients), sync(step, failed)

    reducer.reduce = lambda step, failed=False: [r for r in both(step, failed) if r][0]
    timed_steps(model, optimizer, x, y, monitor, args.warmup + args.steps)
    reducer.reduce = reduce
    if rank == 0:
        queue.put(
            {
                "parameters (gradient floats)": gradients.numel(),
                "sync floats per rank": reducer.layout.size,
                "sync collective": "all_to_all (gather)" if reducer.layout.gather else "all_reduce",
                "floats sent, gradients": round(
                    2 * (args.processes - 1) / args.processes * gradients.numel()
                ),
                "floats sent, sync": round(reducer.layout.traffic()),
                "gradient all-reduce ms": 1e3 * statistics.median(grad_times[args.warmup :]),
                "fimhooks sync ms": 1e3 * statistics.median(sync_times[args.warmup :]),
                **{f"step {k} ms": 1e3 * v for k, v in rows.items()},
            }
        )
    dist.destroy_process_group()


def main() -> None:
    """Spawn the ranks and print rank 0's medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="inputs per step, all ranks")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--estimators", default="I1,I2,exact")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as directory:
        init_file = os.path.join(directory, "init")
        processes = [
            context.Process(target=worker, args=(r, args.processes, init_file, args, queue))
            for r in range(args.processes)
        ]
        for p in processes:
            p.start()
        result = queue.get(timeout=1800)
        for p in processes:
            p.join()
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {args.processes} gloo processes x {args.threads} thread(s), "
        f"batch {args.batch}, estimators {args.estimators}"
    )
    for key, value in result.items():
        print(f"{key:28s} {value:.3f}" if isinstance(value, float) else f"{key:28s} {value}")
    print(
        f"{'sync / gradient all-reduce':28s} "
        f"{result['fimhooks sync ms'] / result['gradient all-reduce ms']:.2f}"
    )


if __name__ == "__main__":
    main()
