"""Tiny float64 models beyond chains (docs/math.md §9): branches, attention, tied weights."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ResidualMLP(nn.Module):
    """``out(tanh(x + b(act(a(x)))))``."""

    def __init__(self, out: int, act: nn.Module = None):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(3, out)
        self.act = act or nn.Sigmoid()

    def forward(self, x):
        return self.out(torch.tanh(x + self.b(self.act(self.a(x)))))


class ReLUResidual(nn.Module):
    """Residual blocks with ReLU only: piecewise linear, so Î₂ equals exact."""

    def __init__(self, out: int):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(3, out)

    def forward(self, x):
        return self.out(F.relu(x + self.b(F.relu(self.a(x)))))


class NormGELU(nn.Module):
    def __init__(self, out: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.GELU(), nn.Linear(4, out))

    def forward(self, x):
        return self.body(x)


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoderLayer`` on ``[N, T, d]``, mean-pooled, then a classifier."""

    def __init__(self, out: int):
        super().__init__()
        self.embed = nn.Linear(2, 4)
        self.encoder = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, out)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class TinyLM(nn.Module):
    """Per-token language model: tied embedding, causal attention computed functionally."""

    def __init__(self, vocab: int = 5, dim: int = 4):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Parameter(torch.randn(3, dim) * 0.3)
        self.norm = nn.RMSNorm(dim) if hasattr(nn, "RMSNorm") else nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens):
        x = self.wte(tokens) + self.wpe[: tokens.shape[1]]
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.lm_head(x)


class PositionEmbeddingLM(TinyLM):
    """Positions from an ``nn.Embedding`` called once on ``arange(T)`` (no batch axis)."""

    def __init__(self):
        super().__init__()
        del self.wpe
        self.positions = nn.Embedding(3, 4)

    def forward(self, tokens):
        where = torch.arange(tokens.shape[1])
        x = self.wte(tokens) + self.positions(where)[None]
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.lm_head(x)


class ConvGroupNorm(nn.Module):
    def __init__(self, out: int):
        super().__init__()
        self.conv1, self.norm = nn.Conv2d(2, 2, 3, padding=1), nn.GroupNorm(1, 2)
        self.conv2, self.head = nn.Conv2d(2, 2, 3, padding=1), nn.Linear(2, out)

    def forward(self, x):
        y = self.conv2(F.relu(self.norm(self.conv1(x))))
        return self.head(F.relu(x + y).mean((2, 3)))


class Tied(nn.Module):
    """One Linear layer applied twice."""

    def __init__(self, out: int):
        super().__init__()
        self.inner, self.head = nn.Linear(3, 3), nn.Linear(3, out)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def make(name: str, out: int) -> nn.Module:
    torch.manual_seed(0)
    models = {
        "residual_mlp": lambda: ResidualMLP(out),
        "relu_residual": lambda: ReLUResidual(out),
        "layernorm_gelu": lambda: NormGELU(out),
        "encoder_classifier": lambda: EncoderClassifier(out),
        "tiny_lm": lambda: TinyLM(),
        "position_lm": lambda: PositionEmbeddingLM(),
        "conv_groupnorm": lambda: ConvGroupNorm(out),
        "tied": lambda: Tied(out),
    }
    return models[name]().double()


def inputs(name: str, n: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if name in ("tiny_lm", "position_lm"):
        return torch.randint(0, 5, (n, 3), generator=generator)
    shape = {"encoder_classifier": (n, 3, 2), "conv_groupnorm": (n, 2, 3, 3)}.get(name, (n, 3))
    return torch.randn(shape, generator=generator, dtype=torch.float64)
