"""The memory budget of a collected step (``max_memory``) and the chunk sizes it allows.

The extra tensors of a collected step (label directions pulled back through the network,
per-input Jacobian products, curvature terms) are formed a chunk at a time: of inputs, of
directions and of curvature entries, so that their size stays within the budget whatever
the number of classes, the width, the depth or the batch size.
"""

from __future__ import annotations

import math
from typing import Optional

#: Live copies of a per-input or pulled-back tensor assumed by the memory estimates (the
#: tensor, its image under a layer and the temporaries of a term).
COPIES = 4

#: Default ``max_memory`` of ``FisherMonitor``: 1 GiB.
DEFAULT_MAX_MEMORY = 2**30


class Budget:
    """A number of bytes, handed out as counts of tensor entries.

    Args:
        max_memory: Bytes, or ``None`` for no bound (one chunk wherever possible).
    """

    def __init__(self, max_memory: Optional[float] = DEFAULT_MAX_MEMORY):
        self.max_memory = math.inf if max_memory is None else max_memory

    def entries(self, itemsize: int, share: float = 1.0) -> float:
        """Entries of ``itemsize`` bytes that fit in ``share`` of the budget."""
        return min(self.max_memory * share / itemsize, 2.0**62)

    def count(self, entries_each: float, itemsize: int, share: float = 1.0) -> int:
        """How many items of ``entries_each`` entries fit (at least one)."""
        return int(self.entries(itemsize, share) / max(1.0, entries_each)) or 1


def check_max_memory(max_memory) -> None:
    """``max_memory`` must be ``None`` or a positive number of bytes."""
    if max_memory is None:
        return
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)):
        raise TypeError(f"max_memory must be a number of bytes or None, got {max_memory!r}.")
    if not max_memory > 0:
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}.")
