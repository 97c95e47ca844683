"""PyTorch Lightning with a ``FisherCallback``: an MLP on scikit-learn's digits.

The callback starts a monitor when fitting starts, logs per-layer traces, relative
standard errors and label shares through the module's logger on collected steps, and
removes the monitor at the end.

Run: python examples/lightning_digits.py   (needs ``pip install lightning scikit-learn``)
"""

import lightning
import torch
from torch import nn

from fimhooks.integrations.lightning import FisherCallback
from fimhooks.show.demo import load


class DigitsClassifier(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def main():
    torch.manual_seed(0)
    x, y = load("digits")
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True
    )
    callback = FisherCallback("categorical", model="net", every=5, ema_decay=0.9)
    trainer = lightning.Trainer(
        max_epochs=3, callbacks=[callback], logger=False, enable_checkpointing=False
    )
    trainer.fit(DigitsClassifier(), data)
    print(callback.monitor.estimates().summary())


if __name__ == "__main__":
    main()
