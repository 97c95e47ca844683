"""The forward hooks: each forward pass of the model becomes a ``ForwardRecord``.

The ``Recorder`` sets the hooks, fills a record per call of the model, and hands the
record with its output gradient to a callback when the backward pass reaches the output.
It holds the records itself, never on the user's modules.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from fimhooks.engine import batchnorm as bn
from fimhooks.engine.handles import Hook
from fimhooks.engine.recording import ForwardRecord, model_output
from fimhooks.engine.structure import ModelStructure, structure_key


class Recorder:
    """Forward hooks on the model and its watched modules, set only while ``on``.

    Args:
        model: The network.
        output: Callable from the forward's return value to the output tensor, or ``None``.
        batchnorm: The monitor's ``batchnorm`` option.
        on_output_grad: A method, called ``(record, grad)`` when a backward pass reaches a recorded
            output (``record``: ``None`` once the recorder no longer holds it).

    Attributes:
        records: Forward passes held for their backward pass.
        keep_all: Hold every forward pass (inside a ``with`` block), not just the latest.
        busy: The monitor runs its own backward pass: nothing is recorded or handed on.
    """

    def __init__(self, model: nn.Module, output, batchnorm: str, on_output_grad: Callable):
        self.model, self._output_of, self._batchnorm = model, output, batchnorm
        self._on_output_grad = weakref.WeakMethod(on_output_grad)  # not keeping it alive
        self._structure: Optional[ModelStructure] = None
        self._handles, self._hooked = [], set()
        self._recording: Optional[ForwardRecord] = None
        self.records: List[ForwardRecord] = []
        self.keep_all = self.busy = False
        self._is_busy = functools.partial(_busy, weakref.ref(self))  # not keeping it alive

    def structure(self) -> ModelStructure:
        """Paths, parameter names and watched modules of the model as it is now."""
        if self._structure is None or self._structure.key != structure_key(self.model):
            self._structure = ModelStructure(self.model)
            if self._handles:
                self._hook_watched()
        return self._structure

    def set_hooks(self, on: bool) -> None:
        """Set the hooks (``on``) or remove them all."""
        if on and not self._handles:
            self.structure()
            start, finish = Hook(self, "_start_record"), Hook(self, "_finish_record")
            self._handles.append(self.model.register_forward_pre_hook(start))
            self._hook_watched()
            self._handles.append(self.model.register_forward_hook(finish))
        elif not on:
            for handle in self._handles:
                handle.remove()
            self._handles, self._hooked = [], set()

    def clear(self) -> None:
        """Forget the records held."""
        self.records, self._recording = [], None

    def _hook_watched(self) -> None:
        """Record hooks on the watched modules that have none yet."""
        record = Hook(self, "_record_call")
        for module in self._structure.watched:
            if id(module) not in self._hooked:
                self._hooked.add(id(module))
                self._handles.append(module.register_forward_hook(record, with_kwargs=True))

    def _start_record(self, module, args) -> None:
        # not while collecting (the generic rule may replay the model itself), nor inside a
        # torch.func transform of the user's (its tensors are not the model's batch)
        if torch.is_grad_enabled() and not self.busy and not _inside_transform():
            self.structure()  # layers added since the hooks were set get theirs now
            self._recording = ForwardRecord()

    def _record_call(self, module, args, kwargs, output) -> None:
        path = self._structure.paths.get(id(module))  # None: a layer taken out of the model
        if self._recording is None or path is None:
            return
        call = (args, kwargs, output)
        return bn.record(self._recording, module, path, call, self._batchnorm, self._is_busy)

    def _finish_record(self, module, args, output) -> None:
        record, self._recording = self._recording, None
        if record is None:
            return
        h = model_output(output, self._output_of)
        if not h.requires_grad:
            return
        record.output, record.output_version = h, h._version
        if not self.keep_all:
            self.records = []
        self.records.append(record)
        recorder, weak_record = weakref.ref(self), weakref.ref(record)
        h.register_hook(lambda grad: recorder() and recorder()._output_grad(weak_record(), grad))

    def _output_grad(self, record: Optional[ForwardRecord], grad: Tensor) -> None:
        callback = self._on_output_grad()
        if callback is not None and not self.busy:
            callback(record, grad)


def _inside_transform() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ...) is running."""
    return torch._C._functorch.maybe_current_level() is not None


def _busy(recorder: "weakref.ref[Recorder]") -> bool:
    """Whether the monitor runs its own backward pass now."""
    return recorder() is not None and recorder().busy
