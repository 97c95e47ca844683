"""``FisherCallback`` for PyTorch Lightning.

::

    callback = FisherCallback("categorical", model="net", estimators=("I1", "exact"))
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
    ``.../label_share``. The monitor is removed when fitting ends or raises;
    ``callback.monitor`` keeps its estimates. If the first training batch runs a backward
    pass that does not go through the watched network's output (``training_step`` calls
    ``self.net(x)`` while ``model`` names the LightningModule), a ``RuntimeWarning`` says
    so.

    Args:
        likelihood: As for ``FisherMonitor``.
        model: Attribute path of the network inside the LightningModule whose output the
            loss is computed from (default: the LightningModule itself, whose forward
            ``training_step`` must then call as ``self(x)``).
        **monitor_options: ``FisherMonitor`` options.
    """

    def __init__(self, likelihood: Union[str, nn.Module], *, model: str = "", **monitor_options):
        StartedMonitor.__init__(self, likelihood, monitor_options)
        self.model_path = model
        self._logged = self._backward_passes = 0

    def on_fit_start(self, trainer, pl_module):  # noqa: D102
        self.start_on(pl_module.get_submodule(self.model_path))
        self._logged = self._backward_passes = 0

    def on_after_backward(self, trainer, pl_module):  # noqa: D102
        self._backward_passes += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        if self._backward_passes:
            self.check_reached(self._fix(pl_module))
        if self.monitor is not None and self.monitor.collected_steps > self._logged:
            self._logged = self.monitor.collected_steps
            pl_module.log_dict(self.scalars(), on_step=True, on_epoch=False)

    def on_fit_end(self, trainer, pl_module):  # noqa: D102
        self.finish()

    def on_exception(self, trainer, pl_module, exception):  # noqa: D102
        self.finish()

    def _fix(self, pl_module) -> str:
        """The ``model=`` to pass: the LightningModule's children that hold parameters."""
        named = [n for n, m in pl_module.named_children() if next(m.parameters(), None) is not None]
        names = [n for n in named if n != self.model_path]
        example = names[0] if len(names) == 1 else "<network>"
        where = f" (its networks: {', '.join(names)})" if len(names) > 1 else ""
        return (
            "Name the network that training_step computes the loss from with "
            f'FisherCallback(..., model="{example}"){where}.'
        )
