"""Faults injected into collected steps: nothing collected before a fault is lost.

Each test collects a first step, injects a fault into a second one, checks that the
estimates are those of the first step, and that a third step collects normally.
"""

import pytest
import torch
from cases import make_input, make_loss, make_model, make_target
from torch import nn

import fimhooks


def step(monitor, model, loss_fn, x):
    output = model(x)
    with monitor:
        loss_fn(output, make_target(loss_fn, output)).backward()
    model.zero_grad()


def setup(name="tanh_mlp"):
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model(name, out), make_input(name)
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=("I1", "exact"))
    step(monitor, model, loss_fn, x)
    return monitor, model, loss_fn, x, monitor.estimates()


def assert_unchanged_then_collects(monitor, model, loss_fn, x, before):
    after = monitor.estimates()
    assert after.num_inputs == before.num_inputs and monitor.collected_steps == 1
    for name, value in after.fisher("exact").items():
        assert torch.equal(value, before.fisher("exact")[name])
    for module in model.modules():
        assert not {"input0", "output"} & set(vars(module))
    step(monitor, model, loss_fn, x)
    assert monitor.estimates().num_inputs == 2 * len(x)


def test_keyboard_interrupt_in_the_middle_of_the_backward_pass():
    monitor, model, loss_fn, x, before = setup()

    def interrupt(grad):
        raise KeyboardInterrupt

    handle = model[1].register_forward_hook(lambda m, i, o: o.register_hook(interrupt) and None)
    output = model(x)
    with pytest.raises(KeyboardInterrupt):
        with monitor:
            loss_fn(output, make_target(loss_fn, output)).backward()
    handle.remove()
    assert_unchanged_then_collects(monitor, model, loss_fn, x, before)


def test_an_exception_inside_the_monitors_own_work():
    """A layer the generic rule cannot replay (its forward refuses a batch of one)."""

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

        def forward(self, h):
            if len(h) < 2:
                raise RuntimeError("Gate needs two inputs at least")
            return h * self.scale

    monitor, model, loss_fn, x, before = setup()
    monitor.remove()
    model.append(Gate())
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=("I1", "exact"))
    output = model(x)
    with pytest.raises(RuntimeError):
        with monitor:
            loss_fn(output, make_target(loss_fn, output)).backward()
    assert monitor.collected_steps == 0 and not monitor.held_forward_passes
    model.pop(-1)  # without the faulty layer the same monitor collects again
    step(monitor, model, loss_fn, x)
    assert monitor.estimates().num_inputs == len(x)


def test_a_forward_pass_that_raises_leaves_no_half_record():
    monitor, model, loss_fn, x, before = setup()
    boom = model[1].register_forward_hook(lambda *_: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        model(x)
    boom.remove()
    assert not monitor.held_forward_passes  # the cut-short forward pass is not held
    model(x)
    assert monitor.held_forward_passes == 1
    assert_unchanged_then_collects(monitor, model, loss_fn, x, before)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_batches(value):
    loss_fn, out, _ = make_loss("bernoulli")
    model, x = make_model("sigmoid_mlp", out), make_input("sigmoid_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=("I1", "exact"))
    step(monitor, model, loss_fn, x)
    before = monitor.estimates()
    bad = x.clone()
    bad[0] = value
    with pytest.warns(RuntimeWarning, match="non-finite"):
        step(monitor, model, loss_fn, bad)
    assert monitor.estimates().skipped == 1
    assert_unchanged_then_collects(monitor, model, loss_fn, x, before)


def test_a_statistic_that_overflows_skips_the_batch():
    """Finite outputs, but an input's fourth power (the variances' factor) overflows float32."""
    loss_fn, out, _ = make_loss("bernoulli")
    model, x = make_model("sigmoid_mlp", out).float(), make_input("sigmoid_mlp").float()
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=("I1", "exact"))
    step(monitor, model, loss_fn, x)
    before = monitor.estimates()
    bad = x.clone()
    bad[0, 0] = 1e12
    assert torch.isfinite(model(bad)).all()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        step(monitor, model, loss_fn, bad)
    assert monitor.estimates().skipped == 1
    assert_unchanged_then_collects(monitor, model, loss_fn, x, before)
