"""``FisherCallback`` for PyTorch Lightning.

::

    callback = FisherCallback("categorical", estimators=("I1", "exact"))
    trainer = lightning.Trainer(callbacks=[callback], ...)
    trainer.fit(module, data)
    print(callback.monitor.estimates().summary())

Needs ``pip install lightning``.
"""

from __future__ import annotations

from typing import Union

from torch import nn

from fimhooks.integrations import StartedMonitor

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        "fimhooks.integrations.lightning needs lightning: pip install lightning"
    ) from error


class FisherCallback(Callback, StartedMonitor):
    """Attaches a started ``FisherMonitor`` to the LightningModule for ``trainer.fit``.

    Every backward pass counts as one block (``every`` applies). After each collected
    step the callback logs, through the module's logger, per-layer scalars:
    ``fisher/<layer>/<estimator>/trace``, ``.../rse`` and, with the exact pass,
    ``.../label_share``. The monitor is removed when fitting ends; ``callback.monitor``
    keeps its estimates.

    Args:
        likelihood: As for ``FisherMonitor``.
        model: Attribute path of the network inside the LightningModule (default: the
            LightningModule itself).
        **monitor_options: ``FisherMonitor`` options.
    """

    def __init__(self, likelihood: Union[str, nn.Module], *, model: str = "", **monitor_options):
        StartedMonitor.__init__(self, likelihood, monitor_options)
        self.model_path = model
        self._logged = 0

    def on_fit_start(self, trainer, pl_module):  # noqa: D102
        self.start_on(pl_module.get_submodule(self.model_path))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        if self.monitor is not None and self.monitor.collected_steps > self._logged:
            self._logged = self.monitor.collected_steps
            pl_module.log_dict(self.scalars(), on_step=True, on_epoch=False)

    def on_fit_end(self, trainer, pl_module):  # noqa: D102
        self.finish()
