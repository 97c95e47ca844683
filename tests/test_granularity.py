"""Granularities of the score's square (docs/math.md §7d) against the joint label distribution.

The score tables come from ``torch.func`` Jacobians on tiny float64 models; the joint
distribution of all observations' labels is enumerated, so each granularity's mean and
variance are exact and the closed forms must match them. Sampled draws are checked with
z-scores whose scale comes from the same enumeration.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import fimhooks
from fimhooks.fisher.granularity import (
    GRANULARITIES,
    draw_variance,
    label_variance,
    summands,
)
from tests.reference import _label_distribution

Z = 4.5  # z-score bound per entry: a two-sided normal tail of 7e-6


class TinyLM(nn.Module):
    """Embedding, a causal mix of the previous position, logits tied to the embedding."""

    def __init__(self, vocab=3, width=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        e = self.embed(tokens)
        previous = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
        return self.head(torch.tanh(self.mix(e + 0.5 * previous)))


def score_table(model, x, likelihood, output=lambda out: out):
    """``(scores [N, T, Y, P], probs [N, T, Y])``: every observation's score per label value."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def logits(q):
        return output(functional_call(model, q, (x,)))

    h = logits(params)
    h = h.reshape(h.shape[0], -1, h.shape[-1])  # [N, T, C]
    jac = jacrev(logits)(params)
    J = torch.cat([j.reshape(*h.shape, -1) for j in jac.values()], dim=-1)  # [N, T, C, P]
    probs, scores = [], []
    for n, t in itertools.product(range(h.shape[0]), range(h.shape[1])):
        p, residuals = _label_distribution(likelihood, h[n, t])
        probs.append(p)
        scores.append(residuals @ J[n, t])
    N, T = h.shape[:2]
    return torch.stack(scores).unflatten(0, (N, T)), torch.stack(probs).unflatten(0, (N, T))


def moments(scores, probs):
    """Per observation ``g = E a²`` and ``v = Var a²``, ``[N, T, P]``."""
    p = probs.unsqueeze(-1)
    g = (p * scores**2).sum(2)
    return g, (p * scores**4).sum(2) - g * g


def joint(scores, probs):
    """All joint labels: scores ``[J, N, T, P]`` (J as the draws' axis) and probabilities ``[J]``."""
    N, T, Y = probs.shape
    labels = torch.tensor(list(itertools.product(range(Y), repeat=N * T))).reshape(-1, N, T)
    n, t = torch.meshgrid(torch.arange(N), torch.arange(T), indexing="ij")
    return scores[n, t, labels], probs[n, t, labels].flatten(1).prod(1)


def weights_of(mask):
    """``1/T_n`` at observed positions, 0 where masked."""
    mask = mask.double()
    return mask / mask.sum(1, keepdim=True)


def lm_case():
    torch.manual_seed(0)
    model = TinyLM().double()
    x = torch.tensor([[0, 2, 1], [1, 1, 0]])
    scores, probs = score_table(model, x, "categorical")
    mask = torch.tensor([[True, True, True], [True, True, False]])  # a padded position
    return scores, probs, weights_of(mask)


def bernoulli_case():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    scores, probs = score_table(model, x, "bernoulli")  # one observation per input, 4 patterns
    return scores, probs, torch.ones(3, 1, dtype=torch.float64)


CASES = {"language model, masked": lm_case, "bernoulli MLP": bernoulli_case}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_closed_forms_are_the_joint_distributions_mean_and_variance(case, granularity):
    scores, probs, weights = CASES[case]()
    values, chance = joint(scores, probs)
    assert torch.isclose(chance.sum(), torch.tensor(1.0, dtype=chance.dtype))
    x = summands(values, weights, granularity)  # [J, N, P] or [J, P]
    c = chance.reshape(-1, *[1] * (x.dim() - 1))
    mean = (c * x).sum(0)
    variance = (c * (x - mean) ** 2).sum(0)
    g, v = moments(scores, probs)
    expected = (weights.unsqueeze(-1) * g).sum(1)  # each input's Fisher, the same for all three
    if granularity == "batch":
        expected = expected.sum(0)
    torch.testing.assert_close(mean, expected)
    torch.testing.assert_close(variance, label_variance(g, v, weights, granularity))


def test_the_coarser_squares_carry_more_label_noise_here():
    scores, probs, weights = lm_case()
    g, v = moments(scores, probs)
    token, per_input = (label_variance(g, v, weights, k).sum(0) for k in ("token", "input"))
    assert (per_input >= token - 1e-12).all() and (per_input > token).any()


def test_per_input_outputs_make_token_and_input_the_same():
    scores, probs, weights = bernoulli_case()
    values, _ = joint(scores, probs)
    torch.testing.assert_close(
        summands(values, weights, "token"), summands(values, weights, "input")
    )
    g, v = moments(scores, probs)
    torch.testing.assert_close(
        label_variance(g, v, weights, "token"), label_variance(g, v, weights, "input")
    )


def test_gaussian_scores_give_twice_the_squared_mean():
    # a Gaussian observation's score is Gaussian: (Σ s a)² is σ²χ²₁ with σ² = Σ w g
    g = torch.tensor([[[0.3, 1.0], [2.0, 0.1]]], dtype=torch.float64)
    weights = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    variance = label_variance(g, 2 * g * g, weights, "input")
    torch.testing.assert_close(variance, 2 * (weights.unsqueeze(-1) * g).sum(1) ** 2)


def sample(scores, probs, draws, generator):
    """``draws`` independent label draws: scores ``[draws, N, T, P]``."""
    N, T, Y = probs.shape
    labels = torch.multinomial(probs.reshape(-1, Y), draws, True, generator=generator)
    labels = labels.T.reshape(draws, N, T)
    n, t = torch.meshgrid(torch.arange(N), torch.arange(T), indexing="ij")
    return scores[n, t, labels]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_sampled_summands_are_unbiased(granularity):
    scores, probs, weights = lm_case()
    g, v = moments(scores, probs)
    draws = 20_000
    x = summands(
        sample(scores, probs, draws, torch.Generator().manual_seed(5)), weights, granularity
    )
    expected = (weights.unsqueeze(-1) * g).sum(1)
    expected = expected.sum(0) if granularity == "batch" else expected
    standard_error = (label_variance(g, v, weights, granularity) / draws).sqrt()
    z = (x.mean(0) - expected) / standard_error.clamp_min(1e-300)
    assert z[standard_error > 0].abs().max() < Z


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("mc_samples", [2, 5])
def test_the_spread_among_draws_is_an_unbiased_estimate_of_the_closed_form(granularity, mc_samples):
    scores, probs, weights = lm_case()
    g, v = moments(scores, probs)
    closed = label_variance(g, v, weights, granularity)
    # the sample variance of M draws has variance (μ₄ − σ⁴ (M − 3)/(M − 1)) / M, with μ₄
    # the summand's central fourth moment, from the joint distribution
    values, chance = joint(scores, probs)
    x = summands(values, weights, granularity)
    c = chance.reshape(-1, *[1] * (x.dim() - 1))
    mu4 = (c * (x - (c * x).sum(0)) ** 4).sum(0)
    spread_var = (mu4 - closed**2 * (mc_samples - 3) / (mc_samples - 1)) / mc_samples
    repeats = 5_000
    generator = torch.Generator().manual_seed(7)
    drawn = sample(scores, probs, repeats * mc_samples, generator)
    drawn = summands(drawn, weights, granularity).unflatten(0, (mc_samples, repeats))
    estimates = draw_variance(drawn)  # [repeats, ...]
    standard_error = (spread_var / repeats).sqrt()
    z = (estimates.mean(0) - closed) / standard_error.clamp_min(1e-300)
    assert z[standard_error > 0].abs().max() < Z


def test_one_draw_has_no_spread():
    with pytest.raises(ValueError, match="mc_samples >= 2"):
        draw_variance(torch.ones(1, 3))


# --- the monitor at granularity "input" ----------------------------------------------------


def lm_batch():
    torch.manual_seed(0)
    model = TinyLM(vocab=4, width=3).double()
    x = torch.tensor([[0, 2, 1, 3], [1, 1, 0, 2], [3, 0, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    return model, x, mask


def collect(monitor, model, x, mask, steps):
    for _ in range(steps):
        with monitor(mask=mask):
            model(x).sum().backward()
    model.zero_grad()
    return monitor.estimates()


def flat(diagonal):
    return torch.cat([v.flatten() for v in diagonal.values()])


def lm_truth(model, x, mask, mc_samples=1):
    """Per-observation Fisher and the input granularity's variance, from enumeration."""
    scores, probs = score_table(model, x, "categorical")
    weights = weights_of(mask)
    g, v = moments(scores, probs)
    fisher = (weights.unsqueeze(-1) * g).sum(1).mean(0)
    variance = label_variance(g, v, weights, "input").sum(0) / (len(x) ** 2 * mc_samples)
    return fisher, variance


@pytest.mark.parametrize("mc_samples", [1, 3])
def test_input_granularity_variance_is_the_enumerated_closed_form(mc_samples):
    model, x, mask = lm_batch()
    monitor = fimhooks.FisherMonitor(
        model, "categorical", estimators=("I1", "exact"), granularity="input",
        mc_samples=mc_samples,
    )  # fmt: skip
    est = collect(monitor, model, x, mask, steps=1)
    fisher, variance = lm_truth(model, x, mask, mc_samples)
    torch.testing.assert_close(flat(est.fisher("exact")), fisher)
    torch.testing.assert_close(flat(est.variance("I1")), variance)
    monitor.remove()
    token = fimhooks.FisherMonitor(
        model, "categorical", estimators=("I1", "exact"), granularity="token",
        mc_samples=mc_samples,
    )  # fmt: skip
    token_variance = flat(collect(token, model, x, mask, steps=1).variance("I1"))
    assert (token_variance < variance).any()  # the cross terms are there


@pytest.mark.parametrize("estimators", [("I1",), ("I1", "exact")])
def test_input_granularity_is_unbiased(estimators):
    # ("I1",): one backward of each input's summed residuals; with "exact": per position
    model, x, mask = lm_batch()
    steps = 400
    monitor = fimhooks.FisherMonitor(
        model, "categorical", estimators=estimators, granularity="input", seed=11
    )
    est = collect(monitor, model, x, mask, steps)
    fisher, variance = lm_truth(model, x, mask)
    z = (flat(est.fisher("I1")) - fisher) / (variance / steps).sqrt().clamp_min(1e-300)
    assert z[variance > 0].abs().max() < Z


def test_input_granularity_is_token_where_each_input_is_one_observation():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    numbers = []
    for granularity in ("token", "input"):
        monitor = fimhooks.FisherMonitor(
            model, "categorical", estimators=("I1", "exact"), granularity=granularity, seed=4
        )
        est = collect(monitor, model, x, None, steps=2)
        numbers.append((flat(est.fisher("I1")), flat(est.variance("I1"))))
        monitor.remove()
    torch.testing.assert_close(numbers[0], numbers[1], rtol=0, atol=0)


def test_granularity_errors_are_clear():
    model, _, _ = lm_batch()
    with pytest.raises(ValueError, match="bounds hold for granularity 'token'"):
        fimhooks.FisherMonitor(model, "categorical", granularity="input", bounds=True)
    with pytest.raises(ValueError, match="granularity must be one of"):
        fimhooks.FisherMonitor(model, "categorical", granularity="sequence")
    with pytest.raises(ValueError, match="'EF' squares the gradient of each observation"):
        fimhooks.FisherMonitor(
            model, nn.CrossEntropyLoss(), estimators=("EF",), granularity="input"
        )


# --- label noise from the draws' spread, without the exact pass ----------------------------


@pytest.mark.parametrize("granularity", ["token", "input"])
def test_the_draws_spread_estimates_the_closed_form_without_the_exact_pass(granularity):
    model, x, mask = lm_batch()
    mc_samples, steps = 3, 300
    monitor = fimhooks.FisherMonitor(
        model, "categorical", estimators=("I1",), mc_samples=mc_samples,
        granularity=granularity, seed=13,
    )  # fmt: skip
    est = collect(monitor, model, x, mask, steps)
    assert est.label_noise == "draws"
    scores, probs = score_table(model, x, "categorical")
    g, v = moments(scores, probs)
    # one draw's summand variance per input; the running estimate over identical steps
    closed = label_variance(g, v, weights_of(mask), granularity).sum(0)
    closed = closed / (len(x) ** 2 * mc_samples * steps)

    # the spread's own variance per step, (μ₄ − σ⁴ (M−3)/(M−1))/M for each sample variance
    # taken: of a position's a² ("token", added with w⁴) or of an input's summand ("input"),
    # the moments enumerated over that position's or input's labels
    def spread_variance(values, chance):
        c = chance.reshape(*chance.shape, *[1] * (values.dim() - chance.dim()))
        centred = values - (c * values).sum(0)
        sigma2, mu4 = (c * centred**2).sum(0), (c * centred**4).sum(0)
        return (mu4 - sigma2**2 * (mc_samples - 3) / (mc_samples - 1)) / mc_samples

    weights = weights_of(mask)
    if granularity == "token":
        per_position = spread_variance(scores.movedim(2, 0) ** 2, probs.movedim(2, 0))
        spread_var = ((weights**4).unsqueeze(-1) * per_position).sum((0, 1))
    else:
        spread_var = 0
        for n in range(len(x)):
            values, chance = joint(scores[n : n + 1], probs[n : n + 1])
            summand = summands(values, weights[n : n + 1], granularity)[:, 0]  # [J, P]
            spread_var = spread_var + spread_variance(summand, chance)
    spread_se = spread_var.sqrt() / (len(x) ** 2 * mc_samples * steps) / steps**0.5
    z = (flat(est.variance("I1")) - closed) / spread_se.clamp_min(1e-300)
    assert z[spread_se > 0].abs().max() < Z
    summary = est.summary()
    assert "spread among the label draws" in summary and "label share I1" in summary


def test_one_draw_without_the_exact_pass_has_no_label_noise_variance():
    model, x, mask = lm_batch()
    monitor = fimhooks.FisherMonitor(model, "categorical", estimators=("I1",))
    est = collect(monitor, model, x, mask, steps=1)
    assert est.label_noise is None
    with pytest.raises(ValueError, match="mc_samples >= 2"):
        est.variance("I1")


@pytest.mark.parametrize("backend", ["chain", "general"])
def test_the_draws_spread_on_a_chain_of_layers(backend):
    # a Linear weight's sums are formed from its output's terms and its input (rank one)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    mc_samples, steps = 4, 300
    monitor = fimhooks.FisherMonitor(
        model, "bernoulli", estimators=("I1",), mc_samples=mc_samples, backend=backend, seed=2
    )
    for _ in range(steps):
        with monitor:
            model(x).sum().backward()
    est = monitor.estimates()
    scores, probs = score_table(model, x, "bernoulli")
    g, v = moments(scores, probs)
    closed = v.sum((0, 1)) / (len(x) ** 2 * mc_samples * steps)
    c = probs.movedim(2, 0).unsqueeze(-1)
    centred = scores.movedim(2, 0) ** 2 - g
    sigma2, mu4 = (c * centred**2).sum(0), (c * centred**4).sum(0)
    spread_var = ((mu4 - sigma2**2 * (mc_samples - 3) / (mc_samples - 1)) / mc_samples).sum((0, 1))
    spread_se = spread_var.sqrt() / (len(x) ** 2 * mc_samples * steps) / steps**0.5
    z = (flat(est.variance("I1")) - closed) / spread_se.clamp_min(1e-300)
    assert z[spread_se > 0].abs().max() < Z


# --- granularity "batch": one backward of the batch's sampled-label loss --------------------


def small_lm_batch():
    torch.manual_seed(4)
    model = TinyLM(vocab=3, width=2).double()
    x = torch.tensor([[0, 2], [1, 1]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    return model, x, mask


@pytest.mark.parametrize("mc_samples", [2, 4])
def test_batch_granularity_is_unbiased_and_its_spread_estimates_the_closed_form(mc_samples):
    model, x, mask = small_lm_batch()
    steps = 400
    monitor = fimhooks.FisherMonitor(
        model, "categorical", granularity="batch", mc_samples=mc_samples, seed=17
    )
    assert monitor.estimators == ("I1",)
    est = collect(monitor, model, x, mask, steps)
    scores, probs = score_table(model, x, "categorical")
    weights = weights_of(mask)
    g, v = moments(scores, probs)
    fisher = (weights.unsqueeze(-1) * g).sum(1).mean(0)
    scale = len(x) ** 2 * mc_samples * steps  # one draw's sum to the running estimate
    closed = label_variance(g, v, weights, "batch") / scale
    z = (flat(est.fisher("I1")) - fisher) / closed.sqrt().clamp_min(1e-300)
    assert z[closed > 0].abs().max() < Z
    # the spread's own variance: (μ₄ − σ⁴ (M−3)/(M−1))/M of the batch's summand, enumerated
    values, chance = joint(scores, probs)
    summand = summands(values, weights, "batch")  # [J, P]
    c = chance.unsqueeze(1)
    centred = summand - (c * summand).sum(0)
    sigma2, mu4 = (c * centred**2).sum(0), (c * centred**4).sum(0)
    torch.testing.assert_close(sigma2, label_variance(g, v, weights, "batch"))
    spread_var = (mu4 - sigma2**2 * (mc_samples - 3) / (mc_samples - 1)) / mc_samples
    spread_se = spread_var.sqrt() * steps**0.5 / (scale * steps)
    z = (flat(est.variance("I1")) - closed) / spread_se.clamp_min(1e-300)
    assert z[spread_se > 0].abs().max() < Z


def test_batch_granularity_leaves_the_gradients_and_says_what_it_cannot_know():
    model, x, mask = small_lm_batch()
    model(x).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monitor = fimhooks.FisherMonitor(model, "categorical", granularity="batch", mc_samples=2)
    with monitor(mask=mask):
        model(x).sum().backward()
    assert all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expected))
    est = monitor.estimates()
    for undefined in (est.data_variance, lambda: est.empirical_variance("I1")):
        with pytest.raises(ValueError, match="undefined at granularity 'batch'"):
            undefined()
    stats = est.layer_statistics()["embed"]["I1"]
    assert stats["label_share"] is None and stats["draws_suggested"] is None
    assert math.isfinite(stats["rse"])  # label noise alone
    assert "embed" in est.summary()
    monitor.remove()
    with pytest.raises(ValueError, match="granularity='batch' squares the score"):
        fimhooks.FisherMonitor(
            model, "categorical", granularity="batch", estimators=("I1", "exact")
        )


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_intervals_from_the_draws_spread_cover_the_fisher(granularity):
    # R independent runs of S steps with M draws: the running estimate ± 1.96 standard
    # errors from the spread covers the Fisher in about 95% of the runs (the mean of S
    # steps is near normal; the binomial count's sd is √(0.95·0.05/R)). With M = 2 the
    # spread is too rough here: "input" intervals covered 92-93% (docs/math.md §7d)
    scores, probs, weights = lm_case()
    g, _ = moments(scores, probs)
    fisher = (weights.unsqueeze(-1) * g).sum(1).sum(0)  # the step's sum's expectation
    runs, steps, mc_samples = 1000, 200, 4
    drawn = sample(scores, probs, runs * steps * mc_samples, torch.Generator().manual_seed(23))
    x = summands(drawn, weights, granularity)
    x = x if granularity == "batch" else x.sum(1)  # the step's sum over inputs
    x = x.unflatten(0, (mc_samples, runs, steps))
    estimate = x.mean((0, 2))  # [runs, P]
    variance = draw_variance(x).sum(1) / (mc_samples * steps**2)
    if granularity != "batch":  # the spread is taken per input, then added
        per_input = summands(drawn, weights, granularity).unflatten(0, (mc_samples, runs, steps))
        variance = draw_variance(per_input).sum((1, 2)) / (mc_samples * steps**2)
    covered = ((estimate - fisher).abs() <= 1.96 * variance.sqrt()).double().mean(0)
    keep = g.sum((0, 1)) > 0
    assert ((covered[keep] - 0.95).abs() < 4 * (0.95 * 0.05 / runs) ** 0.5).all(), covered


@pytest.mark.parametrize("granularity", ["input", "batch"])
def test_a_hugging_face_gpt2_at_the_coarser_granularities(granularity):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=5, n_positions=3, n_embd=4, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double()  # lm_head tied to wte
    tokens = torch.tensor([[0, 3, 1], [4, 4, 2]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    logits = lambda out: out.logits  # noqa: E731
    scores, probs = score_table(model, tokens, "categorical", logits)
    weights = weights_of(mask)
    g, v = moments(scores, probs)
    fisher = (weights.unsqueeze(-1) * g).sum(1).mean(0)
    mc_samples, steps = 2, 150
    closed = label_variance(g, v, weights, granularity)
    closed = (closed if granularity == "batch" else closed.sum(0)) / (len(tokens) ** 2 * mc_samples)
    if granularity == "input":  # the closed form from the exact pass, in one step
        monitor = fimhooks.FisherMonitor(
            model, "categorical", output=logits, estimators=("I1", "exact"),
            granularity="input", mc_samples=mc_samples,
        )  # fmt: skip
        with monitor(mask=mask):
            model(tokens).logits.sum().backward()
        torch.testing.assert_close(flat(monitor.estimates().variance("I1")), closed)
        monitor.remove()
    monitor = fimhooks.FisherMonitor(
        model, "categorical", output=logits, estimators=("I1",), granularity=granularity,
        mc_samples=mc_samples, seed=5,
    )  # fmt: skip
    for _ in range(steps):
        with monitor(mask=mask):
            model(tokens).logits.sum().backward()
    model.zero_grad()
    standard_error = (closed / steps).sqrt()
    z = (flat(monitor.estimates().fisher("I1")) - fisher) / standard_error.clamp_min(1e-300)
    noisy = closed > 1e-12 * closed.max()  # zero-Fisher entries (key biases): rounding only
    assert z[noisy].abs().max() < Z


def closed_over_passes(model, batches, likelihood, granularity, mc_samples, output=None):
    """Enumerated closed form of the running Î₁'s label noise over passes ``(x, mask)``."""
    total, inputs = 0.0, 0
    for x, mask in batches:
        args = (model, x, likelihood) + ((output,) if output else ())
        scores, probs = score_table(*args)
        g, v = moments(scores, probs)
        weights = weights_of(mask) if mask is not None else torch.ones(len(x), 1).double()
        variance = label_variance(g, v, weights, granularity)
        total = total + (variance if granularity == "batch" else variance.sum(0))
        inputs += len(x)
    return total / (inputs**2 * mc_samples)


@pytest.mark.parametrize("collected", ["token", "input"])
def test_every_granularitys_variance_from_one_monitor(collected):
    # the exact pass keeps the cross terms, so one monitor gives all three closed forms
    model, x, mask = lm_batch()
    passes = [(x, mask), (x[:2].flip(1), mask[:2])]  # the batch's cross terms are per pass
    monitor = fimhooks.FisherMonitor(
        model, "categorical", estimators=("I1", "exact"), granularity=collected, mc_samples=2
    )
    for tokens, m in passes:
        collect(monitor, model, tokens, m, steps=1)
    est = monitor.estimates()
    for granularity in GRANULARITIES:
        closed = closed_over_passes(model, passes, "categorical", granularity, 2)
        torch.testing.assert_close(flat(est.variance("I1", granularity=granularity)), closed)
    stats = est.layer_statistics()["mix"]["I1"]["rse_by_granularity"]
    names = ("mix.weight", "mix.bias")
    data = sum(est.data_variance()[n].sum() for n in names)
    norm = sum((est.fisher("I1")[n] ** 2).sum() for n in names)
    for granularity, rse in stats.items():
        label = sum(est.variance("I1", granularity=granularity)[n].sum() for n in names)
        assert rse == pytest.approx(((data + label) / norm).sqrt().item(), rel=1e-12)
    assert stats["token"] < stats["input"] < stats["batch"]  # more cross terms, more noise


@pytest.mark.parametrize("backend", ["chain", "general"])
def test_the_batch_closed_form_on_a_chain_of_layers(backend):
    # one observation per input: token and input agree, the batch adds the inputs' cross terms
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    passes = [(torch.randn(3, 3, dtype=torch.float64), None) for _ in range(2)]
    monitor = fimhooks.FisherMonitor(
        model, "bernoulli", estimators=("I1", "exact"), backend=backend
    )
    for x, _ in passes:
        with monitor:
            model(x).sum().backward()
    est = monitor.estimates()
    for granularity in GRANULARITIES:
        closed = closed_over_passes(model, passes, "bernoulli", granularity, 1)
        torch.testing.assert_close(flat(est.variance("I1", granularity=granularity)), closed)
    token, batch = (flat(est.variance("I1", granularity=g)) for g in ("token", "batch"))
    assert (batch > token).any()


# --- the default and the guidance across granularities -------------------------------------


def test_the_default_squares_per_input_where_inputs_have_positions():
    model, x, mask = lm_batch()
    auto = fimhooks.FisherMonitor(model, "categorical", estimators=("I1", "exact"), seed=3)
    est = collect(auto, model, x, mask, steps=1)
    auto.remove()
    explicit = fimhooks.FisherMonitor(
        model, "categorical", estimators=("I1", "exact"), granularity="input", seed=3
    )
    same = collect(explicit, model, x, mask, steps=1)
    explicit.remove()
    assert auto.granularity == "auto" and est.granularity == "input"
    torch.testing.assert_close(flat(est.fisher("I1")), flat(same.fisher("I1")))
    # per observation where a per-observation quantity is asked for
    bounded = fimhooks.FisherMonitor(model, "categorical", estimators=("I1", "exact"), bounds=True)
    assert collect(bounded, model, x, mask, steps=1).granularity == "token"
    bounded.remove()
    mlp = nn.Sequential(nn.Linear(3, 2)).double()
    plain = fimhooks.FisherMonitor(mlp, "categorical", estimators=("I1", "exact"))
    with plain:
        mlp(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    assert plain.estimates().granularity == "token"  # one position: the same estimator


def test_the_recommended_granularity_has_the_least_variance_per_vector():
    model, x, mask = lm_batch()
    monitor = fimhooks.FisherMonitor(model, "categorical", estimators=("I1", "exact"), mc_samples=2)
    est = collect(monitor, model, x, mask, steps=1)
    passes = [(x, mask)]
    names = ("mix.weight", "mix.bias")
    data = sum(est.data_variance()[n].sum() for n in names)
    norm = sum((est.fisher("I1")[n] ** 2).sum() for n in names)  # the rse of Î₁ itself
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    T = x.shape[1]
    vectors = {"token": 2 * T, "input": 2, "batch": 2}
    expected = {}
    for granularity in GRANULARITIES:
        closed = closed_over_passes(model, passes, "categorical", granularity, 2)
        by_name = dict(zip(sizes, closed.split(list(sizes.values()))))
        label = sum(by_name[n].sum() for n in names)
        expected[granularity] = ((data + label) / norm).sqrt().item()
    layer = est.layer_statistics()["mix"]
    for granularity, rse in layer["I1"]["rse_by_granularity"].items():
        assert rse == pytest.approx(expected[granularity], rel=1e-10)
    assert layer["I1"]["vectors_by_granularity"] == vectors
    best = min(expected, key=lambda g: expected[g] ** 2 * vectors[g])
    assert layer["recommended_granularity"] == best
    at_cost = layer["I1"]["rse_at_same_cost"]
    assert at_cost["input"] == pytest.approx(expected["input"])  # this monitor's own
    assert at_cost["token"] == pytest.approx(expected["token"] * T**0.5)
    assert "best I1 at" in est.summary()
    state = monitor.state_dict()
    monitor.remove()
    restored = fimhooks.FisherMonitor(
        model, "categorical", estimators=("I1", "exact"), mc_samples=2
    )
    restored.load_state_dict(state)
    assert restored.estimates().positions_per_input == T
