"""One rank of the Hugging Face Trainer under DDP (``test_integrations``), run by torchrun;
also the token dataset of that module's tests.

Each rank trains a tiny GPT-2 for one epoch with learning rate 0 (the parameters stay, so
one process can be compared) and saves its estimates and, on rank 0, those of one process
on all sequences, into the directory given as the argument.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from fimhooks import FisherMonitor
from fimhooks.integrations.transformers import FisherCallback


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=4):
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, 7, (n, length), generator=generator)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def gpt2():
    config = transformers.GPT2Config(
        vocab_size=7, n_positions=4, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def main(directory: Path) -> None:
    args = transformers.TrainingArguments(
        output_dir=str(directory),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=0.0,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=gpt2(), args=args, train_dataset=Tokens())
    callback = FisherCallback("categorical", estimators=("I1", "exact")).attach(trainer)
    trainer.train()
    est = callback.monitor.estimates()
    saved = {"num_inputs": est.num_inputs, "exact": est.fisher("exact")}
    saved["var_I1"] = est.variance("I1")
    torch.save(saved, directory / f"rank{dist.get_rank()}.pt")
    if dist.get_rank() == 0:
        model = gpt2()
        reference = FisherMonitor(
            model,
            "categorical",
            output=lambda out: out.logits,
            estimators=("I1", "exact"),
            sync=False,
        )
        with reference:
            model(input_ids=Tokens().tokens, labels=Tokens().tokens).loss.backward()
        one = reference.estimates()
        saved = {"num_inputs": one.num_inputs, "exact": one.fisher("exact")}
        saved["var_I1"] = one.variance("I1")
        torch.save(saved, directory / "one_process.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
