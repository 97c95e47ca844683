"""Self-verification: a rule that does not apply is caught against autograd (docs/math.md §9)."""

import pytest
import torch
from reference import estimator_reference
from test_reference import assert_close, assert_label_variances
from torch import nn

import fimhooks
from fimhooks.engine import collect as collect_module
from fimhooks.engine import layers


def circular_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 4),
    ).double()


def collect(model, x, **options):
    est = fimhooks.estimate(
        model, "categorical", x, estimators=("I1", "exact"), progress=False, **options
    )
    return est


def reference(model, x):
    return estimator_reference(model, "categorical", x, 1, 1.0, second_order=False)


@pytest.fixture
def x():
    return torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def wrong_chain_rule(monkeypatch):
    """BackPACK's convolution serves a circular padding mode, which it does not implement."""
    options = dict(layers.LAYERS[nn.Conv2d].__dict__, chain_unsupported=None)
    monkeypatch.setitem(layers.LAYERS, nn.Conv2d, layers.LayerSpec(**options))


def wrong_general_rule(monkeypatch):
    """The unfolded products serve a circular padding mode, which they do not implement."""
    options = dict(layers.LAYERS[nn.Conv2d].__dict__, chain=None, grads_unsupported=None)
    monkeypatch.setitem(layers.LAYERS, nn.Conv2d, layers.LayerSpec(**options))


@pytest.mark.parametrize("wrong", [wrong_chain_rule, wrong_general_rule], ids=["chain", "general"])
def test_a_rule_that_does_not_apply_is_caught_and_replaced(wrong, x, monkeypatch):
    model = circular_cnn()
    ref = reference(model, x)
    wrong(monkeypatch)
    unverified = collect(model, x, verify="off")
    error = (unverified.fisher("exact")["0.weight"] - ref["exact"]["0.weight"]).norm()
    assert error > 1e-3 * ref["exact"]["0.weight"].norm()  # the rule is wrong here
    with pytest.warns(RuntimeWarning, match="disagree with autograd"):
        est = collect(model, x)
    assert_close(est.fisher("exact"), ref["exact"], "exact")
    assert_label_variances(est, ref)


def test_verification_names_what_it_cannot_mend(x, monkeypatch):
    """Where the generic rule disagrees too, the step is refused, naming the parameter."""
    model = circular_cnn()
    wrong_general_rule(monkeypatch)
    monkeypatch.setattr(layers, "generic_grads", layers.LAYERS[nn.Conv2d].grads)
    with pytest.raises(RuntimeError, match=r"'0\.weight' \(layer '0'\)"):
        with pytest.warns(RuntimeWarning, match="disagree with autograd"):
            collect(model, x)


def test_verification_runs_once_per_structure(x, monkeypatch):
    model = circular_cnn()
    calls = []
    original = collect_module.autograd_squares
    monkeypatch.setattr(
        collect_module, "autograd_squares", lambda *a: calls.append(1) or original(*a)
    )
    collect(model, [x, 2 * x, x + 1])  # the same structure
    assert len(calls) == 1
    collect(model, [x, x], verify="always")
    assert len(calls) == 3
    collect(model, [x], verify="off")
    assert len(calls) == 3


def test_verify_option_is_checked():
    with pytest.raises(ValueError, match="verify must be one of"):
        fimhooks.FisherMonitor(circular_cnn(), "categorical", verify="sometimes")


class SequenceFirst(nn.Module):
    """``[T, N, E]`` inputs and a parameter of the model's own (a class token)."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.cat([self.cls.expand(1, x.shape[1], 8), x])
        return self.head(self.encoder(x)[0])


@pytest.mark.parametrize("length", [4, 3], ids=["T 4", "T equals N"])
def test_sequence_first_inputs_with_the_models_own_parameters(length):
    torch.manual_seed(0)
    model = SequenceFirst().double().eval()
    x = torch.randn(length, 3, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"'cls' \(layer '<model>'\).*batch_axis=1"):
        collect(model, x)
    est = collect(model, x, batch_axis=1)
    ref = estimator_reference(model, "categorical", x, 1, 1.0, second_order=False, batch_axis=1)
    assert_close(est.fisher("exact"), ref["exact"], "exact")
    assert_label_variances(est, ref)
    with pytest.raises(ValueError, match="batch_axis must be a non-negative integer"):
        fimhooks.FisherMonitor(model, "categorical", batch_axis=-1)


def test_backend_option_chooses_the_backend(x):
    """Both backends give the brute force; the chain backend refuses a pass it cannot take."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(50, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    ref = reference(model, x)
    for backend in ("auto", "chain", "general"):
        est = collect(model, x, backend=backend)
        assert_close(est.fisher("exact"), ref["exact"], f"exact, backend={backend}")
    with pytest.raises(ValueError, match="backend must be one of"):
        fimhooks.FisherMonitor(model, "categorical", backend="fast")
    mask = torch.tensor([True, False, True, True])  # a mask: not the chain backend's
    monitor = fimhooks.FisherMonitor(model, "categorical", backend="chain", verify="off")
    with pytest.raises(ValueError, match="backend='chain' does not apply"):
        with monitor(mask=mask):
            model(x).logsumexp(-1).sum().backward()
    monitor.remove()
    monitor = fimhooks.FisherMonitor(circular_cnn(), "categorical", backend="chain")
    with pytest.raises(ValueError, match="backend='chain' does not apply"):  # circular padding
        with monitor:
            monitor.model(x).logsumexp(-1).sum().backward()
