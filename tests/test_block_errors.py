"""Full-block Frobenius errors (docs/math.md §6) against a label enumeration (docs/math.md §9)."""

import pytest
import torch
from cases import make_input, make_loss, make_model, make_target
from reference import block_error_reference, estimator_reference
from test_reference import collect as reference_collect
from torch.func import functional_call, hessian

import fimhooks

RTOL = 1e-8


def collect(model, loss_fn, x, sigma, batches=1, **options):
    monitor = fimhooks.FisherMonitor(
        model, loss_fn, sigma=sigma, mc_samples=2, block_errors=True, **options
    )
    for chunk in x.chunk(batches):
        output = model(chunk)
        with monitor:
            loss_fn(output, make_target(loss_fn, output)).backward()
    monitor.remove()
    return monitor.estimates()


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
@pytest.mark.parametrize("model_name", ["tanh_mlp", "sigmoid_mlp", "cnn", "relu_mlp"])
def test_block_error_matches_label_enumeration(model_name, likelihood):
    loss_fn, out, sigma = make_loss(likelihood)
    model, x = make_model(model_name, out), make_input(model_name)
    est = collect(model, loss_fn, x, sigma)
    expected = block_error_reference(model, loss_fn, x, 2, sigma or 1.0)
    got = est.frobenius_error("I1", "block")
    assert got.keys() == expected.keys()
    for layer, value in expected.items():
        assert got[layer] == pytest.approx(value, rel=RTOL), layer
    diag = estimator_reference(model, loss_fn, x, 2, sigma or 1.0)["v1"]
    for layer, value in est.frobenius_error("I1", "diag").items():
        members = [v for n, v in diag.items() if n.rpartition(".")[0] == layer]
        assert value == pytest.approx(sum(v.sum().item() for v in members), rel=RTOL)
        assert value <= got[layer] * (1 + RTOL)  # the diagonal is part of the block


@pytest.mark.parametrize("ema_decay", [None, 0.6])
def test_block_error_over_steps_weighs_like_the_variances(ema_decay):
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp", n=7)
    est = collect(model, loss_fn, x, None, batches=3, ema_decay=ema_decay)
    chunks = x.chunk(3)
    if ema_decay is None:
        expected = block_error_reference(model, loss_fn, x, 2)
    else:  # Σ_t w_t² err_t, w_t = (1−β)β^(T−t) / (1−β^T)
        beta, steps = ema_decay, len(chunks)
        weights = [(1 - beta) * beta ** (steps - 1 - t) / (1 - beta**steps) for t in range(steps)]
        per_step = [block_error_reference(model, loss_fn, c, 2) for c in chunks]
        expected = {k: sum(w * w * e[k] for w, e in zip(weights, per_step)) for k in per_step[0]}
    for layer, value in est.frobenius_error("I1", "block").items():
        assert value == pytest.approx(expected[layer], rel=RTOL), layer


def test_i2_block_error_is_zero_where_the_block_hessian_vanishes():
    """Only where nothing above a layer is curved; elsewhere a clear error."""
    loss_fn, out, _ = make_loss("categorical")
    for model_name, zero_layers in [("relu_mlp", ["0", "2", "4"]), ("tanh_mlp", ["2"])]:
        model, x = make_model(model_name, out), make_input(model_name)
        for layer in zero_layers:  # brute force: h has no second derivative in the block
            assert _block_hessian(model, layer, x[0]).abs().max() < 1e-12
        est = collect(model, loss_fn, x, None)
        if model_name == "relu_mlp":
            assert est.frobenius_error("I2", "block") == dict.fromkeys(zero_layers, 0.0)
        else:
            assert _block_hessian(model, "0", x[0]).abs().max() > 1e-3
            with pytest.raises(ValueError, match="'I2' for layer '0'.*Hessian"):
                est.frobenius_error("I2", "block")


def _block_hessian(model, layer, xn):
    params = {n: p.detach() for n, p in model.named_parameters()}
    block = {n: p for n, p in params.items() if n.rpartition(".")[0] == layer}

    def h(theta):
        return functional_call(model, {**params, **theta}, (xn.unsqueeze(0),))[0]

    second = hessian(h)(block)  # {a: {b: [C, *a, *b]}}
    return torch.cat([t.flatten() for row in second.values() for t in row.values()])


def test_errors():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    with pytest.raises(ValueError, match="block_errors=True needs the exact pass"):
        fimhooks.FisherMonitor(model, loss_fn, estimators=("I1",), block_errors=True)
    est = reference_collect(model, loss_fn, x, None, 1)
    with pytest.raises(ValueError, match="block_errors=True"):
        est.frobenius_error("I1")
    with pytest.raises(ValueError, match="structure must be"):
        est.frobenius_error("I1", "full")
    with pytest.raises(ValueError, match="label noise of 'I1' or 'I2'"):
        est.frobenius_error("exact", "diag")
    general = collect(model, loss_fn, x, None, estimators=("I1", "exact"), backend="general")
    with pytest.raises(ValueError, match="chain path only"):
        general.frobenius_error("I1")
    assert general.frobenius_error("I1", "diag").keys() == {"0", "2"}


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_options_together_give_the_numbers_of_each_alone(likelihood):
    """Bounds, the empirical Fisher and block errors share one pass without interfering."""
    loss_fn, out, sigma = make_loss(likelihood)
    model, x = make_model("cnn", out), make_input("cnn")
    everything = collect(
        model, loss_fn, x, sigma, seed=3, bounds=True, estimators=("I1", "I2", "exact", "EF")
    )
    blocks = collect(model, loss_fn, x, sigma, seed=3)
    bounds = fimhooks.FisherMonitor(model, loss_fn, sigma=sigma, mc_samples=2, bounds=True)
    output = model(x)
    with bounds:
        loss_fn(output, make_target(loss_fn, output)).backward()
    for layer, value in blocks.frobenius_error("I1").items():
        assert everything.frobenius_error("I1")[layer] == pytest.approx(value, rel=RTOL)
    for q in ["exact", "I1", "I2"]:
        for a, b in zip(everything.bounds(q), bounds.estimates().bounds(q)):
            for name in a:
                torch.testing.assert_close(a[name], b[name], rtol=RTOL, atol=0)
    for name, value in blocks.fisher("I1").items():  # same labels drawn
        torch.testing.assert_close(everything.fisher("I1")[name], value, rtol=RTOL, atol=0)
