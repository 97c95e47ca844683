"""Training loops the user does not own: the Hugging Face Trainer (alone and under DDP) and
PyTorch Lightning."""

import copy
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_reference import assert_close

import fimhooks

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_trainer_ddp import Tokens, gpt2  # noqa: E402


def hooks(model):
    """Every hook dict of every module, by module path: what a run must leave as it was."""
    kinds = [k for k in vars(torch.nn.Module()) if k.endswith("hooks") or "hooks_" in k]
    return {path: {k: list(getattr(m, k)) for k in kinds} for path, m in model.named_modules()}


def fimhooks_warnings(caught):
    return [str(w.message) for w in caught if str(w.message).startswith("fimhooks:")]


def trainer_args(tmp_path, **options):
    return transformers.TrainingArguments(
        **{
            "output_dir": str(tmp_path),
            "per_device_train_batch_size": 4,
            "num_train_epochs": 1,
            "report_to": [],
            "use_cpu": True,
            "save_strategy": "no",
            "disable_tqdm": True,
            **options,
        }
    )


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
        model=model, args=args, train_dataset=Tokens(12), callbacks=[Reporter()]
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


def lightning_classifier(fail_at=None):
    """A LightningModule whose ``training_step`` calls ``self.net(x)``; it raises at batch
    ``fail_at``."""
    lightning = pytest.importorskip("lightning")

    class Classifier(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
            )

        def training_step(self, batch, batch_idx):
            if batch_idx == fail_at:
                raise RuntimeError("a failing training step")
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Classifier()


def lightning_fit(tmp_path, module, callbacks, **options):
    """Two epochs of four batches of six inputs."""
    import lightning

    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(24, 3, generator=generator), torch.randint(0, 3, (24,), generator=generator)
    )
    trainer = lightning.Trainer(
        **{
            "max_epochs": 2,
            "callbacks": callbacks,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
            "accelerator": "cpu",
            **options,
        }
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=6))


def test_lightning_fit_collects_every_step_and_logs(tmp_path):
    lightning = pytest.importorskip("lightning")
    from fimhooks.integrations.lightning import FisherCallback

    logged = []

    class Recorder(lightning.pytorch.loggers.logger.DummyLogger):
        def log_metrics(self, metrics, step=None):
            logged.append(dict(metrics))

    callback = FisherCallback("categorical", model="net", every=2)
    module = lightning_classifier()
    lightning_fit(tmp_path, module, [callback], logger=Recorder(), log_every_n_steps=1)
    assert callback.monitor.removed and callback.monitor.backward_passes == 8
    assert callback.monitor.collected_steps == 4
    assert callback.monitor.estimates().num_inputs == 4 * 6
    assert any("fisher/0/I1/trace" in metrics for metrics in logged)


def test_lightning_without_the_network_named_warns_after_the_first_batch(tmp_path):
    """``training_step`` calls ``self.net(x)``, the callback watches the LightningModule:
    no backward pass goes through its output, which is said once, naming ``model=``."""
    lightning = pytest.importorskip("lightning")
    from fimhooks.integrations.lightning import FisherCallback

    seen = []  # fimhooks warnings by the end of each batch

    class Count(lightning.pytorch.callbacks.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(len(fimhooks_warnings(caught)))

    callback = FisherCallback("categorical")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lightning_fit(tmp_path, lightning_classifier(), [callback, Count()])
    messages = fimhooks_warnings(caught)
    assert len(messages) == 1 and 'FisherCallback(..., model="net")' in messages[0]
    assert seen == [1] * 8
    assert callback.monitor.removed and callback.monitor.collected_steps == 0


def test_lightning_fit_that_raises_leaves_no_hooks(tmp_path):
    from fimhooks.integrations.lightning import FisherCallback

    module = lightning_classifier(fail_at=2)
    before = hooks(module)
    callback = FisherCallback("categorical", model="net")
    with pytest.raises(RuntimeError, match="a failing training step"):
        lightning_fit(tmp_path, module, [callback])
    assert callback.monitor.removed and hooks(module) == before
    assert callback.monitor.estimates().num_inputs == 2 * 6  # the two steps before it
    fimhooks.FisherMonitor(module.net, "categorical").remove()


def test_hugging_face_trainer_under_ddp_holds_the_estimates_of_one_process(tmp_path):
    """Two gloo processes launched by torchrun (``hf_trainer_ddp.py``): every rank holds the
    estimates of one process on all sequences, the same on every rank."""
    with socket.socket() as free:
        free.bind(("localhost", 0))
        port = free.getsockname()[1]
    worker = Path(__file__).with_name("hf_trainer_ddp.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-port", str(port), str(worker), str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    one = torch.load(tmp_path / "one_process.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for saved in ranks:
        assert saved["num_inputs"] == one["num_inputs"] == 16
        for key in ("exact", "var_I1"):  # float32, summed in another order
            for name, value in one[key].items():
                torch.testing.assert_close(saved[key][name], value, rtol=1e-5, atol=0)
                assert torch.equal(saved[key][name], ranks[0][key][name])


class Padded(torch.utils.data.Dataset):
    """Token sequences of 2 to 4 tokens, padded per batch by ``pad``."""

    def __init__(self, n=8):
        generator = torch.Generator().manual_seed(0)
        self.lengths = [2, 4, 3, 4, 4, 2, 3, 3][:n]
        self.tokens = torch.randint(1, 7, (n, 4), generator=generator)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return self.tokens[i, : self.lengths[i]]


def pad(sequences):
    """Right padding with token 0; labels -100 there, as Hugging Face collators do."""
    length = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, s in enumerate(sequences):
        input_ids[row, : len(s)], attention_mask[row, : len(s)] = s, 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("attention_mask", [True, False], ids=["masked", "opt_out"])
def test_hugging_face_trainer_leaves_padding_out(tmp_path, attention_mask):
    """The estimates of a plain ``with monitor(mask=attention_mask):`` loop over the batches
    the Trainer ran (learning rate 0: the parameters stay)."""
    from fimhooks.integrations.transformers import FisherCallback

    model, batches = gpt2(), []
    plain = copy.deepcopy(model).train()
    trainer = transformers.Trainer(
        model=model,
        args=trainer_args(tmp_path, learning_rate=0.0, remove_unused_columns=False),
        train_dataset=Padded(),
        data_collator=lambda rows: batches.append(pad(rows)) or batches[-1],
    )
    options = {"estimators": ("I1", "exact"), "seed": 0}
    callback = FisherCallback("categorical", attention_mask=attention_mask, **options)
    callback.attach(trainer)
    trainer.train()
    assert len(batches) == 2 and all((b["attention_mask"] == 0).any() for b in batches)
    monitor = fimhooks.FisherMonitor(plain, "categorical", output=lambda out: out.logits, **options)
    for batch in batches:
        out = plain(**batch)
        with monitor(mask=batch["attention_mask"] if attention_mask else None):
            out.loss.backward()
    est, expected = callback.monitor.estimates(), monitor.estimates()
    assert est.num_inputs == expected.num_inputs == 8
    for what in ("I1", "exact"):
        assert_close(est.fisher(what), expected.fisher(what), f"fisher {what}")
        assert_close(est.empirical_variance(what), expected.empirical_variance(what), what)
    assert_close(est.variance("I1"), expected.variance("I1"), "variance I1")


@pytest.mark.parametrize("attach", [True, False], ids=["attach", "callbacks"])
@pytest.mark.parametrize("fails_in", ["forward", "loss"])
def test_hugging_face_trainer_that_raises_leaves_no_hooks(tmp_path, fails_in, attach):
    """The third batch fails in the model's forward (a token out of the vocabulary) or in
    its loss (a label out of range). Attached, the monitor is removed when ``train()``
    raises; passed in ``callbacks=``, at the next ``train()``."""
    from fimhooks.integrations.transformers import FisherCallback

    class Failing(Tokens):
        calls = 0

        def __getitem__(self, i):
            Failing.calls += 1
            item = super().__getitem__(i)
            key = "input_ids" if fails_in == "forward" else "labels"
            return {**item, key: item[key] + 99} if Failing.calls > 8 else item

    model = gpt2()
    before = hooks(model)
    callback = FisherCallback("categorical", estimators=("I1", "exact"))
    args = trainer_args(tmp_path, max_steps=3)
    callbacks = [] if attach else [callback]
    trainer = transformers.Trainer(model, args, train_dataset=Failing(), callbacks=callbacks)
    if attach:
        callback.attach(trainer)
    with pytest.raises(IndexError):
        trainer.train()
    first = callback.monitor
    assert first.estimates().num_inputs == 8  # the two steps before the failure
    if attach:
        assert first.removed and hooks(model) == before
        fimhooks.FisherMonitor(model, "categorical", output=lambda out: out.logits).remove()
    Failing.calls = -1000  # the next run does not fail
    trainer.train()
    assert first.removed and callback.monitor is not first
    assert callback.monitor.removed and callback.monitor.estimates().num_inputs == 12
    assert hooks(model) == before


def test_hugging_face_trainer_whose_loss_bypasses_the_output_warns(tmp_path):
    """A ``compute_loss`` that calls the model's submodules: no backward pass goes through
    the watched model's output, which is said once, after the first step."""
    from fimhooks.integrations.transformers import FisherCallback

    class HeadLoss(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            hidden = model.transformer(input_ids=inputs["input_ids"]).last_hidden_state
            logits = model.lm_head(hidden)
            return torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), inputs["labels"].flatten()
            )

    model = gpt2()
    trainer = HeadLoss(model, trainer_args(tmp_path, max_steps=2), train_dataset=Tokens())
    callback = FisherCallback("categorical").attach(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = fimhooks_warnings(caught)
    assert len(messages) == 1 and "output=" in messages[0] and "compute_loss" in messages[0]
    assert callback.monitor.collected_steps == 0
