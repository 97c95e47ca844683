"""Overhead of fimhooks relative to a plain training step, next to stock BackPACK routes.

A script, not a test. Each row runs in its own subprocess (so peak memory is its own) and
reports the median step time over ``--repeats`` steps, its ratio to a plain step timed in
the same process (alternating, on a copy of the model) and the peak memory above the plain
step's.

    python benchmarks/bench_overhead.py                    # CPU, batch 128, all models
    python benchmarks/bench_overhead.py --device cuda --batch 512

Rows (``fimhooks ...`` are ours; ``backpack ...`` compute the same numbers with stock
BackPACK extensions; ``torch.func`` computes per-sample gradients with ``vmap``):

    plain                    zero_grad + forward + backward + SGD step
    fimhooks I1              estimators=("I1",): Î₁ and its empirical variance
    fimhooks I1+exact        adds exact, closed-form v₁ and data variance
    fimhooks I1+I2+exact     adds Î₂ and v₂
    fimhooks not collected   a step inside `with monitor:` that is not collected
    backpack DiagGGNExact    the diagonal GGN alone (reference for I1+exact)
    backpack DiagGGNMC       its one-sample Monte-Carlo version
    backpack DiagHessian     the diagonal Hessian alone (reference for I2 on curved nets)
    backpack BatchGrad I1    per-sample gradients of the sampled-label loss, reduced
    backpack SqrtGGNExact    per-sample sqrt GGN, reduced to exact, v₁ and data variance
    backpack BatchDiagHessian per-sample diagonal Hessian of the sampled-label loss (Î₂)
    torch.func I1            vmap(grad) per-sample gradients of the sampled-label loss
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

ROWS = [
    "plain",
    "fimhooks I1",
    "fimhooks I1+exact",
    "fimhooks I1+I2+exact",
    "fimhooks not collected",
    "fimhooks I1 input",
    "fimhooks I1 batch",
    "sampled-label backward",
    "backpack DiagGGNExact",
    "backpack DiagGGNMC",
    "backpack DiagHessian",
    "backpack BatchGrad I1",
    "backpack SqrtGGNExact",
    "backpack BatchDiagHessian",
    "torch.func I1",
]
MODELS = ["mlp_relu", "mlp_tanh", "cnn", "mse_mlp", "resnet_gn", "resnet_bn", "transformer_lm"]
#: Run only when named (``--models gpt2_50k``): needs ``transformers``; T 256, V 50257.
EXTRA_MODELS = ["gpt2_50k"]
#: Models that are not chains of layers: BackPACK needs its graph converter for them.
BRANCHING = ("resnet_gn", "resnet_bn", "transformer_lm", "gpt2_50k")


class ResidualBlock(nn.Module):
    """Two 3×3 convolutions of 16 channels with normalisation and a skip connection."""

    def __init__(self, norm, relu):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(16, 16, 3, padding=1), norm(16)
        self.conv2, self.norm2 = nn.Conv2d(16, 16, 3, padding=1), norm(16)
        self.relu1, self.relu2 = relu(), relu()

    def forward(self, x):  # noqa: D102
        y = self.norm2(self.conv2(self.relu1(self.norm1(self.conv1(x)))))
        return self.relu2(x + y)


class ResNet(nn.Module):
    """ResNet-style CNN: stem, two residual blocks, global average pooling, 10 classes."""

    def __init__(self, norm, relu):
        super().__init__()
        self.stem, self.relu = nn.Conv2d(3, 16, 3, padding=1), relu()
        self.blocks = nn.Sequential(ResidualBlock(norm, relu), ResidualBlock(norm, relu))
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.head = nn.Linear(16, 10)

    def forward(self, x):  # noqa: D102
        return self.head(self.flatten(self.pool(self.blocks(self.relu(self.stem(x))))))


class _FunctionalReLU(nn.Module):
    def forward(self, x):  # noqa: D102
        return nn.functional.relu(x)


class PreNormBlock(nn.Module):
    """Pre-norm transformer block with causal attention computed functionally."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):  # noqa: D102
        n, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class LanguageModel(nn.Module):
    """2-layer pre-norm transformer language model: d 128, 4 heads, T 64, V 512."""

    def __init__(self, vocab=512, d=128, length=64, heads=4, layers=2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.blocks = nn.Sequential(*[PreNormBlock(d, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, tokens):  # noqa: D102
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)[None]
        return self.head(self.norm(self.blocks(x)))


class SequenceCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy over every position of ``[N, T, V]`` logits."""

    def forward(self, logits, target):  # noqa: D102
        return super().forward(logits.flatten(0, 1), target.flatten())


class Logits(nn.Module):
    """A Hugging Face language model returning its logits ``[N, T, V]``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):  # noqa: D102
        return self.model(tokens).logits


def make_problem(name: str, batch: int, device: str):
    """Model, loss, inputs and labels of a benchmark problem."""
    torch.manual_seed(0)
    if name == "gpt2_50k":  # Hugging Face GPT-2 from a config: 4 layers, d 256, V 50257
        import transformers

        config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=256)
        model, x = (
            Logits(transformers.GPT2LMHeadModel(config)),
            torch.randint(0, 50257, (batch, 256)),
        )
        return model.to(device), SequenceCrossEntropy(), x.to(device), x.to(device)
    if name == "transformer_lm":
        model, x = LanguageModel(), torch.randint(0, 512, (batch, 64))
        return model.to(device), SequenceCrossEntropy(), x.to(device), x.to(device)
    if name.startswith("resnet"):
        if name == "resnet_gn":
            model = ResNet(lambda c: nn.GroupNorm(4, c), _FunctionalReLU)
        else:
            model = ResNet(nn.BatchNorm2d, nn.ReLU).eval()
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        return model.to(device), nn.CrossEntropyLoss(), x.to(device), y.to(device)
    if name in ("mlp_relu", "mlp_tanh", "mse_mlp"):
        act = nn.Tanh if name == "mlp_tanh" else nn.ReLU
        out = 1 if name == "mse_mlp" else 10
        model = nn.Sequential(
            nn.Linear(784, 512), act(), nn.Linear(512, 512), act(), nn.Linear(512, out)
        )
        x = torch.randn(batch, 784)
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 10),
        )
        x = torch.randn(batch, 1, 28, 28)
    if name == "mse_mlp":
        loss_fn, y = nn.MSELoss(), torch.randn(batch, 1)
    else:
        loss_fn, y = nn.CrossEntropyLoss(), torch.randint(0, 10, (batch,))
    return model.to(device), loss_fn, x.to(device), y.to(device)


def sampled_labels(loss_fn, output):
    """Labels drawn from the model, as fimhooks draws them.

    ``torch.multinomial`` takes ~10 ms for one draw of 1024 × 512 probabilities on CPU,
    fimhooks' CDF inversion under 1 ms.
    """
    from fimhooks.fisher.likelihoods import categorical_labels

    with torch.no_grad():
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            probs = torch.softmax(output, -1).reshape(-1, output.shape[-1])
            return categorical_labels(probs, 1).reshape(output.shape[:-1])
        return output + torch.randn_like(output)


def make_step(row: str, model, loss_fn, x, y, model_name: str = ""):
    """A closure running one training step with the row's extra work."""
    from backpack import backpack, extend
    from backpack.extensions import (
        BatchDiagHessian,
        BatchGrad,
        DiagGGNExact,
        DiagGGNMC,
        DiagHessian,
        SqrtGGNExact,
    )

    import fimhooks

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    params = list(model.parameters())

    def plain_step(context=None, extra=None, loss_of=None):
        optimizer.zero_grad()
        output = model(x)
        loss = (loss_of or loss_fn)(output, y) if loss_of is None else loss_of(output)
        if context is None:
            loss.backward()
        else:
            with context:
                loss.backward()
        if extra is not None:
            extra(output)
        optimizer.step()

    if row == "plain":
        return plain_step
    if row.startswith("fimhooks"):
        estimators = {
            "fimhooks I1+exact": ("I1", "exact"),
            "fimhooks I1+I2+exact": ("I1", "I2", "exact"),
        }.get(row, ("I1",))
        if model_name in BRANCHING:  # Î₂ there needs curvature fimhooks does not follow
            estimators = tuple(e for e in estimators if e != "I2")
        every = 10**9 if row == "fimhooks not collected" else 1
        granularity = {"fimhooks I1 input": "input", "fimhooks I1 batch": "batch"}.get(row)
        likelihood = "categorical" if isinstance(loss_fn, nn.CrossEntropyLoss) else "gaussian"
        monitor = fimhooks.FisherMonitor(
            model, likelihood, estimators=estimators, every=every,
            granularity=granularity or "token",
        )  # fmt: skip
        plain_step(monitor)  # the first step is collected; later ones are not
        return lambda: plain_step(monitor)
    if row == "sampled-label backward":  # granularity "batch"'s limit: one more backward
        sum_loss = type(loss_fn)(reduction="sum")

        def step():
            optimizer.zero_grad()
            output = model(x)
            loss_fn(output, y).backward(retain_graph=True)
            labels = sampled_labels(loss_fn, output.detach())
            for g in torch.autograd.grad(sum_loss(output, labels), params):
                g * g
            optimizer.step()

        return step
    if row == "torch.func I1":
        from torch.func import functional_call, grad, vmap

        def loss_one(p, xn, yn):
            out = functional_call(model, p, (xn.unsqueeze(0),))
            return loss_fn(out, yn.unsqueeze(0))

        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")

        def step():
            plain_step()
            with torch.no_grad():
                output = model(x)
            labels = sampled_labels(loss_fn, output)
            p = {n: t.detach() for n, t in model.named_parameters()}
            for g in per_sample(p, x, labels).values():
                _sums_of_squares(g)

        return step

    model = extend(model, use_converter=model_name in BRANCHING)
    extend(loss_fn)
    sum_loss = type(loss_fn)(reduction="sum")
    extend(sum_loss)
    if row == "backpack DiagGGNExact":
        return lambda: plain_step(backpack(DiagGGNExact()))
    if row == "backpack DiagGGNMC":
        return lambda: plain_step(backpack(DiagGGNMC()))
    if row == "backpack DiagHessian":
        return lambda: plain_step(backpack(DiagHessian()))
    if row == "backpack SqrtGGNExact":

        def reduce_sqrt_ggn(_):
            for p in params:
                s = p.sqrt_ggn_exact.flatten(2) * x.shape[0] ** 0.5  # [C, N, P], per sample
                s2 = s * s
                g = s2.sum(0)
                (g.sum(0), (g * g).sum(0), (s2 * s2).sum(0).sum(0))
                del p.sqrt_ggn_exact

        return lambda: plain_step(backpack(SqrtGGNExact()), extra=reduce_sqrt_ggn)

    def sampled_step(extension, savefield):
        def step():
            plain_step()
            optimizer.zero_grad()
            output = model(x)
            with backpack(extension):
                sum_loss(output, sampled_labels(loss_fn, output)).backward()
            for p in params:
                _sums_of_squares(getattr(p, savefield))
                delattr(p, savefield)

        return step

    if row == "backpack BatchGrad I1":
        return sampled_step(BatchGrad(), "grad_batch")
    if row == "backpack BatchDiagHessian":
        return sampled_step(BatchDiagHessian(), "diag_h_batch")
    raise ValueError(row)


def _sums_of_squares(per_sample: torch.Tensor):
    """Batch sums of the squared per-sample values and of their squares (``[N, *P]``)."""
    s2 = per_sample * per_sample
    return s2.sum(0), (s2 * s2).sum(0)


def run_worker(model_name: str, row: str, batch: int, device: str, repeats: int) -> dict:
    """Median step time, ratio to a plain step and peak memory (MB) of one row.

    The plain step runs in the same process on a copy of the model, alternating with the
    row's step, so that drifts of the machine's speed cancel in the ratio. Peak memory is
    measured afterwards over the row's steps alone.
    """
    model, loss_fn, x, y = make_problem(model_name, batch, device)
    plain = make_step("plain", copy.deepcopy(model), copy.deepcopy(loss_fn), x, y)
    step = make_step(row, model, loss_fn, x, y, model_name)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(run) -> float:
        start = time.perf_counter()
        run()
        sync()
        return time.perf_counter() - start

    for _ in range(2):
        timed(plain), timed(step)
    plain_times, times = [], []
    for _ in range(repeats):
        plain_times.append(timed(plain))
        times.append(timed(step))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    for _ in range(3):
        timed(step)
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = _peak_rss_mb() - base
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    median = statistics.median(times)
    return {
        "median_s": median,
        "ratio": median / statistics.median(plain_times),
        "peak_mb": peak_mb,
        "params_mb": params_mb,
    }


def _reset_peak_rss() -> float:
    """Restart the peak resident memory count (Linux); returns the current memory, MB."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back before measuring
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_mb("VmRSS:")
    except (OSError, AttributeError):
        return 0.0


def _peak_rss_mb() -> float:
    try:
        return _proc_status_mb("VmHWM:")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")


def main():
    """Run every row of every model in its own process and print Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "ROW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = run_worker(*args.worker, args.batch, args.device, args.repeats)
        print(json.dumps(result))
        return

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"device {args.device}, batch {args.batch}, repeats {args.repeats}"
    )
    for model_name in args.models.split(","):
        print(f"\n## {model_name}\n")
        print("| row | median step (ms) | ratio to plain | step's peak memory above plain (MB) |")
        print("|---|---:|---:|---:|")
        plain = None
        for row in args.rows.split(","):
            slow = row.startswith(("backpack", "torch.func")) and row != "backpack DiagGGNExact"
            repeats = max(3, args.repeats // 5) if slow else args.repeats
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                model_name,
                row,
                "--batch",
                str(args.batch),
                "--device",
                args.device,
                "--repeats",
                str(repeats),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                reason = done.stderr.strip().splitlines()[-1] if done.stderr else "failed"
                print(f"| {row} | failed: {reason[:80]} | | |", flush=True)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if row == "plain":
                plain = result
                params = f"{result['params_mb']:.1f} MB of parameters"
            ratio = result["ratio"]
            extra = result["peak_mb"] - plain["peak_mb"] if plain else float("nan")
            print(
                f"| {row} | {1e3 * result['median_s']:.2f} | {ratio:.2f} | {extra:.0f} |",
                flush=True,
            )
        if plain:
            print(
                f"\n{params}. Ratio: to a plain step timed alternately in the same process. "
                "Memory: peak over three further steps above the memory before them "
                "(running statistics excluded), minus the plain step's."
            )


if __name__ == "__main__":
    main()
