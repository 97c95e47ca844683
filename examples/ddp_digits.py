"""Train on the bundled digits with DistributedDataParallel, a FisherMonitor and its preconditioner.

Run: torchrun --nproc-per-node 2 examples/ddp_digits.py --out ddp-digits   (CPU, gloo; about
ten seconds)

Rank 0 writes the log and the monitor's state into the folder ``--out`` (default
``ddp-digits``; the environment variable ``FIMHOOKS_OUT``, where set, is the default instead).

Each rank trains on its own half of every batch. The monitor sums each collected step over
the ranks, so every rank holds the estimates of one process on the whole batch, and the
preconditioned gradients are identical on every rank. Rank 0 alone logs and prints.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fimhooks
from fimhooks.optim import FisherPreconditioner
from fimhooks.show.demo import load


def main(out: str = "ddp-digits", epochs: int = 3, batch_size: int = 64, seed: int = 0):
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)  # the same initial model and batch order on every rank
    x, y = load("digits")
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    )
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    monitor = fimhooks.FisherMonitor(model, loss_fn, ema_decay=0.9, seed=seed)
    precondition = FisherPreconditioner(monitor, damping=0.1, estimator="exact")
    if monitor.is_main_process:
        os.makedirs(out, exist_ok=True)
    log = monitor.log_to(os.path.join(out, "log.jsonl"))  # rank 0 writes

    for epoch in range(epochs):
        order, total, seen = torch.randperm(len(x)), 0.0, 0
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size].tensor_split(world_size)[rank]
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            with monitor:
                loss.backward()  # DDP all-reduces the gradients; the monitor its sums
            precondition.step()
            optimizer.step()
            total, seen = total + loss.item() * len(batch), seen + len(batch)
        if monitor.is_main_process:
            print(f"epoch {epoch + 1}: training loss on rank 0's inputs {total / seen:.3f}")

    log.close()
    if monitor.is_main_process:
        print(monitor.estimates().summary())
        torch.save(monitor.state_dict(), os.path.join(out, "monitor.pt"))  # restores every rank
    monitor.remove()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        default=os.environ.get("FIMHOOKS_OUT", "ddp-digits"),
        help="folder for rank 0's log.jsonl and monitor.pt (default: %(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=3, help="default: %(default)s")
    args = parser.parse_args()
    main(args.out, args.epochs)
