"""The handles the monitor gives out: its ``with`` blocks, listeners and module hooks."""

from __future__ import annotations

import weakref
from typing import Callable, Optional

from torch import Tensor


class Block:
    """A ``with monitor(mask=...):`` block: the monitor's own, with its options."""

    def __init__(self, enter: Callable, exit: Callable, mask: Optional[Tensor]):
        self._enter, self._exit, self._mask = enter, exit, mask

    def __enter__(self) -> object:
        return self._enter(self._mask)

    def __exit__(self, exc_type, exc, tb) -> bool:
        return self._exit(exc_type, exc, tb)


class Listening:
    """The handle of ``add_listener``: ``remove()`` stops the calls."""

    def __init__(self, listeners: list, listener: Callable):
        self._listeners, self._listener = listeners, listener

    def remove(self) -> None:
        """Stop calling the listener."""
        if self._listener in self._listeners:
            self._listeners.remove(self._listener)


class Hook:
    """Calls a method of the monitor, which it does not keep alive.

    Copies of the model (``copy.deepcopy``, ``torch.save``) get an inert hook instead: they
    are not watched, and carry no hidden copy of the monitor.
    """

    def __init__(self, monitor, method: str):
        self._monitor, self._method = weakref.ref(monitor), method

    def __call__(self, *args, **kwargs):
        """The monitor's method, or nothing once the monitor is gone."""
        monitor = self._monitor()
        return None if monitor is None else getattr(monitor, self._method)(*args, **kwargs)

    def __deepcopy__(self, memo) -> "Inert":
        return Inert()

    def __reduce__(self):
        return (Inert, ())


class Inert:
    """The hook a copy of a watched model carries: it does nothing."""

    def __call__(self, *args, **kwargs) -> None:
        """Nothing."""
        return None
