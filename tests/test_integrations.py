"""Training loops the user does not own: the Hugging Face Trainer."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=12, length=4):
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, 7, (n, length), generator=generator)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def test_hugging_face_trainer_collects_every_step(tmp_path):
    from fimhooks.integrations.transformers import FisherCallback

    config = transformers.GPT2Config(vocab_size=7, n_positions=4, n_embd=8, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        num_train_epochs=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )

    class Reporter(transformers.TrainerCallback):  # stands for TensorBoard or W&B
        logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(), callbacks=[Reporter()]
    )
    callback = FisherCallback("categorical", estimators=("I1", "exact")).attach(trainer)
    trainer.train()
    est = callback.monitor.estimates()
    assert callback.monitor.removed and callback.monitor.collected_steps == 6
    assert est.num_inputs == 2 * 12  # two epochs of twelve sequences
    steps = [logs for logs in Reporter.logs if "loss" in logs]
    assert len(steps) == 6 and all(logs["fisher/transformer.wte/I1/trace"] > 0 for logs in steps)
    assert {
        "fisher/transformer.h.0.mlp.c_fc/exact/rse",
        "fisher/transformer.ln_f/I1/label_share",
    } <= set(steps[-1])
    assert all(not m._forward_hooks for m in model.modules())
