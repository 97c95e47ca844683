"""FisherPreconditioner against known answers (issue 5)."""

import math

import pytest
import torch
from cases import make_input, make_loss, make_model, make_target
from reference import estimator_reference
from torch import nn
from torch.func import jacrev

import fimhooks
from fimhooks.optim import FisherPreconditioner


def backward(monitor, model, loss_fn, x, y=None):
    model.zero_grad()
    output = model(x)
    loss = loss_fn(output, make_target(loss_fn, output) if y is None else y)
    with monitor:
        loss.backward()


def test_diagonal_step_is_damped_solve_with_brute_force_fisher():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp", n=6)
    ref = estimator_reference(model, loss_fn, x, 1)["exact"]
    monitor = fimhooks.FisherMonitor(model, loss_fn)
    precond = FisherPreconditioner(monitor, damping=0.1, estimator="exact")
    backward(monitor, model, loss_fn, x)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    precond.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name] / (ref[name] + 0.1), rtol=1e-8, atol=0)


def test_auto_picks_the_smaller_relative_error_and_uncertainty_damps_more():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("sigmoid_mlp", out), make_input("sigmoid_mlp", n=8)
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=("I1", "I2"))
    precond = FisherPreconditioner(monitor, damping=0.01, uncertainty_damping=2.0)
    backward(monitor, model, loss_fn, x)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    precond.step()
    est = monitor.estimates()
    stats = est.layer_statistics()
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        chosen = precond.choices[layer]
        assert stats[layer][chosen]["rse"] == min(stats[layer][e]["rse"] for e in ("I1", "I2"))
        expected = grads[name] / (
            est.fisher(chosen)[name] + 0.01 + 2.0 * est.standard_errors(chosen)[name]
        )
        torch.testing.assert_close(p.grad, expected, rtol=1e-10, atol=0)


def brute_force_kronecker(model, loss_fn, x):
    """KFLR factors of each Linear layer from torch.func: A = E[x̃x̃ᵀ], G = E[Jᵀ I_h J]."""
    factors, h = {}, x
    for index, layer in enumerate(model):
        if isinstance(layer, nn.Linear):
            inputs = torch.cat([h, torch.ones_like(h[:, :1])], 1)
            A = inputs.T @ inputs / len(x)
            z = layer(h).detach()
            rest = model[index + 1 :]
            G = torch.zeros(z.shape[1], z.shape[1], dtype=x.dtype)
            for zn in z:
                J = jacrev(lambda v, rest=rest: rest(v.unsqueeze(0))[0])(zn)  # [C, out]
                p = torch.softmax(rest(zn.unsqueeze(0))[0], 0)
                G += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J / len(x)
            factors[str(index)] = (A.detach(), G.detach())
        h = layer(h).detach()
    return factors


def test_kfac_step_is_damped_kronecker_solve_with_brute_force_factors():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp", n=6)
    factors = brute_force_kronecker(model, loss_fn, x)
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=("exact",))
    precond = FisherPreconditioner(monitor, damping=0.05, structure="kfac", estimator="exact")
    backward(monitor, model, loss_fn, x)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    precond.step()
    for layer, (A, G) in factors.items():
        pi = math.sqrt((A.trace() / len(A)) / (G.trace() / len(G)))
        A_damped = A + pi * 0.05**0.5 * torch.eye(len(A), dtype=A.dtype)
        G_damped = G + 0.05**0.5 / pi * torch.eye(len(G), dtype=G.dtype)
        grad = torch.cat([grads[f"{layer}.weight"], grads[f"{layer}.bias"].unsqueeze(1)], 1)
        solved = torch.linalg.solve(G_damped, grad) @ torch.linalg.inv(A_damped)
        got = torch.cat([model[int(layer)].weight.grad, model[int(layer)].bias.grad[:, None]], 1)
        torch.testing.assert_close(got, solved, rtol=1e-8, atol=1e-12)
        assert precond.choices[layer] == "kfac-exact"


def test_kfac_on_linear_gaussian_regression_lands_on_least_squares_in_one_step():
    """The Fisher of a linear Gaussian model is exactly Kronecker: one step is Newton's."""
    torch.manual_seed(0)
    x, y, sigma = (
        torch.randn(20, 3, dtype=torch.float64),
        torch.randn(20, 2, dtype=torch.float64),
        0.5,
    )
    model, loss_fn = nn.Linear(3, 2).double(), nn.MSELoss()
    monitor = fimhooks.FisherMonitor(model, loss_fn, sigma=sigma, estimators=("exact",))
    precond = FisherPreconditioner(monitor, damping=1e-20, structure="kfac")  # λ → 0
    # MSELoss (mean over N·C entries) = (2σ²/C) × the per-observation negative log-likelihood
    optimizer = torch.optim.SGD(model.parameters(), lr=2 / (2 * sigma**2))
    backward(monitor, model, loss_fn, x, y)
    precond.step()
    optimizer.step()
    design = torch.cat([x, torch.ones(20, 1, dtype=x.dtype)], 1)
    solution = torch.linalg.lstsq(design, y).solution.T
    torch.testing.assert_close(model.weight, solution[:, :3], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(model.bias, solution[:, 3], rtol=1e-6, atol=1e-8)


def test_diagonal_step_on_orthogonal_design_is_newton_step():
    """With orthogonal inputs the Fisher is diagonal, so the diagonal step is Newton's."""
    hadamard = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    x = torch.cat([hadamard, -hadamard]).double() * torch.tensor([1.0, 2.0, 0.5, 3.0]).double()
    y = torch.randn(8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model, loss_fn = nn.Linear(4, 1, bias=False).double(), nn.MSELoss()
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=("exact",))
    precond = FisherPreconditioner(monitor, damping=1e-12, estimator="exact")
    optimizer = torch.optim.SGD(model.parameters(), lr=1 / 2)  # C / (2σ²) with σ = 1
    backward(monitor, model, loss_fn, x, y)
    precond.step()
    optimizer.step()
    solution = torch.linalg.lstsq(x, y).solution.T
    torch.testing.assert_close(model.weight, solution, rtol=1e-8, atol=1e-10)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # backward outside `with`
def test_pass_through_before_collection_and_for_frozen_or_gradless_parameters():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn, every=2)
    precond = FisherPreconditioner(monitor, damping=0.1)
    output = model(x)
    loss_fn(output, make_target(loss_fn, output)).backward()  # outside the monitor
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    precond.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n])
    backward(monitor, model, loss_fn, x)  # collected
    model[0].bias.requires_grad_(False)
    model[2].bias.grad = None
    frozen_grad = model[0].bias.grad.clone()
    precond.step()
    assert torch.equal(model[0].bias.grad, frozen_grad) and model[2].bias.grad is None


def test_kfac_with_a_bias_without_gradient_leaves_the_bias_alone():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=("exact",))
    precond = FisherPreconditioner(monitor, structure="kfac")
    backward(monitor, model, loss_fn, x)
    model[2].bias.grad = None
    precond.step()
    assert model[2].bias.grad is None and torch.isfinite(model[2].weight.grad).all()


@pytest.mark.parametrize("structure", ["diag", "kfac"])
def test_state_dict_restores_the_preconditioner_exactly(structure):
    loss_fn, out, _ = make_loss("bernoulli")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn, ema_decay=0.9)
    precond = FisherPreconditioner(monitor, structure=structure, update_every=3)
    backward(monitor, model, loss_fn, x)
    precond.step()
    assert precond.choices["0"] == ("kfac-exact" if structure == "kfac" else "exact")
    state = precond.state_dict()
    other = FisherPreconditioner(monitor, structure=structure, update_every=3)
    other.load_state_dict(state)
    backward(monitor, model, loss_fn, x)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    precond.step()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad.copy_(grads[n])
    other.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, expected[n])


def test_errors_and_fallback_warning():
    loss_fn, out, _ = make_loss("categorical")
    model = make_model("cnn", out)
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=("I1",))
    with pytest.raises(ValueError, match="not collected"):
        FisherPreconditioner(monitor, estimator="exact")
    with pytest.raises(ValueError, match="uncertainty_damping"):
        FisherPreconditioner(monitor, structure="kfac", uncertainty_damping=1.0)
    with pytest.raises(ValueError, match="damping"):
        FisherPreconditioner(monitor, damping=0.0)
    with pytest.warns(RuntimeWarning, match=r"\['0'\] have no Kronecker factors"):
        FisherPreconditioner(monitor, structure="kfac")


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # BackPACK's own hooks
def test_exact_factors_are_backpacks_kflr_per_observation():
    import copy

    from backpack import backpack, extend
    from backpack.extensions import KFLR

    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp", n=6)
    reference = extend(copy.deepcopy(model))
    output = reference(x)
    with backpack(KFLR()):
        extend(nn.CrossEntropyLoss())(output, make_target(loss_fn, output)).backward()
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=("exact",))
    FisherPreconditioner(monitor, structure="kfac")
    backward(monitor, model, loss_fn, x)
    factors = monitor.estimates().kronecker_factors("exact")
    for layer in ("0", "2"):
        G_backpack, A_backpack = reference[int(layer)].weight.kflr
        A, G = factors[layer]
        inputs = A.shape[0] - 1  # the last row and column belong to the bias
        # with reduction="mean", BackPACK's factors are per observation, as fimhooks' are
        torch.testing.assert_close(A[:inputs, :inputs], A_backpack, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(G, G_backpack, rtol=1e-10, atol=1e-12)


def test_kfac_on_a_model_that_is_not_a_chain_falls_back_with_a_warning():
    from torch import nn

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(x + torch.relu(self.a(x)))

    model = Residual()
    monitor = fimhooks.FisherMonitor(model, "categorical", estimators=("I1", "exact"))
    precond = fimhooks.optim.FisherPreconditioner(monitor, structure="kfac", estimator="exact")
    loss = nn.functional.cross_entropy(model(torch.randn(8, 3)), torch.zeros(8, dtype=torch.long))
    with monitor:
        loss.backward()
    with pytest.warns(RuntimeWarning, match=r"\['a', 'b'\] got no Kronecker factors"):
        precond.step()
    assert precond.choices == {"a": "exact", "b": "exact"}


def test_bad_damping_and_non_finite_steps_are_reported():
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 2)).double()
    monitor = fimhooks.FisherMonitor(model, "categorical", estimators=("I1", "exact"))
    with pytest.raises(TypeError, match="damping must be a number, got str"):
        FisherPreconditioner(monitor, damping="1e-3")
    with pytest.raises(ValueError, match="positive and finite"):
        FisherPreconditioner(monitor, damping=float("inf"))
    precond = FisherPreconditioner(monitor, damping=1e-300, estimator="exact")
    x = torch.zeros(4, 3, dtype=torch.float64)  # zero inputs: the weight's Fisher is zero
    model.zero_grad()
    output = model(x)
    with monitor:
        (output.sum() + 1e10 * model[0].weight.sum()).backward()  # a gradient there anyway
    grad = model[0].weight.grad.clone()
    with pytest.warns(RuntimeWarning, match="'0.weight' is not finite.*Increase the damping"):
        precond.step()
    assert torch.equal(model[0].weight.grad, grad)


def test_negative_i2_entries_are_clipped_before_the_damping():
    from fimhooks.fisher.preconditioning import diagonal_denominator

    fisher = torch.tensor([-0.5, 0.0, 2.0], dtype=torch.float64)
    denominator = diagonal_denominator(fisher, 0.1)
    assert torch.equal(denominator, torch.tensor([0.1, 0.1, 2.1], dtype=torch.float64))


def test_diagonal_step_on_parametrized_leaves_uses_their_own_fisher():
    """weight_norm: the preconditioner acts on the leaves autograd updates (original0/1)."""
    loss_fn, out, _ = make_loss("categorical")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, out)
    ).double()
    x = make_input("tanh_mlp", n=6)
    ref = estimator_reference(model, loss_fn, x, 1, second_order=False)["exact"]
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=("I1", "exact"))
    precond = FisherPreconditioner(monitor, damping=0.1, estimator="exact")
    backward(monitor, model, loss_fn, x)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    precond.step()
    assert "0.parametrizations.weight.original1" in ref
    for name, p in model.named_parameters():
        assert monitor.estimates().fisher("exact")[name].shape == p.shape
        torch.testing.assert_close(p.grad, grads[name] / (ref[name] + 0.1), rtol=1e-8, atol=0)


def test_the_declarations_say_what_preconditions_and_what_it_costs():
    from fimhooks.fisher.guidance import cost_per_input
    from fimhooks.fisher.quantities import ESTIMATOR_SPECS
    from fimhooks.optim import ESTIMATOR_CHOICES

    assert ESTIMATOR_CHOICES == ("I1", "I2", "exact", "auto")  # EF is biased
    assert [cost_per_input(e, 3, 10) for e in ESTIMATOR_SPECS] == [3, 10, 10, 1]
    assert [e for e, s in ESTIMATOR_SPECS.items() if s.needs_curvature] == ["I2"]
    assert [e for e, s in ESTIMATOR_SPECS.items() if s.needs_data_labels] == ["EF"]
