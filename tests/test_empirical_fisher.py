"""The empirical Fisher (docs/math.md §7b) against ``torch.func`` gradients at the data's labels."""

import graphs
import pytest
import torch
from cases import make_input, make_loss, make_model, make_target
from reference import empirical_fisher_reference
from test_any_graph import CASES, targets
from test_reference import assert_close
from torch import nn

import fimhooks


def collect(model, loss_fn, x, y, sigma, **options):
    monitor = fimhooks.FisherMonitor(model, loss_fn, sigma=sigma, **options)
    model.zero_grad()
    with monitor:
        loss_fn(model(x), y).backward()
    monitor.remove()
    return monitor.estimates()


def expected(per_input: dict):
    """Mean and empirical variance (sample variance / N) of per-input summands."""
    n = len(next(iter(per_input.values())))
    return {k: v.mean(0) for k, v in per_input.items()}, {
        k: v.var(0) / n for k, v in per_input.items()
    }


@pytest.mark.parametrize("estimators", [("EF",), ("I1", "EF"), ("I1", "I2", "exact", "EF")])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
@pytest.mark.parametrize("model_name", ["sigmoid_mlp", "cnn"])
def test_empirical_fisher_matches_squared_gradients(model_name, likelihood, reduction, estimators):
    loss_fn, out, sigma = make_loss(likelihood, reduction)
    model, x = make_model(model_name, out), make_input(model_name)
    y = make_target(loss_fn, model(x))
    plain = {n: g for n, g in zip(*_gradients(model, loss_fn, x, y))}
    est = collect(model, loss_fn, x, y, sigma, estimators=estimators)
    for name, p in model.named_parameters():  # p.grad is the user's, untouched
        torch.testing.assert_close(p.grad, plain[name], rtol=1e-12, atol=0)
    mean, variance = expected(empirical_fisher_reference(model, loss_fn, x, y, sigma or 1.0))
    assert_close(est.fisher("EF"), mean, "EF")
    assert_close(est.empirical_variance("EF"), variance, "empirical variance of EF")
    if "exact" in estimators:
        bias = est.empirical_fisher_bias()
        reference = {k: mean[k] - est.fisher("exact")[k] for k in mean}
        assert_close(bias, reference, "bias", floor={k: v.abs().max() for k, v in mean.items()})
        assert all((v == 0).all() for v in est.variance("EF").values())  # no label noise


def _gradients(model, loss_fn, x, y):
    model.zero_grad()
    loss_fn(model(x), y).backward()
    return zip(*[(n, p.grad.clone()) for n, p in model.named_parameters()])


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_general_path_equals_the_chain_path(likelihood):
    loss_fn, out, sigma = make_loss(likelihood)
    model, x = make_model("cnn", out), make_input("cnn")
    y = make_target(loss_fn, model(x))
    chained = collect(model, loss_fn, x, y, sigma, estimators=("I1", "exact", "EF"), seed=1)
    general = collect(
        model, loss_fn, x, y, sigma, estimators=("I1", "exact", "EF"), seed=1, backend="general"
    )
    for estimator in ["EF", "I1", "exact"]:
        assert_close(general.fisher(estimator), chained.fisher(estimator), estimator)
        variance = general.empirical_variance(estimator)
        assert_close(variance, chained.empirical_variance(estimator), estimator)


def test_sequence_outputs_with_a_mask():
    """Per-token labels: each observed position is an observation (docs/math.md §7c)."""
    model, x = graphs.make("tiny_lm", 5), graphs.inputs("tiny_lm")
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    monitor = fimhooks.FisherMonitor(model, "categorical", estimators=("I1", "exact", "EF"))
    h = model(x)
    y = targets(h, "categorical")
    with monitor(mask=mask):
        CASES[4][2](h, y).backward()
    est = monitor.estimates()
    mean, variance = expected(empirical_fisher_reference(model, "categorical", x, y, mask=mask))
    assert_close(est.fisher("EF"), mean, "EF")
    assert_close(est.empirical_variance("EF"), variance, "empirical variance of EF")


def test_summary_log_and_report_show_the_bias():
    from fimhooks.show.jsonlog import log_record
    from fimhooks.show.report import layer_table

    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    y = make_target(loss_fn, model(x))
    est = collect(model, loss_fn, x, y, None, estimators=("I1", "exact", "EF"))
    record = log_record(est, 1, 1, 0.0, 0.05)
    bias = est.empirical_fisher_bias()
    for layer, stats in record["layers"].items():
        names = [n for n in bias if n.startswith(layer + ".")]
        diff = torch.cat([bias[n].flatten() for n in names])
        exact = torch.cat([est.fisher("exact")[n].flatten() for n in names])
        assert stats["EF"]["bias"] == pytest.approx((diff.norm() / exact.norm()).item())
        assert stats["EF"]["label_share"] == 0 and stats["recommended"] != "EF"
    assert "bias EF" in est.summary() and "bias EF" in layer_table(record)[0]


def test_errors():
    model = make_model("tanh_mlp", 2)
    with pytest.raises(ValueError, match="nn.MSELoss module"):
        fimhooks.FisherMonitor(model, "gaussian", estimators=("EF",))
    with pytest.raises(ValueError, match="nn.MSELoss module"):
        fimhooks.FisherMonitor(model, nn.MSELoss(reduction="none"), estimators=("EF",))
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    model, x = make_model("tanh_mlp", 3), make_input("tanh_mlp")
    y = torch.tensor([0, 1, -100, 2, 1])
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=("EF",))
    with pytest.raises(RuntimeError, match="monitor\\(mask=...\\)"):
        with monitor:
            loss_fn(model(x), y).backward()
    monitor.remove()
    smoothed = nn.CrossEntropyLoss(label_smoothing=0.3)
    confident = make_model("tanh_mlp", 3)
    with torch.no_grad():
        confident[2].bias.copy_(torch.tensor([40.0, 0.0, 0.0]))  # p ≈ e_0: many negatives
    certain = fimhooks.FisherMonitor(confident, loss_fn, estimators=("EF",))
    h = confident(x)
    h.register_hook(lambda grad: seen.append(grad))
    seen = []
    with certain:  # in float32, p_0 rounds to 1: the gradient is 0 at the label
        loss_fn(h.float(), torch.zeros(5, dtype=torch.long)).backward()
    certain.remove()
    # the last call is the user's backward (a tensor hook also sees the monitor's own)
    assert (seen[-1][:, 0] == 0).all() and (seen[-1][:, 1:] > 0).all()
    assert all(v.abs().max() < 1e-6 for v in certain.estimates().fisher("EF").values())
    monitor = fimhooks.FisherMonitor(confident, smoothed, estimators=("EF",))
    with pytest.raises(RuntimeError, match="Label smoothing"):
        with monitor:
            smoothed(confident(x), torch.zeros(5, dtype=torch.long)).backward()
    monitor.remove()
    with pytest.raises(ValueError, match="'EF' was not collected"):
        collect(model, loss_fn, x, y.clamp_min(0), None).empirical_fisher_bias()
    est = collect(model, loss_fn, x, y.clamp_min(0), None, estimators=("exact", "EF"), bounds=True)
    with pytest.raises(ValueError, match="'EF' has no bounds"):
        est.bounds("EF")


def test_tensorboard_scalars_include_bias_and_tightness():
    import io

    from test_watching import FakeWriter

    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=("I1", "exact", "EF"), bounds=True)
    writer = FakeWriter()
    log = monitor.log_to(io.StringIO(), writer)
    output = model(x)
    with monitor:
        loss_fn(output, make_target(loss_fn, output)).backward()
    log.close()
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"fimhooks/0/EF/bias", "fimhooks/0/I1/bound_tightness"} <= tags


def test_bernoulli_label_where_the_probability_rounds_to_it():
    """In float32 ``sigmoid(20)`` is 1: the loss's gradient is 0 there, and so is EF."""
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(10.0)
        model.bias.zero_()
    x = torch.ones(3, 2)
    loss_fn = nn.BCEWithLogitsLoss()
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=("EF",))
    with monitor:
        loss_fn(model(x), torch.ones(3, 1)).backward()
    monitor.remove()
    assert all(v.abs().max() < 1e-6 for v in monitor.estimates().fisher("EF").values())
