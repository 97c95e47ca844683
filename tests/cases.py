"""Tiny float64 models, likelihoods and inputs shared by the tests (docs/math.md §9)."""

from __future__ import annotations

import torch
from torch import nn

SIGMA = 0.7  # Gaussian noise level used in the tests (not the default, to test it)


class ViewCNN(nn.Module):
    """A custom forward with a view between layers (no Flatten module)."""

    def __init__(self, out: int):
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Linear(2 * 3 * 3, out)

    def forward(self, x):
        h = self.act(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


class SqueezedRegression(nn.Module):
    """One output per input, squeezed to ``[N]`` before the loss."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 1))

    def forward(self, x):
        return self.body(x).squeeze(1)


def make_model(name: str, out: int) -> nn.Module:
    """A tiny float64 network by name."""
    torch.manual_seed(0)
    builders = {
        "tanh_mlp": lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out)),
        "sigmoid_mlp": lambda: nn.Sequential(
            nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 3), nn.ELU(), nn.Linear(3, out)
        ),
        "deep_tanh_mlp": lambda: nn.Sequential(
            nn.Linear(3, 4),
            nn.Tanh(),
            nn.Linear(4, 4),
            nn.Tanh(),
            nn.Dropout(0.2),
            nn.Linear(4, 3),
            nn.Tanh(),
            nn.Linear(3, out),
        ).eval(),
        "relu_mlp": lambda: nn.Sequential(
            nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.LeakyReLU(0.1), nn.Linear(4, out)
        ),
        "cnn": lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3),
            nn.Tanh(),
            nn.MaxPool2d(2, stride=1),
            nn.Flatten(),
            nn.Linear(8, out),
        ),
        "batchnorm_eval": lambda: nn.Sequential(
            nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sigmoid(), nn.Linear(4, out)
        ).eval(),
        "conv1d_selu_avgpool": lambda: nn.Sequential(
            nn.Conv1d(2, 2, 3, padding=1),
            nn.SELU(),
            nn.AvgPool1d(2),
            nn.Dropout(0.3),
            nn.AdaptiveAvgPool1d(1),
            nn.Identity(),
            nn.Flatten(),
            nn.Linear(2, out),
        ).eval(),
        "convtranspose_elu": lambda: nn.Sequential(
            nn.ConvTranspose2d(1, 1, 2),
            nn.ELU(),
            nn.ZeroPad2d(1),
            nn.Conv2d(1, 1, 2, stride=2),
            nn.LogSigmoid(),
            nn.Flatten(),
            nn.Linear(4, out),
        ),
        "conv3d": lambda: nn.Sequential(
            nn.Conv3d(1, 2, 2),
            nn.Sigmoid(),
            nn.MaxPool3d(2, stride=1),
            nn.Flatten(),
            nn.Linear(2, out),
        ),
        "view_cnn": lambda: ViewCNN(out),
        "squeezed_regression": SqueezedRegression,
        "sequence_linear": lambda: nn.Sequential(
            nn.Linear(3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(4, out)
        ),
    }
    model = builders[name]().double()
    if name == "batchnorm_eval":  # running statistics away from their defaults
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def make_input(name: str, n: int = 5) -> torch.Tensor:
    """Inputs matching ``make_model(name)``."""
    generator = torch.Generator().manual_seed(1)
    shape = {
        "cnn": (n, 1, 5, 5),
        "view_cnn": (n, 1, 5, 5),
        "conv1d_selu_avgpool": (n, 2, 4),
        "convtranspose_elu": (n, 1, 2, 2),
        "conv3d": (n, 1, 3, 3, 3),
        "sequence_linear": (n, 2, 3),
    }.get(name, (n, 3))
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def make_loss(likelihood: str, reduction: str = "mean"):
    """Loss module, number of outputs and sigma for a likelihood name."""
    if likelihood == "categorical":
        return nn.CrossEntropyLoss(reduction=reduction), 3, None
    if likelihood == "bernoulli":
        return nn.BCEWithLogitsLoss(reduction=reduction), 3, None
    return nn.MSELoss(reduction=reduction), 2, SIGMA


def make_target(loss_fn, output: torch.Tensor) -> torch.Tensor:
    """Some training labels (fimhooks must not use them)."""
    generator = torch.Generator().manual_seed(2)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return torch.randint(0, output.shape[1], (output.shape[0],), generator=generator)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return torch.randint(0, 2, output.shape, generator=generator).double()
    return torch.randn(output.shape, generator=generator, dtype=output.dtype)


MODELS = [
    "tanh_mlp",
    "sigmoid_mlp",
    "deep_tanh_mlp",
    "relu_mlp",
    "cnn",
    "batchnorm_eval",
    "conv1d_selu_avgpool",
    "convtranspose_elu",
    "conv3d",
    "view_cnn",
    "sequence_linear",
]
LIKELIHOODS = ["categorical", "bernoulli", "gaussian"]
