"""``FisherCallback`` for the Hugging Face ``Trainer``.

::

    callback = FisherCallback("categorical", estimators=("I1", "exact"))
    trainer = Trainer(model, args, train_dataset=...)
    callback.attach(trainer)  # ahead of the reporting callbacks, so they log its scalars
    trainer.train()
    print(callback.monitor.estimates().summary())

Needs ``pip install transformers accelerate``.
"""

from __future__ import annotations

from typing import Union

from torch import nn

from fimhooks.integrations import StartedMonitor

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        "fimhooks.integrations.transformers needs transformers: pip install transformers accelerate"
    ) from error


class FisherCallback(TrainerCallback, StartedMonitor):
    """Attaches a started ``FisherMonitor`` for the length of ``trainer.train()``.

    Every backward pass of the trainer counts as one block (``every`` applies; with
    gradient accumulation, each micro-batch is one). On each log the trainer writes, the
    callback adds per-layer scalars of the collected steps: ``fisher/<layer>/<estimator>/
    trace``, ``.../rse`` and, with the exact pass, ``.../label_share``. The monitor is
    removed when training ends; ``callback.monitor`` keeps its estimates.

    Args:
        likelihood: As for ``FisherMonitor``.
        **monitor_options: ``FisherMonitor`` options. ``output`` defaults to the forward's
            ``logits`` where it has them.
    """

    def __init__(self, likelihood: Union[str, nn.Module], **monitor_options):
        StartedMonitor.__init__(self, likelihood, {"output": _logits, **monitor_options})

    def attach(self, trainer) -> "FisherCallback":
        """Add this callback to ``trainer`` before its other callbacks.

        The trainer's reporting callbacks (TensorBoard, W&B, ...) then find the scalars in
        the logs they write. Passed as ``Trainer(callbacks=[...])`` instead, the callback
        comes after them, and only later callbacks see its scalars.
        """
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: D102
        self.start_on(model)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        if logs is not None and self.monitor is not None:
            logs.update(self.scalars())

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
        self.finish()


def _logits(output):
    return getattr(output, "logits", output)
