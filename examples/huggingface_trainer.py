"""The Hugging Face ``Trainer`` with a ``FisherCallback``: a loop fimhooks does not own.

A small GPT-2 (from a config, nothing downloaded) is trained for two epochs on random
token sequences; the callback's scalars go into the trainer's logs, and the summary is
printed at the end.

Run: python examples/huggingface_trainer.py   (needs ``pip install 'fimhooks[transformers]'``)
"""

import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from fimhooks.integrations.transformers import FisherCallback


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=16, vocab=64):
        self.tokens = torch.randint(0, vocab, (n, length))

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def main():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    )
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=8,
            num_train_epochs=2,
            logging_steps=4,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
        )
        trainer = Trainer(model=model, args=args, train_dataset=RandomTokens())
        callback = FisherCallback("categorical", estimators=("I1", "exact"), every=2)
        callback.attach(trainer)
        trainer.train()
    print(callback.monitor.estimates().summary())


if __name__ == "__main__":
    main()
