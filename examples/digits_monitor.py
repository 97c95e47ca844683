"""Train a small MLP on scikit-learn's bundled digits with a FisherMonitor attached.

Run: python examples/digits_monitor.py   (about ten seconds on a laptop CPU)
"""

import torch
from torch import nn

import fimhooks
from fimhooks.show.demo import load


def main(epochs: int = 5, batch_size: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    x, y = load("digits")  # standardized features of scikit-learn's bundled digits
    model = nn.Sequential(
        nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    monitor = fimhooks.FisherMonitor(model, loss_fn, ema_decay=0.9, every=2)

    for epoch in range(epochs):
        order = torch.randperm(len(x))
        total = 0.0
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            with monitor:
                loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        print(f"epoch {epoch + 1}: training loss {total / len(x):.3f}")

    print()
    print(monitor.estimates().summary())
    monitor.remove()


if __name__ == "__main__":
    main()
