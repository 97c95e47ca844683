"""Hugging Face models from small configs (nothing downloaded) against the brute force."""

import pytest
import torch
from reference import estimator_reference
from test_reference import assert_close, assert_label_variances

import fimhooks

transformers = pytest.importorskip("transformers")


def gpt2():
    config = transformers.GPT2Config(
        vocab_size=7, n_positions=4, n_embd=4, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double(), torch.randint(0, 7, (3, 4))


def bert():
    config = transformers.BertConfig(
        vocab_size=9, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=6, max_position_embeddings=4, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).double(), torch.randint(0, 9, (3, 4))


@pytest.mark.parametrize("build", [gpt2, bert], ids=["gpt2", "bert"])
def test_hugging_face_models_match_brute_force(build):
    model, tokens = build()
    model.train()  # dropout probabilities are 0: training mode changes nothing else
    labels = tokens if build is gpt2 else torch.tensor([0, 2, 1])
    plain = model(tokens, labels=labels)
    plain.loss.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monitor = fimhooks.FisherMonitor(
        model,
        "categorical",
        output=lambda out: out.logits,
        estimators=("I1", "exact"),
        mc_samples=2,
    )
    out = model(tokens, labels=labels)  # the model's own loss
    with monitor:
        out.loss.backward()
    monitor.remove()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-12, atol=1e-15)
    est = monitor.estimates()
    ref = estimator_reference(
        model, "categorical", tokens, 2, output=lambda out: out.logits, second_order=False
    )
    assert_close(est.fisher("exact"), ref["exact"], "exact")
    assert_label_variances(est, ref)
    # sample variances from power sums carry rounding of order eps·mean² (float64)
    largest = max(v.abs().max() for v in ref["exact"].values())
    floor = {k: 1e-6 * largest**2 for k in ref["exact"]}  # absolute 1e-14·largest²
    assert_close(est.data_variance(), ref["data"], "data variance", floor)
    if build is gpt2:  # tied: lm_head.weight is transformer.wte.weight, one entry
        assert "lm_head.weight" not in est.fisher("exact")
        assert (est.fisher("exact")["transformer.wte.weight"] > 0).all()
