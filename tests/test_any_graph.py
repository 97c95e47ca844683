"""Any graph autograd can differentiate, against the torch.func brute force (docs/math.md §9)."""

import graphs
import pytest
import torch
from reference import estimator_reference
from test_reference import assert_close, assert_label_variances
from torch import nn
from torch.nn import functional as F

import fimhooks

SIGMA = 0.7
#: model, likelihood, the functional loss the user trains with
CASES = [
    ("residual_mlp", "categorical", lambda h, y: F.cross_entropy(h, y)),
    ("relu_residual", "bernoulli", lambda h, y: F.binary_cross_entropy_with_logits(h, y)),
    ("layernorm_gelu", "categorical", lambda h, y: F.cross_entropy(h, y, label_smoothing=0.1)),
    ("encoder_classifier", "categorical", lambda h, y: F.cross_entropy(h, y)),
    ("tiny_lm", "categorical", lambda h, y: F.cross_entropy(h.flatten(0, 1), y.flatten())),
    ("conv_groupnorm", "bernoulli", lambda h, y: F.binary_cross_entropy_with_logits(h, y)),
    ("residual_mlp", "gaussian", lambda h, y: F.mse_loss(h, y)),
    ("tied", "gaussian", lambda h, y: F.mse_loss(h, y, reduction="sum")),
]


def targets(h, likelihood):
    generator = torch.Generator().manual_seed(2)
    if likelihood == "categorical":
        return torch.randint(0, h.shape[-1], h.shape[:-1], generator=generator)
    if likelihood == "bernoulli":
        return torch.randint(0, 2, h.shape, generator=generator).double()
    return torch.randn(h.shape, generator=generator, dtype=h.dtype)


def collect(model, likelihood, x, loss, mc_samples=2, mask=None, **options):
    sigma = SIGMA if likelihood == "gaussian" else None
    monitor = fimhooks.FisherMonitor(
        model, likelihood, sigma=sigma, mc_samples=mc_samples, **options
    )
    h = model(x)
    with monitor(mask=mask):
        loss(h, targets(h, likelihood)).backward()
    monitor.remove()
    return monitor.estimates()


def gradients(model, x, loss, likelihood, monitor=None):
    model.zero_grad()
    h = model(x)
    if monitor is None:
        loss(h, targets(h, likelihood)).backward()
    else:
        with monitor:
            loss(h, targets(h, likelihood)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name, likelihood, loss", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_closed_forms_match_brute_force(name, likelihood, loss):
    out = 5 if name == "tiny_lm" else 3
    model, x = graphs.make(name, out), graphs.inputs(name)
    plain = gradients(model, x, loss, likelihood)
    est = collect(model, likelihood, x, loss, estimators=("I1", "exact"))
    sigma = SIGMA if likelihood == "gaussian" else 1.0
    ref = estimator_reference(model, likelihood, x, 2, sigma, second_order=False)
    assert_close(est.fisher("exact"), ref["exact"], "exact")
    assert_label_variances(est, ref)
    assert_close(est.data_variance(), ref["data"], "data variance")
    monitor = fimhooks.FisherMonitor(
        model, likelihood, sigma=None if sigma == 1.0 else sigma, estimators=("I1", "exact")
    )
    monitored = gradients(model, x, loss, likelihood, monitor)
    for key, grad in plain.items():  # p.grad is what it is without the monitor
        torch.testing.assert_close(monitored[key], grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [3, 4], ids=["batch equals length", "batch 4"])
def test_position_embeddings_computed_once_for_the_batch(n):
    model, x = graphs.make("position_lm", 5), graphs.inputs("position_lm", n=n)
    est = collect(model, "categorical", x, CASES[4][2], estimators=("I1", "exact"))
    ref = estimator_reference(model, "categorical", x, 2, second_order=False)
    assert_close(est.fisher("exact"), ref["exact"], "exact")
    assert_label_variances(est, ref)
    assert est.generic_layers == ()


def test_per_token_outputs_with_a_mask():
    model, x = graphs.make("tiny_lm", 5), graphs.inputs("tiny_lm")
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    loss = CASES[4][2]
    est = collect(model, "categorical", x, loss, mask=mask, estimators=("I1", "exact"))
    keep = mask.any(1)
    ref = estimator_reference(model, "categorical", x[keep], 2, mask=mask[keep], second_order=False)
    assert est.num_inputs == 3
    assert_close(est.fisher("exact"), ref["exact"], "exact")
    assert_label_variances(est, ref)
    assert_close(est.data_variance(), ref["data"], "data variance")


def test_cross_entropy_module_layout_and_label_smoothing():
    """``nn.CrossEntropyLoss`` reads ``[N, C, T]``; label smoothing changes the loss only."""

    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = graphs.make("tiny_lm", 5)

        def forward(self, tokens):
            return self.lm(tokens).transpose(1, 2)

    model, x = Transposed(), graphs.inputs("tiny_lm")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2)
    labels = torch.randint(0, 5, (4, 3))
    est = collect(model, loss_fn, x, lambda h, y: loss_fn(h, labels), estimators=("I1", "exact"))
    ref = estimator_reference(model.lm, "categorical", x, 2, second_order=False)
    assert_close(est.fisher("exact"), {f"lm.{k}": v for k, v in ref["exact"].items()}, "exact")


def test_i2_is_exact_where_the_network_is_piecewise_linear():
    model, x = graphs.make("relu_residual", 3), graphs.inputs("relu_residual")
    loss = CASES[1][2]
    est = collect(model, "bernoulli", x, loss)
    ref = estimator_reference(model, "bernoulli", x, 2)
    assert_close(est.fisher("I2"), ref["mean_I2"], "I2")
    assert_close(est.variance("I2"), ref["v2"], "v2")
    assert all((v == 0).all() for v in est.variance("I2").values())


@pytest.mark.parametrize(
    "name, match",
    [
        ("residual_mlp", r"curvature above layer '(a|b)'.*operation (Tanh|Sigmoid)"),
        ("tied", r"'inner.weight', which is used by 2 calls"),
        ("encoder_classifier", r"layer 'encoder.self_attn' \(MultiheadAttention\)"),
    ],
)
def test_i2_is_refused_where_it_would_need_curvature(name, match):
    model, x = graphs.make(name, 3), graphs.inputs(name)
    asked = fimhooks.FisherMonitor(model, "categorical", estimators=("I1", "I2", "exact"))
    h = model(x)
    with pytest.raises(RuntimeError, match=match):
        with asked:
            F.cross_entropy(h, targets(h, "categorical")).backward()
    asked.remove()
    monitor = fimhooks.FisherMonitor(model, "categorical")  # the default estimators
    h = model(x)
    with pytest.warns(RuntimeWarning, match="'I2' is left out of the default estimators.*" + match):
        with monitor:
            F.cross_entropy(h, targets(h, "categorical")).backward()
    assert monitor.estimators == ("I1", "exact")
    est = monitor.estimates()
    assert est.estimators == ("I1", "exact") and est.fisher("exact")
    state = monitor.state_dict()
    monitor.remove()
    fimhooks.FisherMonitor(model, "categorical").load_state_dict(state)  # resumes


def test_errors_for_outputs_and_options():
    model, x = graphs.make("residual_mlp", 3), graphs.inputs("residual_mlp")

    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return {"logits": self.inner(x)}

    monitor = fimhooks.FisherMonitor(Dict(), "categorical")
    with pytest.raises(TypeError, match="returned dict, not a tensor; pass output="):
        Dict.__call__(monitor.model, x)
    monitor.remove()
    monitor = fimhooks.FisherMonitor(
        Dict(), "categorical", output=lambda out: out["logits"], estimators=("I1", "exact")
    )
    h = monitor.model(x)["logits"]
    with monitor:
        h.sum().backward()
    assert monitor.estimates().num_inputs == len(x)
    with pytest.raises(ValueError, match="sigma is a parameter of the Gaussian"):
        fimhooks.FisherMonitor(model, "bernoulli", sigma=0.5)
    with pytest.raises(ValueError, match="'categorical', 'bernoulli', 'gaussian'"):
        fimhooks.FisherMonitor(model, "poisson")
    lm, tokens = graphs.make("tiny_lm", 5), graphs.inputs("tiny_lm")
    monitor = fimhooks.FisherMonitor(lm, "categorical")
    h = lm(tokens)
    with pytest.raises(ValueError, match=r"mask has shape \(4, 2\).*\(4, 3\) or \(4,\)"):
        with monitor(mask=torch.ones(4, 2, dtype=torch.bool)):
            h.sum().backward()


@pytest.mark.statistical
@pytest.mark.parametrize("estimators", [("I1",), ("I1", "exact")], ids=["alone", "with exact"])
@pytest.mark.parametrize("name", ["encoder_classifier", "tiny_lm"])
def test_i1_is_unbiased_on_a_transformer(name, estimators):
    """The running Î₁ over many label draws within a z-bound of exact (docs/math.md §3, §9)."""
    model, x = graphs.make(name, 3), graphs.inputs(name)
    steps = 200
    monitor = fimhooks.FisherMonitor(
        model, "categorical", estimators=estimators, mc_samples=2, seed=0
    )
    for _ in range(steps):
        h = model(x)
        with monitor:
            h.sum().backward()
        model.zero_grad()
    ref = estimator_reference(model, "categorical", x, 2, second_order=False)
    fisher = monitor.estimates().fisher("I1")
    for key, exact in ref["exact"].items():
        spread = (ref["v1"][key] / steps).sqrt()
        error = fisher[key] - exact
        zero = spread <= 1e-12 * exact.abs().max()
        assert (error[zero].abs() <= 1e-8 * exact.abs().max()).all()
        z = error[~zero] / spread[~zero]
        assert (z.abs() < 5.0).all(), f"{key}: z={z}"


def test_summary_names_the_layers_on_the_generic_rule():
    model, x = graphs.make("encoder_classifier", 3), graphs.inputs("encoder_classifier")
    est = collect(model, "categorical", x, CASES[3][2], estimators=("I1", "exact"))
    assert est.generic_layers == ("encoder.self_attn",)
    assert "generic per-input rule (exact, slower): encoder.self_attn." in est.summary()
    relu_model, relu_x = graphs.make("relu_residual", 3), graphs.inputs("relu_residual")
    relu = collect(relu_model, "bernoulli", relu_x, CASES[1][2])
    assert relu.generic_layers == () and "generic" not in relu.summary()


def test_an_output_the_likelihood_cannot_read():
    model = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0))
    monitor = fimhooks.FisherMonitor(model, "categorical")
    h = model(torch.randn(4, 3))
    with pytest.raises(
        ValueError, match=r"categorical outputs need a class axis: got shape \(4,\)"
    ):
        with monitor:
            h.sum().backward()


def test_forward_passes_without_backward_are_not_kept():
    model, x = graphs.make("residual_mlp", 3), graphs.inputs("residual_mlp")
    monitor = fimhooks.FisherMonitor(model, "categorical", estimators=("I1", "exact"))
    first = model(x)
    for _ in range(3):  # a validation loop with gradients enabled
        model(x)
    assert monitor.held_forward_passes == 1
    with pytest.warns(RuntimeWarning, match="no longer holds"):
        with pytest.warns(RuntimeWarning, match="nothing was collected"):
            with monitor:
                first.sum().backward()
    second = model(x)
    with monitor:
        second.sum().backward()
    assert monitor.estimates().num_inputs == len(x) and not monitor.held_forward_passes
    with monitor:  # gradient accumulation: two forward and backward passes in one block
        model(x[:2]).sum().backward()
        model(x[2:]).sum().backward()
    assert monitor.estimates().num_inputs == 2 * len(x)


@pytest.mark.parametrize("name, case", [("tiny_lm", 4), ("tied", 1)])
def test_chunks_of_directions_inputs_and_positions_give_the_same_numbers(name, case):
    """One direction, one input and one position per backward: the same estimates."""
    _, likelihood, loss = CASES[case]
    model, x = graphs.make(name, 5 if name == "tiny_lm" else 3), graphs.inputs(name)
    whole = collect(model, likelihood, x, loss, seed=3, estimators=("I1", "exact"))
    chunked = collect(model, likelihood, x, loss, seed=3, estimators=("I1", "exact"), max_memory=1)
    for estimator in ["I1", "exact"]:
        assert_close(chunked.fisher(estimator), whole.fisher(estimator), estimator)
        empirical = chunked.empirical_variance(estimator)
        assert_close(empirical, whole.empirical_variance(estimator), estimator)
    assert_close(chunked.variance("I1"), whole.variance("I1"), "v1")


def test_replaying_the_model_records_nothing():
    """A parameter used in the model's own forward is replayed there, unrecorded."""
    model, x = graphs.make("tiny_lm", 5), graphs.inputs("tiny_lm")
    monitor = fimhooks.FisherMonitor(model, "categorical", estimators=("I1",))
    h = model(x)
    with monitor:
        h.sum().backward()
        assert monitor.held_forward_passes == 1
    est = monitor.estimates()
    assert est.generic_layers == ("",)  # wpe, used in the root's forward
    assert "generic per-input rule (exact, slower): <model>." in est.summary()


class ScaledPositionLM(graphs.PositionEmbeddingLM):
    """Positions scaled before they are broadcast over the batch (no reshape-only path)."""

    def forward(self, tokens):
        where = torch.arange(tokens.shape[1])
        x = self.wte(tokens) + (2.0 * self.positions(where))[None]
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.lm_head(x)


@pytest.mark.parametrize("n", [3, 4], ids=["batch equals length", "batch 4"])
def test_a_shared_value_transformed_before_its_broadcast(n):
    torch.manual_seed(0)
    model, x = ScaledPositionLM().double(), graphs.inputs("position_lm", n=n)
    est = collect(model, "categorical", x, CASES[4][2], estimators=("I1", "exact"))
    ref = estimator_reference(model, "categorical", x, 2, second_order=False)
    assert_close(est.fisher("exact"), ref["exact"], "exact")
    assert_label_variances(est, ref)


def test_functional_batch_statistics_are_refused():
    """``F.batch_norm(training=True)`` mixes the inputs: no per-input gradient exists."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.b(F.batch_norm(self.a(x), None, None, training=True).tanh())

    torch.manual_seed(0)
    model, x = Net().double(), graphs.inputs("residual_mlp")
    with pytest.raises(RuntimeError, match="depend on that input only"):
        collect(model, "categorical", x, CASES[0][2], estimators=("I1", "exact"))
