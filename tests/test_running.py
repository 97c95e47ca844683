"""Running estimates (docs/math.md §5): EMA weights, cumulative merges, state round trips."""

import copy
import math

import pytest
import torch
from cases import make_input, make_loss, make_model, make_target

import fimhooks
from fimhooks.fisher.diagonal_terms import BatchSums
from fimhooks.fisher.running import RunningDiagonal


def random_sums(generator, n):
    values = {
        k: torch.rand(4, generator=generator, dtype=torch.float64) for k in ("exact", "I1", "I2")
    }
    per_input = {
        k: v * torch.rand(n, 4, generator=generator, dtype=torch.float64) for k, v in values.items()
    }
    sums = {k: v.sum(0) for k, v in per_input.items()}
    sums.update({k + "_sq": (v**2).sum(0) for k, v in per_input.items()})
    sums.update({t: torch.rand(4, generator=generator, dtype=torch.float64) for t in ("v1", "v2")})
    return BatchSums(sums)


def test_ema_uses_bias_corrected_weights():
    beta, mc = 0.9, 2
    generator = torch.Generator().manual_seed(0)
    batches = [(random_sums(generator, n), n) for n in (3, 5, 4, 7)]
    acc = RunningDiagonal(beta, mc)
    for sums, n in batches:
        acc.update(sums, n)
    T = len(batches)
    weights = torch.tensor(
        [(1 - beta) * beta ** (T - t) for t in range(1, T + 1)], dtype=torch.float64
    )
    weights /= weights.sum()
    means = torch.stack([s.sums["I1"] / n for s, n in batches])
    label = torch.stack([s.sums["v1"] / (n**2 * mc) for s, n in batches])
    sample = torch.stack(
        [(s.sums["I1_sq"] - s.sums["I1"] ** 2 / n) / ((n - 1) * n) for s, n in batches]
    )
    torch.testing.assert_close(acc.fisher("I1"), weights @ means, rtol=1e-12, atol=0)
    torch.testing.assert_close(acc.label_variance("I1"), weights**2 @ label, rtol=1e-12, atol=0)
    torch.testing.assert_close(acc.sample_variance("I1"), weights**2 @ sample, rtol=1e-12, atol=0)


def test_cumulative_merge_equals_single_accumulator():
    generator = torch.Generator().manual_seed(1)
    batches = [(random_sums(generator, n), n) for n in (3, 5, 4, 7)]
    whole, left, right = (RunningDiagonal(None, 1) for _ in range(3))
    for i, (sums, n) in enumerate(batches):
        whole.update(sums, n)
        (left if i < 2 else right).update(sums, n)
    left.merge(right)
    for estimator in ("I1", "I2", "exact"):
        for get in ("fisher", "label_variance", "sample_variance"):
            torch.testing.assert_close(
                getattr(left, get)(estimator), getattr(whole, get)(estimator), rtol=1e-12, atol=0
            )
    with pytest.raises(ValueError, match="cumulative"):
        RunningDiagonal(0.9, 1).merge(whole)


def collect(monitor, model, loss_fn, x):
    output = model(x)
    with monitor:
        loss_fn(output, make_target(loss_fn, output)).backward()


def test_two_half_batches_equal_one_full_batch():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp", n=8)
    full = fimhooks.FisherMonitor(model, loss_fn)
    collect(full, model, loss_fn, x)
    full.remove()
    halves = fimhooks.FisherMonitor(model, loss_fn)
    collect(halves, model, loss_fn, x[:4])
    collect(halves, model, loss_fn, x[4:])
    a, b = full.estimates(), halves.estimates()
    assert b.num_inputs == 8
    pairs = [
        (a.fisher("exact"), b.fisher("exact")),
        (a.variance("I1"), b.variance("I1")),
        (a.variance("I2"), b.variance("I2")),
        (a.data_variance(), b.data_variance()),
    ]
    for left, right in pairs:
        for name in left:
            torch.testing.assert_close(left[name], right[name], rtol=1e-10, atol=0)


def test_estimates_of_two_processes_merge_into_those_of_one():
    loss_fn, out, _ = make_loss("bernoulli")
    model, x = make_model("sigmoid_mlp", out), make_input("sigmoid_mlp", n=10)
    parts = []
    for half in (x[:4], x[4:]):
        monitor = fimhooks.FisherMonitor(model, loss_fn, seed=7)
        collect(monitor, model, loss_fn, half)
        monitor.remove()
        parts.append(monitor.estimates())
    merged = parts[0].merge(parts[1])
    assert merged.num_inputs == 10
    whole_data = {n: v.clone() for n, v in merged.data_variance().items()}
    full = fimhooks.FisherMonitor(model, loss_fn)
    collect(full, model, loss_fn, x)
    full.remove()
    fisher = full.estimates().fisher("exact")
    for name, value in full.estimates().data_variance().items():
        # variances come from raw float64 sums: summed in another order they differ by
        # rounding of order eps · mean², which dominates where the variance is tiny
        error = (whole_data[name] - value).abs()
        assert (error <= 1e-10 * value.abs() + 1e-14 * fisher[name] ** 2).all(), name
    for name, value in full.estimates().fisher("exact").items():
        torch.testing.assert_close(merged.fisher("exact")[name], value, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="cumulative"):
        ema = fimhooks.FisherMonitor(model, loss_fn, ema_decay=0.5)
        collect(ema, model, loss_fn, x)
        ema.estimates().merge(ema.estimates())


def test_state_dict_round_trip_restores_estimates_and_sampler():
    loss_fn, out, _ = make_loss("bernoulli")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn, ema_decay=0.8)
    collect(monitor, model, loss_fn, x)
    state = monitor.state_dict()
    collect(monitor, model, loss_fn, x)
    expected = monitor.estimates().fisher("I1")
    monitor.load_state_dict(state)
    collect(monitor, model, loss_fn, x)
    for name, value in monitor.estimates().fisher("I1").items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    monitor.remove()
    other = fimhooks.FisherMonitor(model, loss_fn, ema_decay=0.5)
    with pytest.raises(ValueError, match="options"):
        other.load_state_dict(state)


def test_a_resumed_monitor_continues_exactly_in_a_new_process():
    """A fresh monitor (as after a restart) restores counts the preconditioner reads."""
    loss_fn, out, sigma = make_loss("gaussian")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn, sigma=sigma, ema_decay=0.8)
    collect(monitor, model, loss_fn, x)
    state = monitor.state_dict()
    collect(monitor, model, loss_fn, x)
    expected = monitor.estimates()
    monitor.remove()  # the process ends
    fresh = fimhooks.FisherMonitor(model, loss_fn, sigma=sigma, ema_decay=0.8)
    fresh.load_state_dict(state)
    assert fresh.collected_steps == 1
    collect(fresh, model, loss_fn, x)
    assert fresh.estimates().summary() == expected.summary()
    for name, value in fresh.estimates().fisher("I2").items():
        torch.testing.assert_close(value, expected.fisher("I2")[name], rtol=0, atol=0)


def test_resuming_into_another_noise_level_or_model_is_refused():
    loss_fn, out, sigma = make_loss("gaussian")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn, sigma=sigma)
    collect(monitor, model, loss_fn, x)
    state = monitor.state_dict()
    monitor.remove()
    with pytest.raises(ValueError, match="'sigma': 0.7.*'sigma': 2.0"):
        fimhooks.FisherMonitor(model, loss_fn, sigma=2.0).load_state_dict(state)
    wider = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, out))
    with pytest.raises(ValueError, match=r"other parameters; they differ at \['0.bias', "):
        fimhooks.FisherMonitor(wider.double(), loss_fn, sigma=sigma).load_state_dict(state)


def saved_state():
    """A categorical MLP, its loss and the state of a removed monitor after one step."""
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn)
    collect(monitor, model, loss_fn, x)
    monitor.remove()
    return model, loss_fn, monitor.state_dict()


def test_a_sampler_state_of_a_missing_device_is_reported():
    model, loss_fn, state = saved_state()
    state["generators"]["cuda:0"] = state["generators"]["cpu"]  # as saved on a GPU machine
    if torch.cuda.is_available():
        pytest.skip("this machine has the device")
    with pytest.warns(RuntimeWarning, match="sampler of device cuda:0"):
        fimhooks.FisherMonitor(model, loss_fn).load_state_dict(state)


def test_a_second_monitor_on_a_watched_model_is_refused():
    loss_fn, out, _ = make_loss("categorical")
    model = make_model("tanh_mlp", out)
    first = fimhooks.FisherMonitor(model, loss_fn)
    with pytest.raises(ValueError, match="already watched by a FisherMonitor; call remove"):
        fimhooks.FisherMonitor(model, "categorical")
    first.remove()
    fimhooks.FisherMonitor(model, "categorical").remove()


def test_ema_steps_of_one_input_have_no_sample_variance():
    """Never a data variance of exactly zero from a step that cannot have one."""
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    beta = 0.8
    ema = fimhooks.FisherMonitor(model, loss_fn, ema_decay=beta)
    collect(ema, model, loss_fn, x[:1])
    assert all(v.isnan().all() for v in ema.estimates().data_variance().values())
    collect(ema, model, loss_fn, x)
    ema.remove()
    plain = fimhooks.FisherMonitor(model, loss_fn)
    collect(plain, model, loss_fn, x)
    weights = [(1 - beta) * beta ** (2 - t) / (1 - beta**2) for t in (1, 2)]
    scale = sum(w * w for w in weights)  # Σ_t w_t², the second step standing in for the first
    for name, value in ema.estimates().data_variance().items():
        expected = scale * plain.estimates().data_variance()[name]
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)


def test_a_parameter_frozen_mid_run_keeps_its_own_count_in_the_guidance():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn)
    collect(monitor, model, loss_fn, x)
    model[0].bias.requires_grad_(False)
    collect(monitor, model, loss_fn, x)
    collect(monitor, model, loss_fn, x)
    est = monitor.estimates()
    weight, bias = est.accumulators()["0.weight"], est.accumulators()["0.bias"]
    assert (weight.num_inputs, bias.num_inputs) == (3 * len(x), len(x))
    stats = est.layer_statistics()["0"]["exact"]
    per_input = sum(
        (acc.label_variance("exact") + acc.sample_variance("exact")).sum().item() * acc.num_inputs
        for acc in (weight, bias)
    )
    sq_norm = sum((acc.fisher("exact") ** 2).sum().item() for acc in (weight, bias))
    assert math.isclose(stats["inputs_needed"], per_input / (0.05**2 * sq_norm), rel_tol=1e-9)


@pytest.mark.parametrize("split", ["two passes", "chunks of inputs"])
def test_ema_of_a_step_in_parts_is_that_of_the_step_in_one_pass(split):
    """A block's rank-one sums in several parts (passes, or chunks under a memory budget)
    add up before the EMA step instead of the last part replacing the others."""
    loss_fn, out, _ = make_loss("categorical")
    x = make_input("deep_tanh_mlp")
    results = []
    for parts in (1, 2):
        model = make_model("deep_tanh_mlp", out)
        budget = {"max_memory": 1} if split == "chunks of inputs" and parts == 2 else {}
        monitor = fimhooks.FisherMonitor(model, loss_fn, ema_decay=0.5, **budget)
        passes = parts if split == "two passes" else 1
        with monitor:
            for rows in x.chunk(passes):
                out_ = model(rows)
                loss_fn(out_, make_target(loss_fn, out_)).backward()
        results.append(monitor.estimates())
        monitor.remove()
    for name, value in results[0].fisher("exact").items():
        torch.testing.assert_close(results[1].fisher("exact")[name], value, rtol=1e-10, atol=0)
    for name, value in results[0].variance("I1").items():
        torch.testing.assert_close(results[1].variance("I1")[name], value, rtol=1e-10, atol=0)


def test_a_damaged_state_is_refused_up_front_naming_the_key():
    model, loss_fn, state = saved_state()
    fresh = fimhooks.FisherMonitor(model, loss_fn)

    def damaged(change):
        copied = copy.deepcopy(state)
        change(copied)
        return copied

    cases = [
        (lambda s: s.pop("generators"), r"has no \['generators'\]"),
        (
            lambda s: s["accumulators"].__setitem__("0.ghost", s["accumulators"]["0.bias"]),
            "parameter '0.ghost', which is not among its parameters",
        ),
        (lambda s: s["accumulators"]["0.bias"].pop("stats"), r"\['0.bias'\] has no \['stats'\]"),
        (
            lambda s: s["accumulators"]["0.bias"]["stats"].update(
                {k: v[:1] for k, v in s["accumulators"]["0.bias"]["stats"].items()}
            ),
            r"\['0.bias'\]\['stats'\]\['.*'\] has shape \(1,\); parameter '0.bias' has shape \(4,\)",
        ),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            fresh.load_state_dict(damaged(change))
    assert fresh.collected_steps == 0  # nothing was restored
    fresh.load_state_dict(state)
    assert fresh.collected_steps == 1


def test_estimates_are_in_model_order_with_their_layers_public():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn)
    collect(monitor, model, loss_fn, x)
    monitor.remove()
    est = monitor.estimates()
    names = [name for name, _ in model.named_parameters()]
    assert list(est.fisher("exact")) == names == list(est.accumulators())
    assert est.layers == {name: name.rsplit(".", 1)[0] for name in names}
    assert all(est.layer_of(name) == layer for name, layer in est.layers.items())
    assert list(est.layer_statistics()) == list(dict.fromkeys(est.layers.values()))


@pytest.mark.parametrize("ema_decay", [None, 0.7], ids=["cumulative", "ema"])
def test_an_accumulator_restores_from_its_state_and_moves_exactly(ema_decay):
    """The saved layout is a flat ``{key: tensor}`` (that of earlier checkpoints)."""
    generator = torch.Generator().manual_seed(2)
    batches = [(random_sums(generator, n), n) for n in (3, 1, 5)]
    acc = RunningDiagonal(ema_decay, 2)
    for sums, n in batches:
        acc.update(sums, n)
    state = acc.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state["stats"].values())
    if ema_decay is not None:
        assert {"mean_I1", "var_I1", "labelvar_v1", "varweight"} <= set(state["stats"])
    restored = RunningDiagonal.from_state_dict(state).to("cpu")
    assert type(restored) is type(acc)
    restored.update(*batches[0])
    acc.update(*batches[0])
    for get in ("fisher", "label_variance", "sample_variance"):
        torch.testing.assert_close(getattr(restored, get)("I1"), getattr(acc, get)("I1"))
    assert restored.effective_inputs() == acc.effective_inputs()


@pytest.mark.parametrize("draws", [1, 3])
def test_sampled_square_sums_are_the_term_by_term_batch_sums(draws):
    # the column-block path of the sampled residuals gives the numbers of the general one
    from fimhooks.fisher.diagonal_terms import (
        COLUMN_BLOCK,
        batch_sums,
        direction_sums,
        finish_terms,
        sampled_square_sums,
    )

    U = torch.randn(draws, 5, 3, COLUMN_BLOCK + 7, dtype=torch.float64)  # a ragged last block
    wanted = {"I1", "v1"} if draws > 1 else {"I1"}
    terms = finish_terms(direction_sums(U, None, None, None, None, wanted), 0.0, wanted, draws)
    expected = batch_sums(terms).sums
    fused = sampled_square_sums(U, wanted)
    assert fused.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(fused[key], value)
