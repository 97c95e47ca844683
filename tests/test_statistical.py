"""Sampled estimators against closed forms, with z-bounds from the closed-form variance.

The inputs are fixed, so the only randomness is the label draw (docs/math.md §3). Entries with
zero closed-form variance must match exactly. Z_BOUND = 5 keeps the chance of a false
failure below ~1e-4 over the few hundred entries tested (Bonferroni, normal tails).
"""

import pytest
import torch
from cases import LIKELIHOODS, make_input, make_loss, make_model, make_target
from reference import estimator_reference

import fimhooks

Z_BOUND = 5.0
pytestmark = pytest.mark.statistical


def max_abs(t):
    return t.abs().max().item() if t.numel() else 0.0


def step(monitor, model, loss_fn, x):
    output = model(x)
    loss = loss_fn(output, make_target(loss_fn, output))
    with monitor:
        loss.backward()
    model.zero_grad()


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_sampled_means_within_z_bound_of_exact(likelihood):
    loss_fn, out, sigma = make_loss(likelihood)
    model, x = make_model("sigmoid_mlp", out), make_input("sigmoid_mlp")
    steps, mc_samples = 300, 2
    monitor = fimhooks.FisherMonitor(model, loss_fn, sigma=sigma, mc_samples=mc_samples, seed=0)
    for _ in range(steps):
        step(monitor, model, loss_fn, x)
    monitor.remove()
    est = monitor.estimates()
    ref = estimator_reference(model, loss_fn, x, mc_samples, sigma or 1.0)
    for estimator, term in [("I1", "v1"), ("I2", "v2")]:
        for name, exact in ref["exact"].items():
            variance = ref[term][name] / steps
            error = est.fisher(estimator)[name] - exact
            zero = variance == 0
            assert max_abs(error[zero]) <= 1e-10 * exact.abs().max()
            z = error[~zero] / variance[~zero].sqrt()
            assert max_abs(z) < Z_BOUND, f"{estimator} {name}: z={z}"


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_empirical_variance_matches_label_plus_data_noise(likelihood):
    """E[empirical variance] = label-noise + data-noise variance (docs/math.md §4)."""
    loss_fn, out, sigma = make_loss(likelihood)
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp", n=6)
    monitor = fimhooks.FisherMonitor(model, loss_fn, sigma=sigma, seed=1)
    steps = 300
    samples = {"I1": [], "I2": []}
    for _ in range(steps):
        monitor.reset()
        step(monitor, model, loss_fn, x)
        est = monitor.estimates()
        for estimator in samples:
            samples[estimator].append(est.empirical_variance(estimator))
    for estimator, values in samples.items():
        expected = {n: est.variance(estimator)[n] + est.data_variance()[n] for n in values[0]}
        for name in expected:
            stacked = torch.stack([v[name] for v in values])
            spread = stacked.std(0) / steps**0.5
            error = stacked.mean(0) - expected[name]
            zero = spread == 0
            assert max_abs(error[zero]) <= 1e-10 * expected[name].abs().max()
            z = error[~zero] / spread[~zero]
            assert max_abs(z) < Z_BOUND, f"{estimator} {name}: z={z}"


@pytest.mark.parametrize("draws", [1, 3])
def test_categorical_labels_follow_their_probabilities(draws):
    from fimhooks.fisher.likelihoods import categorical_labels

    p = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float32)
    rows = 20000
    generator = torch.Generator().manual_seed(11)
    labels = categorical_labels(p.repeat(rows, 1), draws, generator).reshape(rows, 2, draws)
    for i, q in enumerate(p.double()):
        counts = torch.bincount(labels[:, i].flatten(), minlength=4).double()
        n = rows * draws
        expected = n * q
        assert counts[q == 0].sum() == 0  # a class of probability 0 is never drawn
        z = (counts - expected) / (n * q * (1 - q)).sqrt().clamp_min(1e-12)
        assert z[q > 0].abs().max() < Z_BOUND


def test_masked_positions_with_non_finite_outputs_draw_nothing():
    # without the exact pass labels are drawn at every position, masked ones zeroed
    from fimhooks.engine.observations import draw_labels
    from fimhooks.fisher.likelihoods import Categorical

    positions = torch.randn(2, 3, 4)
    positions[1, 2] = float("nan")
    observed = torch.tensor([[True, True, True], [True, True, False]])
    generator = torch.Generator().manual_seed(0)
    for scaled in (False, True):
        draw = draw_labels(Categorical(), positions, observed, 2, generator, False, scaled=scaled)
        held = draw.directions[:]
        assert torch.isfinite(held).all() and (held[:, 1, 2] == 0).all()
        assert torch.allclose(held[:, 0].sum(-1), torch.zeros(2, 3), atol=1e-6)  # e_y − p
