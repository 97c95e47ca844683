"""The user's training is untouched: gradients, optimizer steps, hooks, memory, options."""

import copy
import gc
import io
import warnings

import pytest
import torch
from cases import make_input, make_loss, make_model, make_target

import fimhooks
from fimhooks.fisher.running import FOLD_EVERY


def gradients(model, loss_fn, x, monitor=None):
    model.zero_grad()
    output = model(x)
    loss = loss_fn(output, make_target(loss_fn, output))
    if monitor is None:
        loss.backward()
    else:
        with monitor:
            loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
@pytest.mark.parametrize("model_name", ["tanh_mlp", "cnn"])
def test_gradients_unchanged_and_nothing_left_behind(model_name, likelihood):
    loss_fn, out, sigma = make_loss(likelihood, reduction="sum")
    model, x = make_model(model_name, out), make_input(model_name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = gradients(model, loss_fn, x)
    monitor = fimhooks.FisherMonitor(model, loss_fn, sigma=sigma, mc_samples=2)
    monitored = gradients(model, loss_fn, x, monitor)
    for name, grad in plain.items():
        torch.testing.assert_close(monitored[name], grad, rtol=1e-10, atol=0)
    for p in model.parameters():
        assert not [a for a in vars(p) if a.startswith("_fimhooks")]
    monitor.remove()
    for module in list(model.modules()) + [loss_fn]:
        assert not module._forward_hooks and not module._backward_hooks
        assert not any(a == "output" or a.startswith("input") for a in vars(module))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])


def test_optimizer_step_unchanged_and_random_stream_untouched():
    loss_fn, out, _ = make_loss("categorical")
    x = make_input("tanh_mlp")
    results = []
    for attach in (False, True):
        model = make_model("tanh_mlp", out)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        monitor = fimhooks.FisherMonitor(model, loss_fn) if attach else None
        torch.manual_seed(5)
        for _ in range(3):
            gradients(model, loss_fn, x, monitor)
            optimizer.step()
        results.append(([p.detach().clone() for p in model.parameters()], torch.rand(3)))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert torch.equal(results[0][1], results[1][1])


def test_inplace_activations_are_handled_and_restored():
    loss_fn, out, _ = make_loss("categorical")
    x = make_input("relu_mlp")
    model = make_model("relu_mlp", out)
    reference = fimhooks.estimate(model, loss_fn, x, progress=False)
    model[1].inplace = True
    monitor = fimhooks.FisherMonitor(model, loss_fn)
    gradients(model, loss_fn, x, monitor)
    for name, value in monitor.estimates().fisher("exact").items():
        torch.testing.assert_close(value, reference.fisher("exact")[name], rtol=1e-12, atol=0)
    monitor.remove()
    assert model[1].inplace is True


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc.get_objects touches deprecated names
def test_no_memory_accumulates_across_steps():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("sigmoid_mlp", out), make_input("sigmoid_mlp", n=16)
    monitor = fimhooks.FisherMonitor(model, loss_fn, every=2)
    cycle = 2 * FOLD_EVERY  # passes between two folds of the staged statistics

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    for _ in range(cycle):
        gradients(model, loss_fn, x, monitor)
    baseline = live_tensors()
    for _ in range(3 * cycle):
        gradients(model, loss_fn, x, monitor)
    assert live_tensors() == baseline
    assert not monitor.held_forward_passes  # nothing of a finished step is kept
    assert monitor.estimates().num_inputs == 4 * FOLD_EVERY * 16


def test_every_collects_every_kth_pass_only():
    loss_fn, out, _ = make_loss("gaussian")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn, every=3)
    for _ in range(7):
        gradients(model, loss_fn, x, monitor)
    assert monitor.estimates().num_inputs == 3 * len(x)  # passes 0, 3 and 6


def test_non_finite_batch_is_skipped_counted_and_warned_once():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn)
    gradients(model, loss_fn, x, monitor)
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        gradients(model, loss_fn, bad, monitor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradients(model, loss_fn, bad, monitor)
    est = monitor.estimates()
    assert est.skipped == 2 and est.num_inputs == len(x)
    assert all(torch.isfinite(v).all() for v in est.fisher("I2").values())


def test_float32_model_accumulates_in_float64():
    loss_fn, out, _ = make_loss("categorical")
    model64, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    model32 = make_model("tanh_mlp", out).float()
    est64 = fimhooks.estimate(model64, loss_fn, x, progress=False)
    est32 = fimhooks.estimate(model32, loss_fn, x.float(), progress=False)
    for name, value in est32.fisher("exact").items():
        assert value.dtype == torch.float64
        torch.testing.assert_close(value, est64.fisher("exact")[name], rtol=1e-5, atol=1e-7)


def test_estimate_accepts_batches_and_restores_gradients():
    loss_fn, out, _ = make_loss("bernoulli")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp", n=6)
    y = make_target(loss_fn, model(x))
    grad = torch.ones_like(model[0].weight)
    model[0].weight.grad = grad
    one = fimhooks.estimate(model, loss_fn, (x, y), progress=False)
    many = fimhooks.estimate(model, loss_fn, [x[:3], (x[3:], y[3:])], progress=False)
    assert model[0].weight.grad is grad and model[2].weight.grad is None
    for name, value in one.fisher("exact").items():
        torch.testing.assert_close(value, many.fisher("exact")[name], rtol=1e-10, atol=0)
    assert not model[0]._forward_hooks


def test_i1_only_is_cheaper_and_says_what_it_lacks():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    est = fimhooks.estimate(model, loss_fn, x, estimators=("I1",), progress=False)
    assert set(est.fisher("I1")) == {n for n, _ in model.named_parameters()}
    est.empirical_variance("I1")
    with pytest.raises(ValueError, match="exact pass"):
        est.variance("I1")
    with pytest.raises(ValueError, match="not collected"):
        est.fisher("exact")
    assert "tr I1" in est.summary()


def test_summary_reports_every_layer():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("cnn", out), make_input("cnn")
    text = fimhooks.estimate(model, loss_fn, x, progress=False).summary()
    assert "0 " in text and "4 " in text and "zero v2" in text and "10/10" not in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_statistics_live_on_the_device():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("cnn", out).cuda(), make_input("cnn").cuda()
    est = fimhooks.estimate(model, loss_fn, x, progress=False)
    cpu = fimhooks.estimate(model.cpu(), loss_fn, x.cpu(), progress=False)
    for name, value in est.fisher("exact").items():
        assert value.is_cuda
        torch.testing.assert_close(value.cpu(), cpu.fisher("exact")[name], rtol=1e-8, atol=0)


def test_forward_inside_the_block_and_no_hooks_on_skipped_steps():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn, every=2)
    for _ in range(4):
        hooked = bool(model[0]._forward_hooks)
        with monitor:
            output = model(x)
            loss_fn(output, make_target(loss_fn, output)).backward()
        assert hooked == (monitor.backward_passes % 2 == 1)
    assert monitor.estimates().num_inputs == 2 * len(x)


def test_estimate_leaves_the_users_gradients_and_reads_batches_as_documented():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp", n=8)
    before = gradients(model, loss_fn, x)  # the user's own backward, gradients kept
    one = fimhooks.estimate(model, loss_fn, x, progress=False)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, before[name])
    halves = fimhooks.estimate(model, loss_fn, [x[:4], x[4:]], progress=False)  # two batches
    assert halves.num_inputs == one.num_inputs == 8

    class Keywords(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, inputs):
            return self.inner(inputs)

    as_dict = fimhooks.estimate(Keywords(), loss_fn, [{"inputs": x}], progress=False)
    assert as_dict.num_inputs == 8
    with pytest.raises(TypeError, match="a batch must be a tensor, a tuple"):
        fimhooks.estimate(model, loss_fn, [[1, 2]], progress=False)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_nan_inputs_skip_the_batch_without_losing_what_was_collected(likelihood):
    loss_fn, out, sigma = make_loss(likelihood)
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn, sigma=sigma)
    gradients(model, loss_fn, x, monitor)
    before = monitor.estimates().fisher("exact")
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite model output"):
        gradients(model, loss_fn, bad, monitor)
    est = monitor.estimates()
    assert est.skipped == 1 and est.num_inputs == len(x)
    for name, value in est.fisher("exact").items():
        assert torch.equal(value, before[name])


def test_copies_and_pickles_of_a_watched_model_carry_no_monitor():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn)
    early = copy.deepcopy(model)  # before the first step
    gradients(early, loss_fn, x)
    assert monitor.collected_steps == 0 and not monitor.held_forward_passes
    gradients(model, loss_fn, x, monitor)
    twin = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    gradients(twin, loss_fn, x)  # the copy trains on its own
    with pytest.warns(RuntimeWarning, match="nothing was collected"):
        with monitor:  # a backward of the copy inside the block is not the monitor's
            loss_fn(twin(x), make_target(loss_fn, twin(x))).backward()
    assert monitor.estimates().num_inputs == len(x) and monitor.collected_steps == 1
    for name, value in dict(twin.named_parameters()).items():
        assert torch.equal(value, dict(model.named_parameters())[name])


def test_remove_inside_the_block_stays_removed():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn)
    output = model(x)
    with monitor:
        loss_fn(output, make_target(loss_fn, output)).backward()
        monitor.remove()
    assert monitor.removed and monitor.collected_steps == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="log_to: this FisherMonitor was removed"):
        monitor.log_to(io.StringIO())
    with pytest.raises(RuntimeError, match="monitor was removed"):
        fimhooks.optim.FisherPreconditioner(monitor)


def test_batches_of_zero_or_one_input_and_a_change_of_precision():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn)
    log = monitor.log_to(io.StringIO())
    gradients(model, loss_fn, x[:1], monitor)  # one input: no sample variance yet
    assert monitor.estimates().layer_statistics()["0"]["I1"]["draws_suggested"] is None
    with pytest.warns(RuntimeWarning, match="nothing was collected"):
        with monitor:
            model(x[:0]).sum().backward()
    model.float()
    gradients(model, loss_fn, x.float(), monitor)
    model.to(torch.bfloat16)
    gradients(model, loss_fn, x.to(torch.bfloat16), monitor)
    model.double()
    gradients(model, loss_fn, x, monitor)
    log.close()
    assert monitor.estimates().num_inputs == 1 + 3 * len(x)


def test_layers_added_and_parameters_replaced_after_the_monitor_was_built():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn)
    gradients(model, loss_fn, x, monitor)
    model.load_state_dict({k: v + 0.1 for k, v in model.state_dict().items()}, assign=True)
    model.append(torch.nn.Tanh()).append(torch.nn.Linear(out, out).double())
    gradients(model, loss_fn, x, monitor)
    gradients(model, loss_fn, x, monitor)
    est = monitor.estimates()
    assert est.has("4.weight") and est.fisher("I1")["4.weight"].shape == (out, out)
    assert est.num_inputs == 3 * len(x)


def test_monitors_of_two_models_nest():
    loss_fn, out, _ = make_loss("categorical")
    a, b, x = make_model("tanh_mlp", out), make_model("relu_mlp", out), make_input("tanh_mlp")
    watch_a, watch_b = fimhooks.FisherMonitor(a, loss_fn), fimhooks.FisherMonitor(b, loss_fn)
    for xb in watch_a.progress([x[:1], x], disable=True):  # a first batch of one input
        out_a, out_b = a(xb), b(xb)
        with watch_a, watch_b:
            loss = loss_fn(out_a, make_target(loss_fn, out_a))
            (loss + loss_fn(out_b, make_target(loss_fn, out_b))).backward()
    assert watch_a.estimates().num_inputs == watch_b.estimates().num_inputs == len(x) + 1


def test_start_and_stop_count_every_backward_as_a_block():
    loss_fn, out, _ = make_loss("gaussian")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    with_blocks = fimhooks.FisherMonitor(model, loss_fn, every=2, seed=4)
    for _ in range(4):
        gradients(model, loss_fn, x, with_blocks)
    expected = with_blocks.estimates()
    with_blocks.remove()
    started = fimhooks.FisherMonitor(model, loss_fn, every=2, seed=4).start()
    for _ in range(4):
        gradients(model, loss_fn, x)  # a loop that knows nothing of the monitor
    started.stop()
    gradients(model, loss_fn, x)
    gradients(model, loss_fn, x)
    assert started.backward_passes == 4 and started.collected_steps == 2
    for name, value in started.estimates().fisher("I1").items():
        assert torch.equal(value, expected.fisher("I1")[name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_and_grad_scaler_agree_with_float32(dtype):
    """Statistics in float32 or better; the scaler's factor never reaches the estimates."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5)
    )  # float32, as mixed precision trains it
    x, y = torch.randn(64, 10), torch.randint(0, 5, (64,))

    def run(autocast, scaler=None):
        monitor = fimhooks.FisherMonitor(model, "categorical", estimators=("I1", "exact"), seed=0)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        with monitor:
            (loss if scaler is None else scaler.scale(loss)).backward()
        monitor.remove()
        model.zero_grad()
        return monitor.estimates()

    reference = run(False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for est in (run(True), run(True, scaler)):
        for name, value in est.fisher("exact").items():
            assert value.dtype == torch.float64
            trace, expected = value.sum(), reference.fisher("exact")[name].sum()
            assert abs(trace - expected) <= 0.05 * expected, name


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_model_gives_the_eager_numbers(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    ).double()
    x, y = torch.randn(8, 10, dtype=torch.float64), torch.randint(0, 3, (8,))
    eager = fimhooks.estimate(model, "categorical", x, progress=False, seed=0)
    compiled = torch.compile(model, backend=backend)
    monitor = fimhooks.FisherMonitor(compiled, "categorical", seed=0)
    with monitor:
        torch.nn.functional.cross_entropy(compiled(x), y).backward()
    monitor.remove()
    for name, value in monitor.estimates().fisher("exact").items():
        expected = eager.fisher("exact")[name.removeprefix("_orig_mod.")]
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
