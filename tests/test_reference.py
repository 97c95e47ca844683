"""Monitor against the torch.func brute force of docs/math.md §9 (float64, 1e-8 relative)."""

import pytest
import torch
from cases import LIKELIHOODS, MODELS, make_input, make_loss, make_model, make_target
from reference import estimator_reference

import fimhooks
from fimhooks.engine import chain, jacobians

RTOL = 1e-8


def assert_close(actual: dict, expected: dict, what: str, floor: dict = None):
    """Relative agreement to ``RTOL``; ``floor`` gives a parameter's smallest scale."""
    assert actual.keys() == expected.keys(), what
    for name in expected:
        a, e = actual[name], expected[name]
        scale = e.abs().max().clamp_min(1e-12 if floor is None else floor[name])
        err = (a - e).abs().max() / scale
        assert err < RTOL, f"{what}[{name}] differs by {err:.2e} (relative):\n{a}\n{e}"


def assert_label_variances(estimates, ref: dict):
    """Î₁'s label noise at the monitor's granularity and, from its cross terms, at each."""
    by_granularity = ref["v1_by_granularity"]
    assert_close(estimates.variance("I1"), by_granularity[estimates.granularity], "v1")
    for granularity, expected in by_granularity.items():
        actual = estimates.variance("I1", granularity=granularity)
        assert_close(actual, expected, f"v1 at {granularity}")


def assert_same_estimates(actual, expected):
    """Two routes to the same estimates agree on every reported number (same seed)."""
    for estimator in ["I1", "I2", "exact"]:
        assert_close(actual.fisher(estimator), expected.fisher(estimator), estimator)
        empirical = actual.empirical_variance(estimator)
        assert_close(empirical, expected.empirical_variance(estimator), estimator)
    for estimator in ["I1", "I2"]:
        assert_close(actual.variance(estimator), expected.variance(estimator), estimator)


def collect(model, loss_fn, x, sigma, mc_samples, **options):
    monitor = fimhooks.FisherMonitor(model, loss_fn, sigma=sigma, mc_samples=mc_samples, **options)
    output = model(x)
    loss = loss_fn(output, make_target(loss_fn, output))
    with monitor:
        loss.backward()
    monitor.remove()
    return monitor.estimates()


@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("model_name", MODELS)
def test_closed_forms_match_brute_force(model_name, likelihood, mc_samples):
    loss_fn, out, sigma = make_loss(likelihood)
    model, x = make_model(model_name, out), make_input(model_name)
    est = collect(model, loss_fn, x, sigma, mc_samples)
    ref = estimator_reference(model, loss_fn, x, mc_samples, sigma or 1.0)
    assert_close(est.fisher("exact"), ref["exact"], "exact")
    assert_label_variances(est, ref)
    assert_close(est.variance("I2"), ref["v2"], "v2")
    assert_close(est.data_variance(), ref["data"], "data variance")


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_outputs_squeezed_before_the_loss(likelihood):
    loss_fn, _, sigma = make_loss(likelihood)
    model, x = make_model("squeezed_regression", 1), make_input("squeezed_regression")
    est = collect(model, loss_fn, x, sigma, 2)
    ref = estimator_reference(model, loss_fn, x, 2, sigma or 1.0)
    assert_close(est.fisher("exact"), ref["exact"], "exact")
    assert_label_variances(est, ref)
    assert_close(est.variance("I2"), ref["v2"], "v2")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_numbers_do_not_depend_on_reduction_or_batch_size(reduction):
    loss_fn, out, _ = make_loss("categorical", reduction)
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp", n=6)
    ref = estimator_reference(model, loss_fn, x, 1)
    est = collect(model, loss_fn, x, None, 1)
    assert_close(est.fisher("exact"), ref["exact"], "exact")
    assert_close(est.variance("I2"), ref["v2"], "v2")


def test_zero_variance_facts():
    """v₂ = 0 on the last layer, and everywhere in a piecewise-linear network (docs/math.md §3)."""
    loss_fn, out, _ = make_loss("categorical")
    for model_name in ["tanh_mlp", "relu_mlp"]:
        model, x = make_model(model_name, out), make_input(model_name)
        est = collect(model, loss_fn, x, None, 1)
        v2, last = est.variance("I2"), str(len(model) - 1)
        assert all((v == 0).all() for n, v in v2.items() if n.startswith(last))
        if model_name == "relu_mlp":
            assert all((v == 0).all() for v in v2.values())
            for name, value in est.fisher("I2").items():
                torch.testing.assert_close(value, est.fisher("exact")[name], rtol=1e-12, atol=0)
        else:
            assert (v2["0.weight"] > 0).any()


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("model_name", ["tanh_mlp", "sigmoid_mlp", "deep_tanh_mlp"])
def test_rank_one_linear_path_equals_generic_path(model_name, likelihood, monkeypatch):
    loss_fn, out, sigma = make_loss(likelihood)
    model, x = make_model(model_name, out), make_input(model_name)
    fast = collect(model, loss_fn, x, sigma, 2, seed=3)
    monkeypatch.setattr(chain, "is_rank_one", lambda module: False)
    generic = collect(model, loss_fn, x, sigma, 2, seed=3)
    assert_same_estimates(fast, generic)


@pytest.mark.parametrize("model_name", ["cnn", "convtranspose_elu", "conv3d", "sequence_linear"])
@pytest.mark.parametrize("change", ["one input at a time", "BackPACK's conv products"])
def test_generic_path_variants_agree(model_name, change, monkeypatch):
    loss_fn, out, sigma = make_loss("categorical")
    model, x = make_model(model_name, out), make_input(model_name)
    whole = collect(model, loss_fn, x, sigma, 2, seed=4)
    options = {}
    if change == "one input at a time":
        options["max_memory"] = 1
    else:
        monkeypatch.setattr(jacobians, "unfold_unsupported", lambda module: "BackPACK's")
    chunked = collect(model, loss_fn, x, sigma, 2, seed=4, **options)
    assert_same_estimates(chunked, whole)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("model_name", MODELS)
def test_smallest_memory_budget_matches_brute_force(model_name, likelihood):
    """One input, one curvature entry, one parameter entry at a time: the same numbers."""
    loss_fn, out, sigma = make_loss(likelihood)
    model, x = make_model(model_name, out), make_input(model_name)
    est = collect(model, loss_fn, x, sigma, 2, max_memory=1)
    ref = estimator_reference(model, loss_fn, x, 2, sigma or 1.0)
    assert_close(est.fisher("exact"), ref["exact"], "exact")
    assert_label_variances(est, ref)
    assert_close(est.variance("I2"), ref["v2"], "v2")
    assert_close(est.data_variance(), ref["data"], "data variance")


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("model_name", MODELS)
def test_general_path_matches_brute_force_on_chains(model_name, likelihood):
    """The general path (autograd, per-layer rules) on the models the chain path serves."""
    loss_fn, out, sigma = make_loss(likelihood)
    model, x = make_model(model_name, out), make_input(model_name)
    chained = collect(model, loss_fn, x, sigma, 2, seed=5, estimators=("I1", "exact"))
    general = collect(
        model, loss_fn, x, sigma, 2, seed=5, estimators=("I1", "exact"), backend="general"
    )
    ref = estimator_reference(model, loss_fn, x, 2, sigma or 1.0)
    assert_close(general.fisher("exact"), ref["exact"], "exact")
    assert_label_variances(general, ref)
    assert_close(general.data_variance(), ref["data"], "data variance")
    for estimator in ["I1", "exact"]:  # same labels: the same sampled estimates
        assert_close(general.fisher(estimator), chained.fisher(estimator), estimator)
        empirical = general.empirical_variance(estimator)
        assert_close(empirical, chained.empirical_variance(estimator), estimator)


@pytest.mark.parametrize("model_name", ["deep_tanh_mlp", "cnn"])
def test_bounds_ef_and_block_errors_do_not_depend_on_the_memory_budget(model_name):
    """Chunks of inputs, directions and curvature entries: the same optional quantities."""
    loss_fn, out, sigma = make_loss("categorical")
    model, x = make_model(model_name, out), make_input(model_name)
    options = {"estimators": ("I1", "I2", "exact", "EF"), "bounds": True, "block_errors": True}
    whole = collect(model, loss_fn, x, sigma, 2, seed=6, **options)
    chunked = collect(model, loss_fn, x, sigma, 2, seed=6, max_memory=1, **options)
    assert_close(chunked.fisher("EF"), whole.fisher("EF"), "EF")
    assert_close(chunked.empirical_variance("EF"), whole.empirical_variance("EF"), "EF")
    for quantity in ["exact", "I1", "I2"]:
        for side, a, e in zip(["lower", "upper"], chunked.bounds(quantity), whole.bounds(quantity)):
            assert_close(a, e, f"{side} bound of {quantity}")
    for structure in ["block", "diag"]:
        a = chunked.frobenius_error("I1", structure)
        e = whole.frobenius_error("I1", structure)
        assert a.keys() == e.keys()
        for layer in e:
            assert abs(a[layer] - e[layer]) <= RTOL * abs(e[layer]), (structure, layer)
