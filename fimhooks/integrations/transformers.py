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

import functools
import warnings
from typing import Optional, Union

from torch import Tensor, nn

from fimhooks.integrations import StartedMonitor

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        "fimhooks.integrations.transformers needs transformers: pip install transformers accelerate"
    ) from error

_FIX = (
    "Is the Trainer's loss computed from the output of the model it was given (a "
    "compute_loss that calls a submodule is not), and does output= select a tensor the "
    "loss depends on (default: the forward's .logits)?"
)


class FisherCallback(TrainerCallback, StartedMonitor):
    """Attaches a started ``FisherMonitor`` for the length of ``trainer.train()``.

    Every backward pass of the trainer counts as one block (``every`` applies; with
    gradient accumulation, each micro-batch is one). On each log the trainer writes, the
    callback adds per-layer scalars of the collected steps: ``fisher/<layer>/<estimator>/
    trace``, ``.../rse`` and, with the exact pass, ``.../label_share``. The monitor is
    removed when training ends, and, with ``attach``, also when it raises;
    ``callback.monitor`` keeps its estimates.

    Padding is left out: where the model output has one observation per token (a
    language model's ``[N, T, V]`` logits), the ``attention_mask`` the model is called with
    (``decoder_attention_mask`` for an encoder-decoder) is the monitor's mask for that
    backward pass. An output with one observation per sequence (``[N, C]``) needs none.

    Args:
        likelihood: As for ``FisherMonitor``.
        attention_mask: ``False`` counts every position, padding included.
        **monitor_options: ``FisherMonitor`` options. ``output`` defaults to the forward's
            ``logits`` where it has them.
    """

    def __init__(
        self, likelihood: Union[str, nn.Module], *, attention_mask: bool = True, **monitor_options
    ):
        StartedMonitor.__init__(self, likelihood, {"output": _logits, **monitor_options})
        self.attention_mask = attention_mask
        self._class_axis = 1 if isinstance(likelihood, nn.CrossEntropyLoss) else -1
        self._mask_key = "attention_mask"
        self._warned_mask = False

    def attach(self, trainer) -> "FisherCallback":
        """Add this callback to ``trainer`` before its other callbacks.

        The trainer's reporting callbacks (TensorBoard, W&B, ...) then find the scalars in
        the logs they write. Passed as ``Trainer(callbacks=[...])`` instead, the callback
        comes after them, and only later callbacks see its scalars. ``attach`` also wraps
        ``trainer.train`` so that the monitor is removed when training raises (the
        ``Trainer`` tells no callback); passed in ``callbacks``, a monitor left by a failed
        run is removed at the next ``train()``.
        """
        trainer.callback_handler.callbacks.insert(0, self)
        train = trainer.train

        @functools.wraps(train)
        def train_and_remove(*args, **kwargs):
            try:
                return train(*args, **kwargs)
            finally:
                self.finish()

        trainer.train = train_and_remove
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: D102
        self.start_on(model)
        watched = self.monitor.model
        if self.attention_mask:
            encoder_decoder = getattr(getattr(watched, "config", None), "is_encoder_decoder", False)
            self._mask_key = "decoder_attention_mask" if encoder_decoder else "attention_mask"
            hook = watched.register_forward_hook(self._read_mask, with_kwargs=True)
            self._handles.append(hook)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        self.check_reached(_FIX)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        if logs is not None and self.monitor is not None:
            logs.update(self.scalars())

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
        self.finish()

    def _read_mask(self, module, args, kwargs, output) -> None:
        """The mask of the backward pass that follows this forward pass."""
        if self.monitor is None or self.monitor.removed:
            return
        h = self.monitor_options["output"](output)
        mask = kwargs.get(self._mask_key)
        self.monitor(mask=self._token_mask(mask, h) if isinstance(h, Tensor) else None)

    def _token_mask(self, mask: Optional[Tensor], h: Tensor) -> Optional[Tensor]:
        """``mask`` where it is shaped like the output's positions, else ``None``."""
        if mask is None or self.monitor.likelihood.name != "categorical" or h.dim() < 3:
            return None  # one observation per sequence: the model reads the mask itself
        axis = self._class_axis % h.dim()
        positions = tuple(s for i, s in enumerate(h.shape) if i != axis)
        if tuple(mask.shape) == positions:
            return mask
        if not self._warned_mask:
            self._warned_mask = True
            warnings.warn(
                f"fimhooks: the batch's {self._mask_key} has shape {tuple(mask.shape)}, the "
                f"model output's positions {positions}, so every position is counted, padding "
                "included; FisherCallback(..., attention_mask=False) counts them all silently.",
                RuntimeWarning,
                stacklevel=2,
            )
        return None


def _logits(output):
    return getattr(output, "logits", output)
