"""A Hugging Face GPT-2 language model under a monitor, trained with its own loss.

The model is built from a small config (nothing is downloaded) and trained for a few
steps on random token sequences with padding. The monitor reads the logits through
``output=``, treats every unpadded position as one observation, and ties the language
model head to the token embedding as the model does.

Run: python examples/huggingface_gpt2.py   (needs ``pip install transformers``)
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fimhooks


def main(steps: int = 20, batch: int = 8, length: int = 16):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=length, n_embd=32, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = fimhooks.FisherMonitor(
        model,
        "categorical",
        output=lambda out: out.logits,
        estimators=("I1", "exact"),
        ema_decay=0.9,
    )
    for _ in range(steps):
        tokens = torch.randint(0, config.vocab_size, (batch, length))
        lengths = torch.randint(length // 2, length + 1, (batch,))
        observed = torch.arange(length) < lengths[:, None]  # padding at the end
        labels = tokens.masked_fill(~observed, -100)
        optimizer.zero_grad()
        out = model(tokens, attention_mask=observed.long(), labels=labels)
        with monitor(mask=observed):
            out.loss.backward()
        optimizer.step()
    print(monitor.estimates().summary())
    monitor.remove()


if __name__ == "__main__":
    main()
