"""``fimhooks.estimate``: the empirical Fisher at the batches' labels, and its errors."""

import pytest
import torch
from cases import make_input, make_loss, make_model, make_target
from reference import empirical_fisher_reference
from test_reference import assert_close
from torch import nn

import fimhooks

EF_CASES = {  # likelihood as passed to estimate, the loss module that encodes it
    "categorical": ("categorical", nn.CrossEntropyLoss()),
    "bernoulli": ("bernoulli", nn.BCEWithLogitsLoss()),
    "cross_entropy_module": (nn.CrossEntropyLoss(reduction="sum"), nn.CrossEntropyLoss()),
    "mse_module": (nn.MSELoss(), nn.MSELoss()),
}


@pytest.mark.parametrize("case", EF_CASES, ids=list(EF_CASES))
def test_empirical_fisher_is_taken_at_the_batches_labels(case):
    likelihood, loss_fn = EF_CASES[case]
    out = 2 if isinstance(loss_fn, nn.MSELoss) else 3
    model, x = make_model("sigmoid_mlp", out), make_input("sigmoid_mlp", n=6)
    y = make_target(loss_fn, model(x))
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    est = fimhooks.estimate(model, likelihood, batches, estimators=("EF", "exact"), progress=False)
    per_input = empirical_fisher_reference(model, loss_fn, x, y)  # σ = 1: nn.MSELoss's own
    assert est.num_inputs == 6
    assert_close(est.fisher("EF"), {k: v.mean(0) for k, v in per_input.items()}, "EF")
    assert all(p.grad is None for p in model.parameters())


def test_empirical_fisher_of_sequences_with_a_loss():
    torch.manual_seed(0)  # [N, T, 3] -> [N, T, C]: one observation per position
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = make_input("sequence_linear", n=4)  # [4, 2, 3]
    y = torch.randint(0, 3, (4, 2), generator=torch.Generator().manual_seed(3))
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)

    def loss(h, labels):  # class weights: the gradient still singles out the label
        return nn.functional.cross_entropy(h.transpose(1, 2), labels, weight=weight)

    est = fimhooks.estimate(
        model, "categorical", (x, y), loss=loss, estimators=("EF",), progress=False
    )
    per_input = empirical_fisher_reference(model, "categorical", x, y)
    assert_close(est.fisher("EF"), {k: v.mean(0) for k, v in per_input.items()}, "EF")
    default = fimhooks.estimate(model, "categorical", (x, y), estimators=("EF",), progress=False)
    assert_close(default.fisher("EF"), est.fisher("EF"), "EF, default loss")


@pytest.mark.parametrize(
    "batch",
    [lambda x, y: x, lambda x, y: (x,), lambda x, y: {"input": x}],
    ids=["tensor", "1-tuple", "dict"],
)
def test_empirical_fisher_without_labels_is_refused(batch):
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    y = make_target(loss_fn, model(x))
    with pytest.raises(ValueError, match=r"'EF' squares the gradient .* pass batches \(x, y\)"):
        fimhooks.estimate(model, "categorical", batch(x, y), estimators=("EF",), progress=False)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    fimhooks.FisherMonitor(model, "categorical").remove()  # the model is free again


def test_loss_without_the_empirical_fisher_is_refused():
    model, x = make_model("tanh_mlp", 3), make_input("tanh_mlp")
    with pytest.raises(ValueError, match="loss= only gives 'EF'"):
        fimhooks.estimate(model, "categorical", x, loss=nn.CrossEntropyLoss(), progress=False)


@pytest.mark.parametrize("input_grad", [True, False], ids=["input_requires_grad", "plain_input"])
def test_a_model_with_every_parameter_frozen_is_refused(input_grad):
    model, x = make_model("tanh_mlp", 3), make_input("tanh_mlp").requires_grad_(input_grad)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of this Sequential requires grad"):
        fimhooks.estimate(model, "categorical", x, progress=False)
    assert not model._forward_pre_hooks
    fimhooks.FisherMonitor(model, "categorical").remove()


def test_estimate_enables_gradients_under_no_grad():
    model, x = make_model("tanh_mlp", 3), make_input("tanh_mlp")
    with torch.no_grad():
        est = fimhooks.estimate(model, "categorical", x, progress=False)
    assert est.num_inputs == len(x)


def _stream(x, count):
    """``count`` batches of 8 rows each (drawn from ``x``), counting those taken."""
    taken = []

    def batches():
        for k in range(count):
            taken.append(k)
            yield x[torch.randint(0, len(x), (8,), generator=torch.Generator().manual_seed(k))]

    return batches(), taken


def test_estimate_stops_at_the_target_rse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    batches, taken = _stream(x, 200)
    est = fimhooks.estimate(model, "categorical", batches, target_rse=0.2, seed=1, progress=False)
    assert 1 < len(taken) < 200
    assert all(max(r.values()) <= 0.2 for r in est.relative_errors().values())
    # one batch fewer had not reached it: the same draws, stopped by max_inputs
    again, _ = _stream(x, 200)
    fewer = fimhooks.estimate(
        model, "categorical", again, max_inputs=8 * (len(taken) - 1), seed=1, progress=False
    )
    assert fewer.num_inputs == 8 * (len(taken) - 1)
    assert max(max(r.values()) for r in fewer.relative_errors().values()) > 0.2


def test_estimate_says_which_layers_missed_the_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"target_rse=0.001 not reached after 16 inputs"):
        fimhooks.estimate(model, "categorical", [x[:8], x[8:]], target_rse=1e-3, progress=False)
    batches, taken = _stream(x, 50)
    est = fimhooks.estimate(
        model, "categorical", batches, target_rse=0.3, layers=["2"], seed=1, progress=False
    )
    assert max(est.relative_errors()["2"].values()) <= 0.3
    with pytest.raises(ValueError, match=r"layers \['9'\] have no collected parameters"):
        fimhooks.estimate(model, "categorical", x, target_rse=0.3, layers=["9"], progress=False)
    with pytest.raises(ValueError, match="target_rse must be a positive number"):
        fimhooks.estimate(model, "categorical", x, target_rse=0, progress=False)
