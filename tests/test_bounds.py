"""Bounds of docs/math.md §7 (Soen & Sun 2024, Thm 4.1) against the torch.func brute force."""

import itertools

import graphs
import pytest
import torch
from cases import make_input, make_loss, make_model, make_target
from reference import per_input_reference
from test_any_graph import CASES, targets
from test_reference import assert_close
from test_reference import collect as reference_collect

import fimhooks
from fimhooks.fisher import bounds as bounds_module
from fimhooks.fisher.bounds import bound_factors
from fimhooks.fisher.likelihoods import Bernoulli, Categorical

#: What ``est.bounds(q)`` bounds: the reference's term and its power of ``1/N``.
BOUNDED = {"exact": ("exact", 1), "I1": ("v1", 2), "I2": ("v2", 2)}


def reference_bounds(model, likelihood, x, mc_samples, sigma, **options):
    """``{q: (lower, upper, actual)}`` of one batch from the per-input brute force."""
    per_input = per_input_reference(model, likelihood, x, sigma, **options)
    n = len(next(iter(per_input["exact"].values())))
    out = {}
    for q, (term, power) in BOUNDED.items():
        scale = n if power == 1 else n**2 * mc_samples
        out[q] = tuple(
            {k: v.sum(0) / scale for k, v in per_input[key].items()}
            for key in (f"{term}_lower", f"{term}_upper", term)
        )
    return out


def collect(model, loss_fn, x, sigma, mc_samples=2, steps=1, **options):
    monitor = fimhooks.FisherMonitor(
        model, loss_fn, sigma=sigma, mc_samples=mc_samples, bounds=True, **options
    )
    for _ in range(steps):
        output = model(x)
        with monitor:
            loss_fn(output, make_target(loss_fn, output)).backward()
    monitor.remove()
    return monitor.estimates()


def assert_sandwich(lower: dict, actual: dict, upper: dict, what: str, equal: bool = False):
    """``lower ≤ actual ≤ upper`` entrywise (to rounding), equalities if ``equal``."""
    for name, value in actual.items():
        slack = 1e-9 * value.abs().max().clamp_min(1e-12)
        assert (lower[name] <= value + slack).all(), f"{what}[{name}] below its lower bound"
        assert (value <= upper[name] + slack).all(), f"{what}[{name}] above its upper bound"
        if equal:
            torch.testing.assert_close(lower[name], value, rtol=1e-9, atol=0)
            torch.testing.assert_close(upper[name], value, rtol=1e-9, atol=0)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
@pytest.mark.parametrize("model_name", ["tanh_mlp", "sigmoid_mlp", "cnn", "deep_tanh_mlp"])
def test_bounds_match_brute_force_and_sandwich(model_name, likelihood):
    loss_fn, out, sigma = make_loss(likelihood)
    model, x = make_model(model_name, out), make_input(model_name)
    est = collect(model, loss_fn, x, sigma)
    ref = reference_bounds(model, loss_fn, x, 2, sigma or 1.0)
    actual = {"exact": est.fisher("exact"), "I1": est.variance("I1"), "I2": est.variance("I2")}
    for q, (ref_lower, ref_upper, ref_actual) in ref.items():
        lower, upper = est.bounds(q)
        assert_close(lower, ref_lower, f"lower bound of {q}", floor=_floor(ref_actual))
        assert_close(upper, ref_upper, f"upper bound of {q}", floor=_floor(ref_actual))
        assert_sandwich(lower, actual[q], upper, q, equal=likelihood == "gaussian")
        assert_sandwich(ref_lower, ref_actual, ref_upper, f"brute force {q}")


def _floor(actual: dict) -> dict:
    """A parameter's scale: that of the quantity bounded (its bounds may be all zero)."""
    return {k: v.abs().max().clamp_min(1e-12) for k, v in actual.items()}


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_running_bounds_sandwich_ema_and_cumulative_over_steps(likelihood):
    """Several steps (parameters moving), EMA weights: bounds aggregate like their quantity."""
    loss_fn, out, sigma = make_loss(likelihood)
    for ema_decay in [None, 0.7]:
        model, x = make_model("sigmoid_mlp", out), make_input("sigmoid_mlp", n=4)
        monitor = fimhooks.FisherMonitor(
            model, loss_fn, sigma=sigma, bounds=True, ema_decay=ema_decay
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(3):
            optimizer.zero_grad()
            output = model(x[: 2 + step])
            with monitor:
                loss_fn(output, make_target(loss_fn, output)).backward()
            optimizer.step()
        est = monitor.estimates()
        actual = {"exact": est.fisher("exact"), "I1": est.variance("I1"), "I2": est.variance("I2")}
        for q in BOUNDED:
            lower, upper = est.bounds(q)
            assert_sandwich(lower, actual[q], upper, q, equal=likelihood == "gaussian")


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_general_path_bounds_equal_the_chain_path(likelihood):
    loss_fn, out, sigma = make_loss(likelihood)
    model, x = make_model("cnn", out), make_input("cnn")
    chained = collect(model, loss_fn, x, sigma, estimators=("I1", "exact"))
    general = collect(model, loss_fn, x, sigma, estimators=("I1", "exact"), backend="general")
    for q in ["exact", "I1"]:
        for side, a, b in zip(("lower", "upper"), general.bounds(q), chained.bounds(q)):
            assert_close(a, b, f"{side} bound of {q}", floor=_floor(chained.fisher("exact")))


def test_sequence_outputs_with_a_mask():
    """Positions enter the bounds like the quantities: 1/T and 1/T² (docs/math.md §7c)."""
    model, x = graphs.make("tiny_lm", 5), graphs.inputs("tiny_lm")
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    monitor = fimhooks.FisherMonitor(
        model, "categorical", mc_samples=2, estimators=("I1", "exact"), bounds=True
    )
    h = model(x)
    with monitor(mask=mask):
        CASES[4][2](h, targets(h, "categorical")).backward()
    est = monitor.estimates()
    keep = mask.any(1)
    ref = reference_bounds(
        model, "categorical", x[keep], 2, 1.0, mask=mask[keep], second_order=False
    )
    for q in ["exact", "I1"]:
        ref_lower, ref_upper, ref_actual = ref[q]
        lower, upper = est.bounds(q)
        assert_close(lower, ref_lower, f"lower bound of {q}", floor=_floor(ref_actual))
        assert_close(upper, ref_upper, f"upper bound of {q}", floor=_floor(ref_actual))


@pytest.mark.parametrize("classes", [2, 3, 7, bounds_module.EXACT_CLASSES + 6])
@pytest.mark.parametrize("likelihood", [Categorical(), Bernoulli()])
def test_factors_bound_every_direction(likelihood, classes):
    """The eigenvalue factors bound g, v₁ (v₂ as g) for random and axis-aligned u."""
    if isinstance(likelihood, Bernoulli) and classes > 8:
        classes = 8  # 2^C label patterns are enumerated
    generator = torch.Generator().manual_seed(classes)
    for scale in [0.5, 3.0]:
        h = scale * torch.randn(4, classes, generator=generator, dtype=torch.float64)
        factors = bound_factors(likelihood, h)
        u = torch.randn(200, classes, generator=generator, dtype=torch.float64)
        u[:classes] = torch.eye(classes, dtype=torch.float64)
        for row, f in zip(h, factors):
            probs, residuals = _enumerated(likelihood, row)
            s = residuals @ u.T
            g = probs @ s**2
            v1 = probs @ s**4 - g**2
            norm = (u * u).sum(1) - f[0] * u.sum(1) ** 2
            for value, low, high in [
                (g, f[1] * norm, f[2] * norm),
                (v1, f[3] * norm**2, f[4] * norm**2),
            ]:
                assert (low <= value * (1 + 1e-9) + 1e-15).all()
                assert (value <= high * (1 + 1e-9) + 1e-15).all()


def _enumerated(likelihood, h):
    if isinstance(likelihood, Categorical):
        p = torch.softmax(h, 0)
        return p, torch.eye(len(h), dtype=h.dtype) - p
    p = torch.sigmoid(h)
    patterns = torch.tensor(list(itertools.product([0.0, 1.0], repeat=len(h))), dtype=h.dtype)
    return torch.prod(torch.where(patterns == 1, p, 1 - p), dim=1), patterns - p


def test_errors():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    with pytest.raises(ValueError, match="bounds=True needs the exact pass"):
        fimhooks.FisherMonitor(model, loss_fn, estimators=("I1",), bounds=True)
    est = reference_collect(model, loss_fn, x, None, 1)
    with pytest.raises(ValueError, match="bounds=True"):
        est.bounds("I1")
    assert "tight" not in est.summary()


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_tightness_in_summary_log_and_report(likelihood):
    from fimhooks.show.jsonlog import log_record
    from fimhooks.show.report import layer_table

    loss_fn, out, sigma = make_loss(likelihood)
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    est = collect(model, loss_fn, x, sigma)
    record = log_record(est, 1, 1, 0.0, 0.05)
    for layer, stats in record["layers"].items():
        for q in BOUNDED:
            tight, lower = stats[q]["bound_tightness"], stats[q]["bound_lower"]
            if tight is None:  # v2 of the last layer: nothing to bound
                assert (q, layer) == ("I2", "2")
            elif likelihood == "gaussian":
                assert tight == pytest.approx(1, rel=1e-9) and lower == pytest.approx(1, rel=1e-9)
            else:
                assert tight >= 1 >= lower
    assert "tight I1" in est.summary()
    assert "bound tightness I1" in layer_table(record)[0]
