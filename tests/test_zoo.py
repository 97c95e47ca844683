"""A zoo of third-party architectures from tiny configs against the torch.func brute force.

Every case is data: a builder (a float64 model, seeded, nothing downloaded), an input maker,
a likelihood, the loss the user trains with, and options. One parametrized test checks
``fisher("exact")``, ``variance("I1")`` (at every granularity) and ``data_variance()`` of one batch against
``reference.estimator_reference`` (docs/math.md §9), parameter by parameter, and reports
every parameter that differs rather than the first.

The models: Hugging Face ``transformers`` (GPT-2, BERT, Llama, Mistral, ViT, GPT-2 with
gradient checkpointing), ``torch.nn`` (transformer encoders and decoders in both layouts,
recurrent layers, ``MultiheadAttention`` with masks, every convolution padding, transposed
convolutions, parametrizations, ``torch.utils.checkpoint``) and timm's ``test_*`` models.
"""

from __future__ import annotations

import copy
import warnings
from typing import NamedTuple

import pytest
import torch
from reference import estimator_reference
from test_any_graph import targets
from test_reference import RTOL
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint
from torchvision_stand_in import import_timm

import fimhooks

MC_SAMPLES = 2
SIGMA = 0.7


class Inputs(NamedTuple):
    """What the forward is called with: ``model(*args, **kwargs)``, and the monitor's mask."""

    args: tuple
    kwargs: dict = {}
    mask: torch.Tensor = None


def _generator():
    return torch.Generator().manual_seed(1)


def features(*shape):
    """``Inputs`` of one float64 tensor ``shape``."""
    return lambda: Inputs((torch.randn(*shape, generator=_generator(), dtype=torch.float64),))


def cross_entropy(h, y):
    return F.cross_entropy(h.flatten(0, -2), y.flatten())


def smoothed(h, y):
    return F.cross_entropy(h.flatten(0, -2), y.flatten(), label_smoothing=0.1)


def binary(h, y):
    return F.binary_cross_entropy_with_logits(h, y)


def squared(h, y):
    return F.mse_loss(h, y, reduction="sum")


#: Reentrant checkpointing: no per-input backward pass (nor torch.autograd.grad) reaches
#: its layers, so it is refused, naming the fix.
REENTRANT = r"use_reentrant=True.*checkpoint\(\.\.\., use_reentrant=False\)"


def case(id, build, inputs, likelihood="categorical", loss=cross_entropy, marks=(), **options):
    """One zoo entry. ``options``: ``output``, ``batch_axis`` (of the inputs; 1 for
    ``[T, N, E]``), ``rtol`` (with the reason in a comment), ``reference`` (the model the
    brute force differentiates, where torch.func cannot go through the one trained),
    ``refused`` (the error a model fimhooks refuses must raise, instead of numbers)."""
    return pytest.param(build, inputs, likelihood, loss, options, id=id, marks=marks)


# --- Hugging Face transformers -----------------------------------------------------------


def _hf(config_name, model_name, **config):
    def build():
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        cfg = getattr(transformers, config_name)(**config)
        return getattr(transformers, model_name)(cfg).double().eval()

    return build


def tokens(vocab, n, t, padded=False):
    """Token ids ``[n, t]``; ``padded``: right padding, with the attention mask (a forward
    keyword) and the monitor's mask of the same positions (every input keeps one)."""

    def make():
        ids = torch.randint(0, vocab, (n, t), generator=_generator())
        if not padded:
            return Inputs((ids,))
        lengths = torch.tensor([t, t - 1, 2, 1, t][:n])
        attention = (torch.arange(t) < lengths[:, None]).long()
        return Inputs((ids,), {"attention_mask": attention}, attention.bool())

    return make


def logits(out):
    return out.logits


GPT2 = dict(
    vocab_size=7, n_positions=5, n_embd=4, n_layer=2, n_head=2,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
)  # fmt: skip
LLAMA = dict(
    vocab_size=7, hidden_size=4, intermediate_size=6, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8,
)  # fmt: skip
#: Llama's and Mistral's RMSNorm compute in float32 whatever the model's dtype
#: (``hidden_states.to(torch.float32)``): any two routes to the same derivatives then agree
#: to float32 rounding only (errors of 1e-8 to 3e-7 seen), not to float64's
FLOAT32_INSIDE = 1e-5


def gpt2_checkpointed(kwargs=None):
    """GPT-2 with HF's gradient checkpointing, in train mode (every dropout is 0)."""
    plain = _hf("GPT2Config", "GPT2LMHeadModel", **GPT2)

    def build():
        model = plain().train()
        with warnings.catch_warnings():  # v5 calls it a deprecated alias; users still call it
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return model

    return build


def without_checkpointing(model):
    model = copy.deepcopy(model)
    with warnings.catch_warnings():  # deprecated alias, as above
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_disable()
    model.disable_input_require_grads()  # its hook calls requires_grad_(), which torch.func refuses
    return model


HUGGING_FACE = [
    case("hf-gpt2", _hf("GPT2Config", "GPT2LMHeadModel", **GPT2), tokens(7, 3, 4), output=logits),
    case(
        "hf-gpt2-padded",
        _hf("GPT2Config", "GPT2LMHeadModel", **GPT2),
        tokens(7, 3, 4, padded=True),
        output=logits,
    ),
    case(
        "hf-gpt2-eager",
        _hf("GPT2Config", "GPT2LMHeadModel", **GPT2, attn_implementation="eager"),
        tokens(7, 3, 4),
        output=logits,
    ),
    case(
        "hf-bert-classifier-padded",
        _hf(
            "BertConfig",
            "BertForSequenceClassification",
            vocab_size=9,
            hidden_size=4,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=6,
            max_position_embeddings=5,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
        lambda: tokens(9, 3, 5, padded=True)()._replace(mask=None),  # one label per input
        loss=smoothed,
        output=logits,
    ),
    case(
        "hf-llama",
        _hf("LlamaConfig", "LlamaForCausalLM", **LLAMA),
        tokens(7, 3, 5),
        output=logits,
        rtol=FLOAT32_INSIDE,
    ),
    case(
        "hf-llama-eager-padded",
        _hf("LlamaConfig", "LlamaForCausalLM", **LLAMA, attn_implementation="eager"),
        tokens(7, 3, 5, padded=True),
        output=logits,
        rtol=FLOAT32_INSIDE,
    ),
    case(
        "hf-mistral-sliding-window",
        _hf("MistralConfig", "MistralForCausalLM", **LLAMA, sliding_window=2),
        tokens(7, 3, 5),
        output=logits,
        rtol=FLOAT32_INSIDE,
    ),
    case(
        "hf-vit-classifier",
        _hf(
            "ViTConfig",
            "ViTForImageClassification",
            image_size=8,
            patch_size=4,
            num_channels=3,
            hidden_size=4,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=6,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
        features(3, 3, 8, 8),
        output=logits,
    ),
    case(
        "hf-gpt2-gradient-checkpointing",
        gpt2_checkpointed(),
        tokens(7, 3, 4),
        output=logits,
        reference=without_checkpointing,
    ),
    case(
        "hf-gpt2-gradient-checkpointing-reentrant",
        gpt2_checkpointed({"use_reentrant": True}),
        tokens(7, 3, 4),
        output=logits,
        refused=REENTRANT,
    ),
]


# --- torch.nn ----------------------------------------------------------------------------


def seeded(cls):
    """``build(*args)`` for a module class: seeded, float64, eval mode."""

    def factory(*args, **kwargs):
        def build():
            torch.manual_seed(0)
            return cls(*args, **kwargs).double().eval()

        return build

    return factory


@seeded
class Encoder(nn.Module):
    """``nn.TransformerEncoder`` of two layers, mean over the sequence, a classifier."""

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(2, 4)
        layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1 if self.batch_first else 0))


@seeded
class Decoder(nn.Module):
    """``nn.TransformerDecoder`` with a causal target mask over an embedded memory."""

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.embed, self.memory = nn.Linear(2, 4), nn.Linear(3, 4)
        layer = nn.TransformerDecoderLayer(4, 2, 6, dropout=0.0, batch_first=batch_first)
        self.decoder = nn.TransformerDecoder(layer, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, tgt, memory):
        axis = 1 if self.batch_first else 0
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[axis], dtype=tgt.dtype)
        out = self.decoder(self.embed(tgt), self.memory(memory), tgt_mask=causal)
        return self.head(out.mean(axis))


def decoder_inputs(batch_first):
    def make():
        g = _generator()
        tgt = torch.randn(3, 3, 2, generator=g, dtype=torch.float64)
        memory = torch.randn(3, 4, 3, generator=g, dtype=torch.float64)
        if not batch_first:
            tgt, memory = tgt.transpose(0, 1), memory.transpose(0, 1)
        return Inputs((tgt, memory))

    return make


@seeded
class Recurrent(nn.Module):
    """Two layers of ``nn.RNN``/``nn.LSTM``/``nn.GRU``; a classifier on the last step."""

    def __init__(self, cls, batch_first, out=3):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cls(2, 4, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(4, out)

    def forward(self, x):
        out = self.rnn(x)[0]
        return self.head(out[:, -1] if self.batch_first else out[-1])


@seeded
class CellLoop(nn.Module):
    """``nn.LSTMCell`` called once per step in a Python loop."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.LSTMCell(2, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = c = x.new_zeros(len(x), 4)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


@seeded
class Attention(nn.Module):
    """``nn.MultiheadAttention`` with a causal ``attn_mask`` and a ``key_padding_mask``."""

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(2, 4)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.head = nn.Linear(4, 3)
        self.register_buffer("causal", torch.ones(4, 4, dtype=torch.bool).triu(1))

    def forward(self, x, key_padding_mask):
        e = self.embed(x)
        out = self.attention(
            e, e, e, attn_mask=self.causal, key_padding_mask=key_padding_mask, need_weights=False
        )[0]
        return self.head(out.mean(1 if self.batch_first else 0))


def attention_inputs(batch_first):
    def make():
        x = torch.randn(3, 4, 2, generator=_generator(), dtype=torch.float64)
        padding = torch.arange(4) >= torch.tensor([4, 3, 2])[:, None]  # True: a padded key
        return Inputs((x if batch_first else x.transpose(0, 1),), {"key_padding_mask": padding})

    return make


@seeded
class Conv(nn.Module):
    """A convolution (any ``nn.Conv*d`` options), ``tanh``, a linear classifier."""

    def __init__(self, cls, size, out=3, **conv):
        super().__init__()
        self.conv = cls(**{"in_channels": 2, "out_channels": 3, "kernel_size": 3, **conv})
        with torch.no_grad():
            features = self.conv(torch.zeros(1, self.conv.in_channels, *size)).numel()
        self.head = nn.Linear(features, out)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class _LowRank(nn.Module):
    """A LoRA-style parametrization: ``W + A @ B``, with trainable ``A``, ``B``."""

    def __init__(self, out_features, in_features, rank=2):
        super().__init__()
        self.A = nn.Parameter(0.3 * torch.randn(out_features, rank))
        self.B = nn.Parameter(0.3 * torch.randn(rank, in_features))

    def forward(self, weight):
        return weight + self.A @ self.B


@seeded
class Parametrized(nn.Module):
    """``Linear → tanh → Linear`` whose first weight is parametrized."""

    def __init__(self, kind):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)
        if kind == "weight_norm":
            self.a = nn.utils.parametrizations.weight_norm(self.a)
        else:
            self.a.weight.requires_grad_(False)  # the frozen base weight of LoRA
            parametrize.register_parametrization(self.a, "weight", _LowRank(4, 3))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@seeded
class Checkpointed(nn.Module):
    """``torch.utils.checkpoint.checkpoint`` around a residual block (off for the reference)."""

    def __init__(self, use_reentrant):
        super().__init__()
        self.use_reentrant, self.checkpointing = use_reentrant, True
        self.embed = nn.Linear(3, 4)
        self.block = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        e = torch.tanh(self.embed(x))
        if self.checkpointing:
            inner = checkpoint(self.block, e, use_reentrant=self.use_reentrant)
        else:
            inner = self.block(e)
        return self.head(e + inner)


def unchecked(model):
    model = copy.deepcopy(model)
    model.checkpointing = False
    return model


def conv2d(id, marks=(), **conv):
    return case(f"conv2d-{id}", Conv(nn.Conv2d, (5, 5), **conv), features(3, 2, 5, 5), marks=marks)


#: torch's note that it pads a copy of the input for an even kernel
EVEN_KERNEL = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


TORCH_NN = [
    case("transformer-encoder-batch-first", Encoder(True), features(3, 4, 2)),
    case("transformer-encoder-seq-first", Encoder(False), features(4, 3, 2), batch_axis=1),
    case("transformer-decoder-batch-first", Decoder(True), decoder_inputs(True)),
    case("transformer-decoder-seq-first", Decoder(False), decoder_inputs(False), batch_axis=1),
    case("rnn-batch-first", Recurrent(nn.RNN, True), features(3, 4, 2)),
    case("rnn-seq-first", Recurrent(nn.RNN, False), features(4, 3, 2), batch_axis=1),
    case("lstm-batch-first", Recurrent(nn.LSTM, True), features(3, 4, 2)),
    case("lstm-seq-first", Recurrent(nn.LSTM, False), features(4, 3, 2), batch_axis=1),
    case("gru-batch-first", Recurrent(nn.GRU, True), features(3, 4, 2), "bernoulli", binary),
    case(
        "gru-seq-first",
        Recurrent(nn.GRU, False),
        features(4, 3, 2),
        "bernoulli",
        binary,
        batch_axis=1,
    ),
    case("lstm-cell-loop", CellLoop(), features(3, 4, 2)),
    case("multihead-attention-masks-batch-first", Attention(True), attention_inputs(True)),
    case(
        "multihead-attention-masks-seq-first",
        Attention(False),
        attention_inputs(False),
        batch_axis=1,
    ),
    conv2d("zeros", padding=1),
    conv2d("reflect", padding=1, padding_mode="reflect"),
    conv2d("replicate", padding=1, padding_mode="replicate"),
    conv2d("circular", padding=1, padding_mode="circular"),
    conv2d("same", padding="same"),
    conv2d("same-dilation2", padding="same", dilation=2),
    conv2d("same-even-kernel", EVEN_KERNEL, padding="same", kernel_size=(2, 4)),
    conv2d("reflect-same-dilation2", padding="same", dilation=2, padding_mode="reflect"),
    conv2d("circular-stride2", padding=1, stride=2, padding_mode="circular"),
    case(
        "conv1d-circular",
        Conv(nn.Conv1d, (6,), padding=1, padding_mode="circular"),
        features(3, 2, 6),
        "gaussian",
        squared,
    ),
    case(
        "conv-transpose2d-stride2-output-padding1",
        Conv(nn.ConvTranspose2d, (4, 4), stride=2, padding=1, output_padding=1),
        features(3, 2, 4, 4),
    ),
    case(
        "conv-transpose2d-groups2",
        Conv(nn.ConvTranspose2d, (4, 4), in_channels=4, out_channels=4, groups=2),
        features(3, 4, 4, 4),
        "bernoulli",
        binary,
    ),
    case(
        "conv-transpose2d-dilation2",
        Conv(nn.ConvTranspose2d, (4, 4), dilation=2),
        features(3, 2, 4, 4),
    ),
    case("weight-norm", Parametrized("weight_norm"), features(4, 3), "gaussian", squared),
    case("lora-parametrization", Parametrized("lora"), features(4, 3)),
    case("checkpoint", Checkpointed(False), features(4, 3), reference=unchecked),
    case("checkpoint-reentrant", Checkpointed(True), features(4, 3), refused=REENTRANT),
]


# --- timm ----------------------------------------------------------------------------------


def timm_model(name, **kwargs):
    def build():
        try:
            timm = import_timm()
        except ImportError:
            pytest.skip("timm is not installed")
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=4, **kwargs).double().eval()

    return build


#: timm's ``test_*`` models: 2 inputs of 3×32×32, 4 classes (100k to 960k parameters). The
#: transformers are built for 32×32 (``img_size``): at another size timm resamples the
#: position embedding in float32. ``slow``: over 700k parameters, about a second each on 2 cores.
TIMM = [
    case(
        name,
        timm_model(name, **({"img_size": 32} if size else {})),
        features(2, 3, 32, 32),
        marks=[pytest.mark.slow] if slow else [],
        **options,
    )
    for name, size, slow, options in [
        ("test_byobnet", False, False, {}),
        ("test_coatnet", True, False, {}),
        ("test_convnext", False, False, {}),
        ("test_convnext2", False, False, {}),
        ("test_convnext3", False, False, {}),
        ("test_efficientnet", False, False, {}),
        # EvoNorm computes its statistics in float32 (timm/layers/evo_norm.py, x.float()),
        # so any two routes to the same derivatives agree to float32 rounding only
        ("test_efficientnet_evos", False, False, {"rtol": 1e-5}),
        ("test_efficientnet_gn", False, False, {}),
        ("test_efficientnet_ln", False, False, {}),
        ("test_mambaout", False, False, {}),
        ("test_maxvit", True, True, {}),
        ("test_nfnet", False, False, {}),
        ("test_resnet", False, False, {}),
        ("test_vit", True, False, {}),
        ("test_vit2", True, False, {}),
        ("test_vit3", True, True, {}),
        ("test_vit4", True, True, {}),
        ("test_vit_relpos", True, True, {}),
    ]
]


def _differences(actual, expected, what, rtol, floor=None):
    """Every parameter that differs by ``rtol`` or more, relative as in ``assert_close``
    (to the largest entry of the expected tensor, or ``floor``), listed rather than the first."""
    found = [f"{what}: missing {k}" for k in expected.keys() - actual.keys()]
    found += [f"{what}: unexpected {k}" for k in actual.keys() - expected.keys()]
    for key in [k for k in expected if k in actual]:
        a, e = actual[key], expected[key]
        scale = e.abs().max().clamp_min(1e-12 if floor is None else floor[key])
        err = ((a - e).abs().max() / scale).item()
        if not err < rtol:  # NaN too
            found.append(f"{what}[{key}] differs by {err:.2e} (relative)")
    return found


@pytest.mark.parametrize(
    "build, make_inputs, likelihood, loss, options", HUGGING_FACE + TORCH_NN + TIMM
)
def test_zoo_matches_brute_force(build, make_inputs, likelihood, loss, options):
    model, (args, kwargs, mask) = build(), make_inputs()
    output, rtol = options.get("output"), options.get("rtol", RTOL)
    sigma = SIGMA if likelihood == "gaussian" else None
    monitor = fimhooks.FisherMonitor(
        model,
        likelihood,
        sigma=sigma,
        output=output,
        estimators=("I1", "exact"),
        mc_samples=MC_SAMPLES,
    )
    try:
        out = model(*args, **kwargs)
        h = out if output is None else output(out)
        if "refused" in options:
            with pytest.raises(RuntimeError, match=options["refused"]):
                with monitor(mask=mask):
                    loss(h, targets(h, likelihood)).backward()
            return
        with monitor(mask=mask):
            loss(h, targets(h, likelihood)).backward()
    finally:  # hooks left behind by an error would change the cases after this one
        monitor.remove()
    est = monitor.estimates()
    ref = estimator_reference(
        options.get("reference", lambda m: m)(model),
        likelihood,
        args,
        MC_SAMPLES,
        sigma or 1.0,
        output=output,
        mask=mask,
        second_order=False,
        batch_axis=options.get("batch_axis", 0),
        kwargs=kwargs,
    )
    # sample variances from power sums carry rounding of order eps·mean² (as in
    # test_huggingface): data variances are compared at an absolute 1e-14·largest² at least
    largest = max(v.abs().max() for v in ref["exact"].values())
    floor = {k: 1e-6 * largest**2 for k in ref["exact"]}
    found = _differences(est.fisher("exact"), ref["exact"], "exact", rtol)
    by_granularity = ref["v1_by_granularity"]
    found += _differences(est.variance("I1"), by_granularity[est.granularity], "v1", rtol)
    for granularity, expected in by_granularity.items():
        at = est.variance("I1", granularity=granularity)
        found += _differences(at, expected, f"v1 at {granularity}", rtol)
    found += _differences(est.data_variance(), ref["data"], "data variance", rtol, floor)
    assert not found, f"{len(found)} differences:\n" + "\n".join(found)
