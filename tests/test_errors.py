"""Bad input gets a clear error at construction, naming what is wrong and what works."""

import pytest
import torch
from reference import estimator_reference
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


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _x():
    return torch.randn(5, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_a_mask_given_to_a_block_never_entered_does_not_apply_later():
    model, x = _mlp(), _x()
    plain = fimhooks.FisherMonitor(model, "categorical", estimators=("exact",))
    with plain:
        model(x).sum().backward()
    plain.remove()
    monitor = fimhooks.FisherMonitor(model, "categorical", estimators=("exact",))
    monitor(mask=torch.tensor([True, False, False, False, False]))  # never entered
    with monitor:
        model(x).sum().backward()
    assert monitor.estimates().num_inputs == 5
    for name, value in plain.estimates().fisher("exact").items():
        torch.testing.assert_close(monitor.estimates().fisher("exact")[name], value)


def test_an_all_masked_block_adds_nothing_to_an_ema():
    model, x = _mlp(), _x()
    monitor = fimhooks.FisherMonitor(model, "categorical", ema_decay=0.9)
    with monitor:
        model(x).sum().backward()
    before = monitor.estimates()
    with monitor(mask=torch.zeros(5, dtype=torch.bool)):
        model(x).sum().backward()
    after = monitor.estimates()
    assert after.skipped == 0 and after.num_inputs == before.num_inputs
    for e in ("I1", "exact"):
        for name, value in before.fisher(e).items():
            assert torch.isfinite(after.fisher(e)[name]).all()
            torch.testing.assert_close(after.fisher(e)[name], value)


def test_outputs_the_likelihoods_cannot_read_are_refused():
    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, x):
            return self.net(x) * (1 + 1j)

    complex_model, x = Complex(), _x()
    monitor = fimhooks.FisherMonitor(complex_model, "categorical")
    with pytest.raises(TypeError, match="complex128"):
        with monitor:
            complex_model(x).abs().sum().backward()
    model = _mlp()
    monitor = fimhooks.FisherMonitor(model, "categorical")
    out = model(x)
    out.div_(2)
    with pytest.raises(RuntimeError, match="changed in place"):
        with monitor:
            out.sum().backward()


def test_a_module_inside_or_around_a_watched_one_is_refused():
    model = _mlp()
    monitor = fimhooks.FisherMonitor(model[0], "categorical")
    with pytest.raises(ValueError, match="already watched"):
        fimhooks.FisherMonitor(model, "categorical")
    monitor.remove()
    monitor = fimhooks.FisherMonitor(model, "categorical")
    with pytest.raises(ValueError, match="already watched"):
        fimhooks.FisherMonitor(model[2], "categorical")


def test_torch_func_transforms_of_a_started_model_are_left_alone():
    model, x = _mlp(), _x()
    monitor = fimhooks.FisherMonitor(model, "categorical").start()
    jacobian = torch.func.jacrev(lambda x: model(x))(x[:2])
    grads = torch.func.vmap(torch.func.grad(lambda x: model(x[None]).sum()))(x)
    assert jacobian.shape == (2, 3, 2, 3) and grads.shape == x.shape
    model(x).sum().backward()  # an ordinary step is still collected
    monitor.stop()
    assert monitor.estimates().num_inputs == 5


def test_a_model_without_trainable_parameters_warns_instead_of_failing():
    model, x = _mlp(), _x().requires_grad_()  # saliency: gradients at the input only
    for p in model.parameters():
        p.requires_grad_(False)
    model = nn.Sequential(model, nn.Identity())  # not a chain of trainable layers
    monitor = fimhooks.FisherMonitor(model, "categorical")
    with pytest.warns(RuntimeWarning, match="nothing to estimate"):
        with monitor:
            model(x).sum().backward()
    assert x.grad is not None and monitor.collected_steps == 0


@pytest.mark.parametrize("cut", ["detach", "no_grad"])
def test_layers_below_a_detach_or_no_grad_get_no_estimate(cut):
    """The chain stops where the gradient stops; the layers above are exact."""

    class Cut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)

        def forward(self, x):
            if cut == "no_grad":
                with torch.no_grad():
                    hidden = self.act(self.a(x))
            else:
                hidden = self.act(self.a(x)).detach()
            return self.b(hidden)

    torch.manual_seed(0)
    model, x = Cut().double(), _x()
    est = fimhooks.estimate(model, "categorical", x, estimators=("I1", "exact"), progress=False)
    ref = estimator_reference(
        model.b, "categorical", model.act(model.a(x)).detach(), 1, 1.0, second_order=False
    )
    for name in ("weight", "bias"):
        torch.testing.assert_close(est.fisher("exact")["b." + name], ref["exact"][name])
    assert all(v.abs().max() == 0 for k, v in est.fisher("exact").items() if k.startswith("a."))
