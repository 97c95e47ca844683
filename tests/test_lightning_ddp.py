"""PyTorch Lightning under DDP (two gloo processes on CPU): every rank's estimates are those of
one process on all ranks' inputs, and the same on every rank."""

import pytest
import torch

lightning = pytest.importorskip("lightning")

from fimhooks import FisherMonitor  # noqa: E402
from fimhooks.integrations.lightning import FisherCallback  # noqa: E402

#: Held by both ranks' samplers, 8 a step each: 4 steps.
INPUTS = 64


def _data() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(INPUTS, 3, generator=generator, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 3, (INPUTS,), generator=generator))


class Classifier(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        ).double()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):  # the parameters stay: one process can be compared
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Saved(lightning.Callback):
    """Each rank saves its estimates where the test reads them."""

    def __init__(self, fisher: FisherCallback, directory):
        self.fisher, self.directory = fisher, directory

    def on_fit_end(self, trainer, pl_module):
        est = self.fisher.monitor.estimates()
        saved = {"num_inputs": est.num_inputs, "exact": est.fisher("exact")}
        saved["var_I1"] = est.variance("I1")
        torch.save(saved, self.directory / f"rank{trainer.global_rank}.pt")


def test_lightning_ddp_estimates_are_those_of_one_process_on_all_inputs(tmp_path):
    fisher = FisherCallback("categorical", model="net", seed=0)
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        callbacks=[fisher, Saved(fisher, tmp_path)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(Classifier(), torch.utils.data.DataLoader(_data(), batch_size=8))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model = Classifier().net
    reference = FisherMonitor(model, "categorical")
    x, y = _data().tensors
    with reference:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    expected = reference.estimates()
    for saved in ranks:
        assert saved["num_inputs"] == INPUTS
        for name, value in expected.fisher("exact").items():
            torch.testing.assert_close(saved["exact"][name], value, rtol=1e-10, atol=0)
            assert torch.equal(saved["exact"][name], ranks[0]["exact"][name])
        for name, value in expected.variance("I1").items():  # label noise: deterministic
            torch.testing.assert_close(saved["var_I1"][name], value, rtol=1e-10, atol=0)
