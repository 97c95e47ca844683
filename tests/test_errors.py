"""Bad input gets a clear error at construction, naming what is wrong and what works."""

import pytest
import torch
from torch import nn

import fimhooks


def mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


@pytest.mark.parametrize(
    "likelihood, match",
    [
        (nn.L1Loss(), "Unsupported likelihood: loss L1Loss.*nn.CrossEntropyLoss"),
        ("poisson", "Unsupported likelihood: 'poisson'.*'categorical'"),
    ],
)
def test_unsupported_likelihoods(likelihood, match):
    with pytest.raises(ValueError, match=match):
        fimhooks.FisherMonitor(mlp(), likelihood)


def test_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="BatchNorm layer '1' is in training mode.*frozen-batch"):
        fimhooks.FisherMonitor(model, nn.CrossEntropyLoss())
    model.eval()
    monitor = fimhooks.FisherMonitor(model, nn.CrossEntropyLoss())
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        with monitor:
            pass
    model.eval()
    with pytest.warns(RuntimeWarning, match="nothing was collected"):
        with monitor:  # the failed entry left no state behind
            pass


def test_a_forward_pass_with_batchnorm_in_training_mode_is_refused():
    """Switching to eval mode after the forward pass does not make its numbers per-input."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    monitor = fimhooks.FisherMonitor(model, "categorical")
    model.train()
    output = model(torch.randn(5, 3))
    model.eval()
    with pytest.raises(ValueError, match="'1' normalised with the batch's statistics .*frozen"):
        with monitor:
            output.sum().backward()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"sigma": 0.5}, "sigma is a parameter of the Gaussian"),
        ({"mc_samples": 0}, "mc_samples"),
        ({"every": 0}, "every"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"estimators": ("I3",)}, "estimators"),
        ({"estimators": ()}, "estimators"),
    ],
)
def test_invalid_options(options, match):
    with pytest.raises(ValueError, match=match):
        fimhooks.FisherMonitor(mlp(), nn.CrossEntropyLoss(), **options)


def test_gaussian_sigma_must_be_positive():
    with pytest.raises(ValueError, match="sigma must be positive"):
        fimhooks.FisherMonitor(mlp(), nn.MSELoss(), sigma=0.0)


def test_i2_through_a_functional_activation_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model, loss_fn = Net(), nn.CrossEntropyLoss()
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=("I1", "I2", "exact"))
    loss = loss_fn(model(torch.randn(5, 3)), torch.zeros(5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="layer 'a'"):
        with monitor:
            loss.backward()


def test_i2_through_a_layer_called_twice_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(3, 4), nn.Linear(4, 2), nn.Tanh()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    model, loss_fn = Net(), nn.CrossEntropyLoss()
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=("I1", "I2", "exact"))
    loss = loss_fn(model(torch.randn(5, 3)), torch.zeros(5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="'I2' needs the network's curvature above layer"):
        with monitor:
            loss.backward()


def test_removed_monitor_and_estimates_before_collection():
    monitor = fimhooks.FisherMonitor(mlp(), nn.CrossEntropyLoss())
    with pytest.raises(RuntimeError, match="no batch"):
        monitor.estimates().fisher("I1")
    monitor.remove()
    with pytest.raises(RuntimeError, match="removed"):
        with monitor:
            pass


def test_a_scalar_model_output_is_refused_naming_the_fix():
    """A module whose forward returns its loss (Lightning's under DDP runs training_step)."""

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(3, 2)

        def forward(self, x):
            return self.net(x).pow(2).mean()

    model = WithLoss()
    monitor = fimhooks.FisherMonitor(model, "categorical")
    with pytest.raises(ValueError, match="output is a scalar.*model='net'"):
        with monitor:
            model(torch.randn(4, 3)).backward()
