"""BatchNorm in training mode with ``batchnorm="frozen-batch-stats"`` against the brute force.

The semantics: exactly eval mode with the running statistics set to the batch's mean and
biased variance (the docs/math.md §9 brute force on such a copy), while training is unchanged.
"""

import copy

import pytest
import torch
from cases import LIKELIHOODS, make_loss, make_target
from reference import estimator_reference
from test_reference import assert_close, assert_label_variances
from torch import nn

import fimhooks

FROZEN = "frozen-batch-stats"


def make(name: str, out: int) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp_sigmoid":
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sigmoid(), nn.Linear(4, out))
    elif name == "cnn_relu":
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, out)
        )
    else:
        model = Residual(out)
    model = model.double().train()
    for module in model.modules():  # scale and shift away from their defaults
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model


class Residual(nn.Module):
    """``x + BN(conv(x))``, ReLU, then a Linear head: BatchNorm inside a branching graph."""

    def __init__(self, out):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.head = nn.Linear(18, out)

    def forward(self, x):  # noqa: D102
        return self.head(torch.relu(x + self.norm(self.conv(x))).flatten(1))


def inputs(name: str) -> torch.Tensor:
    shape = {"mlp_sigmoid": (6, 3), "cnn_relu": (6, 1, 4, 4), "residual": (6, 2, 3, 3)}[name]
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.double)


def frozen_copy(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Eval-mode copy whose running statistics are the batch's (mean, biased variance)."""
    reference = copy.deepcopy(model)
    seen = {}
    handles = [
        m.register_forward_pre_hook(lambda m, args: seen.setdefault(m, args[0].detach()))
        for m in reference.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    with torch.no_grad():
        reference(x)
    for handle in handles:
        handle.remove()
    for module, value in seen.items():
        values = value.transpose(0, 1).flatten(1)
        module.running_mean.copy_(values.mean(1))
        module.running_var.copy_(values.var(1, unbiased=False))
    return reference.eval()


def collect(model, loss_fn, x, sigma, estimators):
    monitor = fimhooks.FisherMonitor(
        model, loss_fn, sigma=sigma, mc_samples=2, batchnorm=FROZEN, estimators=estimators
    )
    output = model(x)
    with monitor:
        loss_fn(output, make_target(loss_fn, output)).backward()
    monitor.remove()
    return monitor.estimates()


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("name", ["mlp_sigmoid", "cnn_relu", "residual"])
def test_frozen_batch_statistics_match_brute_force(name, likelihood):
    loss_fn, out, sigma = make_loss(likelihood)
    model, x = make(name, out), inputs(name)
    reference = frozen_copy(model, x)
    curved = name == "mlp_sigmoid"  # Î₂ needs the curvature above the BatchNorm layer
    estimators = ("I1", "exact") if curved else ("I1", "I2", "exact")
    est = collect(model, loss_fn, x, sigma, estimators)
    ref = estimator_reference(reference, loss_fn, x, 2, sigma or 1.0)
    assert_close(est.fisher("exact"), ref["exact"], "exact")
    assert_label_variances(est, ref)
    assert_close(est.data_variance(), ref["data"], "data variance")
    if not curved:
        assert_close(est.variance("I2"), ref["v2"], "v2")  # zero: piecewise linear


def test_training_is_unchanged():
    """``p.grad`` and the running statistics are those of a step without the monitor."""
    loss_fn, out, _ = make_loss("categorical")
    model, x = make("residual", out), inputs("residual")
    plain = copy.deepcopy(model)
    for net, monitored in ((plain, False), (model, True)):
        monitor = (
            fimhooks.FisherMonitor(net, "categorical", batchnorm=FROZEN) if monitored else None
        )
        output = net(x)
        loss = loss_fn(output, make_target(loss_fn, output))
        if monitor:
            with monitor:
                loss.backward()
            monitor.remove()
        else:
            loss.backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(model.norm.running_mean, plain.norm.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(model.norm.running_var, plain.norm.running_var, rtol=0, atol=0)


def test_curvature_above_the_layer_is_refused_for_i2():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make("mlp_sigmoid", out), inputs("mlp_sigmoid")
    with pytest.raises(RuntimeError, match="'I2' needs the network's curvature"):
        collect(model, loss_fn, x, None, ("I1", "I2", "exact"))


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_eval_mode_batchnorm_in_a_branching_graph_keeps_i2(likelihood):
    """In eval mode BatchNorm is affine: Î₂ of a residual ReLU network equals exact."""
    loss_fn, out, sigma = make_loss(likelihood)
    model, x = make("residual", out).eval(), inputs("residual")
    with torch.no_grad():
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    monitor = fimhooks.FisherMonitor(model, loss_fn, sigma=sigma, mc_samples=2)
    output = model(x)
    with monitor:
        loss_fn(output, make_target(loss_fn, output)).backward()
    monitor.remove()
    est, ref = monitor.estimates(), estimator_reference(model, loss_fn, x, 2, sigma or 1.0)
    assert_close(est.fisher("exact"), ref["exact"], "exact")
    assert_close(est.variance("I2"), ref["v2"], "v2")
    assert all((v == 0).all() for v in est.variance("I2").values())


def test_an_in_place_activation_after_frozen_statistics():
    """``nn.ReLU(inplace=True)`` after BatchNorm in training mode (timm's ResNets)."""
    loss_fn, out, sigma = make_loss("categorical")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(8, out),
    ).double()
    x = inputs("cnn_relu")
    reference = frozen_copy(model, x)
    plain = copy.deepcopy(model)
    loss_fn(plain(x), make_target(loss_fn, plain(x))).backward()
    est = collect(model, loss_fn, x, sigma, ("I1", "I2", "exact"))
    ref = estimator_reference(reference, loss_fn, x, 2)
    assert_close(est.fisher("exact"), ref["exact"], "exact")
    assert_label_variances(est, ref)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_frozen_statistics_refuse_a_subclass_that_changes_the_forward_pass():
    class BatchNormAct(nn.BatchNorm1d):  # as timm's BatchNormAct2d
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.Linear(3, 4), BatchNormAct(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="'1' \\(BatchNormAct\\) overrides the forward pass"):
        fimhooks.FisherMonitor(model, "categorical", batchnorm=FROZEN)
    with pytest.raises(ValueError, match="'1' is in training mode"):
        fimhooks.FisherMonitor(model, "categorical")
