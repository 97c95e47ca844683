"""Training loops the user does not own: the Hugging Face Trainer, alone and under DDP."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_trainer_ddp import Tokens  # noqa: E402


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


def test_lightning_fit_collects_every_step_and_logs(tmp_path):
    lightning = pytest.importorskip("lightning")
    from fimhooks.integrations.lightning import FisherCallback

    class Classifier(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
            )

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(24, 3, generator=generator), torch.randint(0, 3, (24,), generator=generator)
    )
    logged = []

    class Recorder(lightning.pytorch.loggers.logger.DummyLogger):
        def log_metrics(self, metrics, step=None):
            logged.append(dict(metrics))

    callback = FisherCallback("categorical", model="net", every=2)
    trainer = lightning.Trainer(
        max_epochs=2,
        callbacks=[callback],
        logger=Recorder(),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
    )
    trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=6))
    assert callback.monitor.removed and callback.monitor.backward_passes == 8
    assert callback.monitor.collected_steps == 4
    assert callback.monitor.estimates().num_inputs == 4 * 6
    assert any("fisher/0/I1/trace" in metrics for metrics in logged)


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
