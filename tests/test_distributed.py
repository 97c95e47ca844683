"""Several processes (torch.distributed, gloo on CPU) against one process on all their inputs.

Each world size is spawned once; every rank runs all scenarios and reports numbers, which
the tests below check. Ranks hold uneven (sometimes empty) slices of each step's batch.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue as queue_module
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import make_input, make_loss, make_model, make_target
from graphs import inputs as graph_inputs
from graphs import make as make_graph
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fimhooks
from fimhooks import distributed
from fimhooks.optim import FisherPreconditioner

TIMEOUT_S = 120  # the whole spawn; a hang fails the test instead of blocking CI
STEPS = 3

#: Rows of each step's batch held by each rank (world size -> steps x ranks); 0: none.
SPLITS = {2: [(7, 5), (3, 9), (0, 6)], 3: [(5, 4, 3), (0, 6, 6), (4, 0, 1)]}


#: (name, model builder, input builder, wrap in DDP)
def _wide_tanh_mlp():
    """Wide enough that products are sent as their factors (fewer numbers than dense)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3)
    ).double()


MODELS = [
    ("wide_tanh_mlp", _wide_tanh_mlp, lambda n: make_input("tanh_mlp", n), 0),
    ("tanh_mlp_ddp", lambda: make_model("tanh_mlp", 3), lambda n: make_input("tanh_mlp", n), 1),
    ("relu_mlp", lambda: make_model("relu_mlp", 3), lambda n: make_input("relu_mlp", n), 0),
    ("relu_residual", lambda: make_graph("relu_residual", 3), lambda n: graph_inputs("x", n), 1),
]


def _slices(world_size: int, step: int):
    sizes = SPLITS[world_size][step]
    starts = [sum(sizes[:r]) for r in range(world_size)]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


def _backward(monitor, model, x):
    """One step; ``monitor=None``: without a monitor. Summed loss: a rank may hold none."""
    loss_fn = make_loss("categorical", "sum")[0]
    model.zero_grad()
    out = model(x)
    with monitor if monitor is not None else contextlib.nullcontext():
        loss_fn(out, make_target(loss_fn, out)).backward()


def _deterministic(est) -> dict:
    """Every statistic that does not depend on the sampled labels, by name."""
    values = {"num_inputs": torch.tensor(float(est.num_inputs))}
    for key, diag in [
        ("exact", est.fisher("exact")),
        ("var_I1", est.variance("I1")),
        ("var_I2", est.variance("I2")),
        ("data_variance", est.data_variance()),
        ("empirical_exact", est.empirical_variance("exact")),
    ]:
        values.update({f"{key}/{n}": v for n, v in diag.items()})
    return values


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(((a[k] - b[k]).abs().max() / (1 + b[k].abs().max())).item() for k in a)


def _statistics(rank: int, world_size: int, models=MODELS) -> dict:
    """Deterministic statistics against one process; sampled ones identical on all ranks."""
    results = {}
    for name, build, make_x, wrap in models:
        for ema in (None, 0.7):
            model = build()
            reference = fimhooks.FisherMonitor(
                copy.deepcopy(model), "categorical", ema_decay=ema, sync=False
            )
            watched = DistributedDataParallel(model) if wrap else model
            monitor = fimhooks.FisherMonitor(watched, "categorical", ema_decay=ema, seed=3)
            x = make_x(12)
            for step in range(STEPS):
                part = _slices(world_size, step)
                batch = x[part[0].start : part[-1].stop]
                _backward(monitor, watched, batch[part[rank]])
                _backward(reference, reference.model, batch)
            est = monitor.estimates()
            key = f"{name}/ema={ema}"
            results[key] = _max_difference(
                _deterministic(est), _deterministic(reference.estimates())
            )
            sampled = torch.cat([v.flatten() for v in est.fisher("I1").values()])
            gathered = [None] * world_size
            dist.all_gather_object(gathered, sampled)
            results[key + "/I1 same on all ranks"] = all(torch.equal(g, sampled) for g in gathered)
            results[key + "/I1 finite"] = bool(torch.isfinite(sampled).all())
            factors = monitor.reducer.layout.factors
            results[key + "/factors"] = sorted(name for name, sent in factors.items() if sent)
            results[key + "/gathered"] = monitor.reducer.layout.gather
            monitor.remove()
    return results


def _summed_factors(rank: int, world_size: int) -> dict:
    """Factors in each rank's slot of a summed buffer: the collective where dense sums
    dominate (with three ranks or more), here chosen for the wide MLP."""
    from fimhooks.distributed import Layout

    traffic = Layout.traffic
    Layout.traffic = lambda layout: float(layout.gather)  # prefer the sum
    try:
        results = _statistics(rank, world_size, MODELS[:1])
    finally:
        Layout.traffic = traffic
    return {f"summed {key}": value for key, value in results.items()}


def _draws(rank: int, world_size: int) -> dict:
    """Rank-local label draws: reproducible from the seed, independent across ranks."""
    x = make_input("tanh_mlp", 6)
    draws = []
    for _ in range(2):
        model = make_model("tanh_mlp", 3)
        monitor = fimhooks.FisherMonitor(model, "categorical", sync=False, seed=5)
        _backward(monitor, model, x)
        draws.append(torch.cat([v.flatten() for v in monitor.estimates().fisher("I1").values()]))
    gathered = [None] * world_size
    dist.all_gather_object(gathered, draws[0])
    others = [g for r, g in enumerate(gathered) if r != rank]
    return {
        "reproducible": torch.equal(draws[0], draws[1]),
        "independent": not any(torch.equal(g, draws[0]) for g in others),
    }


def _gradients(rank: int, world_size: int) -> dict:
    """p.grad as plain DDP's; preconditioned gradients identical on every rank."""
    results = {"grad as plain DDP": True}
    x = make_input("tanh_mlp", 12)[_slices(world_size, 0)[rank]]
    builds = {"chain": MODELS[1][1], "general": MODELS[-1][1]}  # tanh MLP, ReLU residual
    for path, structure in (("chain", "diag"), ("chain", "kfac"), ("general", "diag")):
        plain = DistributedDataParallel(builds[path]())
        _backward(None, plain, x)
        model = DistributedDataParallel(builds[path]())
        monitor = fimhooks.FisherMonitor(model, "categorical")
        precondition = FisherPreconditioner(monitor, structure=structure, damping=0.1)
        _backward(monitor, model, x)
        results["grad as plain DDP"] &= all(
            torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), plain.parameters())
        )
        precondition.step()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        gathered = [None] * world_size
        dist.all_gather_object(gathered, grads)
        key = f"{path} {structure}"
        results[f"{key} identical"] = all(torch.equal(g, grads) for g in gathered)
        results[f"{key} changed"] = not torch.equal(
            grads, torch.cat([p.grad.flatten() for p in plain.parameters()])
        )
        monitor.remove()
    return results


def _kronecker(rank: int, world_size: int) -> dict:
    """Kronecker factors of all ranks' inputs, as one process's."""
    model = make_model("tanh_mlp", 3)
    reference = fimhooks.FisherMonitor(copy.deepcopy(model), "categorical", sync=False)
    wrapped = DistributedDataParallel(model)
    monitor = fimhooks.FisherMonitor(wrapped, "categorical")
    monitor.collect_kronecker_factors()
    reference.collect_kronecker_factors()
    x = make_input("tanh_mlp", 12)
    _backward(monitor, wrapped, x[_slices(world_size, 0)[rank]])
    _backward(reference, reference.model, x)
    ours = monitor.estimates().kronecker_factors("exact")
    theirs = reference.estimates().kronecker_factors("exact")
    flat = lambda f: {f"{k}/{i}": t for k, pair in f.items() for i, t in enumerate(pair)}  # noqa
    monitor.remove()
    return {"kronecker": _max_difference(flat(ours), flat(theirs))}


def _state_dict(rank: int, world_size: int, directory: str) -> dict:
    """Rank 0's state_dict restores every rank; rank 0 alone writes the log."""
    x = make_input("tanh_mlp", 12)
    model = make_model("tanh_mlp", 3)
    copied = copy.deepcopy(model)
    wrapped = DistributedDataParallel(model)
    monitor = fimhooks.FisherMonitor(wrapped, "categorical", seed=7)
    log = monitor.log_to(os.path.join(directory, f"log{rank}.jsonl"))
    _backward(monitor, wrapped, x[_slices(world_size, 0)[rank]])
    saved = [monitor.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(saved, src=0)
    restored = fimhooks.FisherMonitor(copied, "categorical", seed=7)
    restored.load_state_dict(saved[0])
    for m, net in ((monitor, wrapped), (restored, copied)):
        _backward(m, net, x[_slices(world_size, 1)[rank]])
    log.close()
    a, b = monitor.estimates(), restored.estimates()
    same = all(
        torch.equal(a.fisher(e)[n], b.fisher(e)[n]) for e in ("I1", "I2") for n in a.fisher(e)
    )
    dist.barrier()
    written = sorted(f for f in os.listdir(directory) if f.startswith("log"))
    monitor.remove()
    restored.remove()
    return {"restored": same, "logs": written}


def _sharded(rank: int, world_size: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = make_model("tanh_mlp", 3)
    fully_shard(model)
    try:
        fimhooks.FisherMonitor(model, "categorical")
    except ValueError as error:
        return {"sharded": str(error)}
    return {"sharded": None}


def _failure(rank: int, world_size: int) -> dict:
    """The last rank raises inside its block: the others fail with a clear error."""
    model = make_model("tanh_mlp", 3)
    monitor = fimhooks.FisherMonitor(model, "categorical")
    x = make_input("tanh_mlp", 4)
    try:
        with monitor:
            model(x).sum().backward()
            if rank == world_size - 1:
                raise KeyError("bad batch")
    except KeyError:
        return {"failure": "raised itself"}
    except RuntimeError as error:
        return {"failure": str(error)}
    return {"failure": None}


def _alone(rank: int, world_size: int) -> dict:
    """Rank 0 alone builds a monitor: it fails within the timeout, naming the others."""
    if rank != 0:
        return {}
    distributed.PRESENCE_TIMEOUT_S = 1.0
    start = time.monotonic()
    try:
        fimhooks.FisherMonitor(make_model("tanh_mlp", 3), "categorical")
    except RuntimeError as error:
        return {"alone": (str(error), time.monotonic() - start)}
    return {"alone": ("no error", time.monotonic() - start)}


def _worker(rank: int, world_size: int, init_file: str, directory: str, queue) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),
        )
        results = {}
        results.update(_statistics(rank, world_size))
        results.update(_summed_factors(rank, world_size))
        results.update(_draws(rank, world_size))
        results.update(_gradients(rank, world_size))
        results.update(_kronecker(rank, world_size))
        results.update(_state_dict(rank, world_size, directory))
        results.update(_sharded(rank, world_size))
        results.update(_failure(rank, world_size))
        results.update(_alone(rank, world_size))  # last: the ranks' monitors part ways
        queue.put((rank, results))
        dist.destroy_process_group()
    except BaseException:  # reported to the parent, which fails the test with it
        queue.put((rank, traceback.format_exc()))


def _spawn(world_size: int) -> list:
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as directory:
        init_file = os.path.join(directory, "init")
        logs = os.path.join(directory, "logs")
        os.mkdir(logs)
        processes = [
            context.Process(target=_worker, args=(r, world_size, init_file, logs, queue))
            for r in range(world_size)
        ]
        for p in processes:
            p.start()
        results, deadline = {}, time.monotonic() + TIMEOUT_S
        try:
            while len(results) < world_size and time.monotonic() < deadline:
                try:
                    rank, result = queue.get(timeout=1)
                    results[rank] = result
                except queue_module.Empty:
                    if not any(p.is_alive() for p in processes) and queue.empty():
                        break
            if len(results) < world_size:
                pytest.fail(
                    f"ranks {sorted(set(range(world_size)) - set(results))} did not report "
                    f"within {TIMEOUT_S} s (hung or died)."
                )
        finally:
            for p in processes:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    for rank, result in results.items():
        if isinstance(result, str):
            pytest.fail(f"rank {rank} raised:\n{result}")
    return [results[r] for r in range(world_size)]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}procs")
def ranks(request):
    return _spawn(request.param)


def test_every_deterministic_statistic_is_that_of_one_process_on_all_inputs(ranks):
    for results in ranks:
        for name, _, _, _ in MODELS:
            for ema in (None, 0.7):
                assert results[f"{name}/ema={ema}"] < 1e-10, (name, ema)
                if name == "wide_tanh_mlp":  # its factors gathered, and summed in slots
                    assert results[f"{name}/ema={ema}/gathered"]
                    assert not results[f"summed {name}/ema={ema}/gathered"]
                    assert results[f"summed {name}/ema={ema}/factors"]
                    assert results[f"summed {name}/ema={ema}"] < 1e-10, (name, ema)


def test_wide_layers_send_factors_and_small_ones_dense_sums(ranks):
    """Exactness of both is checked by the statistics test above."""
    for results in ranks:
        for ema in (None, 0.7):
            assert "2.weight" in results[f"wide_tanh_mlp/ema={ema}/factors"]
            assert results[f"tanh_mlp_ddp/ema={ema}/factors"] == []


def test_sampled_estimates_are_identical_on_every_rank(ranks):
    for results in ranks:
        for key, value in results.items():
            if key.endswith("I1 same on all ranks") or key.endswith("I1 finite"):
                assert value is True, key


def test_label_draws_are_reproducible_and_independent_across_ranks(ranks):
    for results in ranks:
        assert results["reproducible"] and results["independent"]


def test_gradients_are_plain_ddp_and_preconditioned_identically_on_every_rank(ranks):
    for results in ranks:
        assert results["grad as plain DDP"]
        for key in ("chain diag", "chain kfac", "general diag"):
            assert results[f"{key} identical"] and results[f"{key} changed"], key


def test_kronecker_factors_are_those_of_one_process(ranks):
    for results in ranks:
        assert results["kronecker"] < 1e-10


def test_rank_zero_state_dict_restores_every_rank_and_rank_zero_alone_logs(ranks):
    for results in ranks:
        assert results["restored"]
        assert results["logs"] == ["log0.jsonl"]


def test_sharded_wrappers_are_refused_naming_ddp(ranks):
    for results in ranks:
        assert "DistributedDataParallel" in results["sharded"]


def test_a_rank_raising_inside_the_block_fails_the_others_clearly(ranks):
    last = len(ranks) - 1
    assert ranks[last]["failure"] == "raised itself"
    for results in ranks[:last]:
        assert f"rank(s) [{last}]" in results["failure"]


def test_a_rank_that_builds_no_monitor_is_named_within_the_timeout(ranks):
    message, seconds = ranks[0]["alone"]
    others = list(range(1, len(ranks)))
    assert f"ranks {others} built no FisherMonitor" in message and seconds < 10
