"""``Step``: the sums of one collected step, as they flow from the backends to the store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from fimhooks.fisher.diagonal_terms import BatchSums


@dataclass
class Step:
    """One collected step of one rank, or of all ranks after ``StepReducer.reduce``.

    Attributes:
        sums: ``{parameter name: BatchSums}`` of the step's inputs.
        num_inputs: Inputs of the step (observed positions' inputs).
        nonfinite: Whether an output or statistic was not finite (the step is skipped).
        num_outputs: Outputs per position (``C``), ``None`` where no batch was seen.
        positions: Positions per input of its outputs (``T``, padded; the most of its passes),
            ``0`` where no batch was seen; under ``torch.distributed`` the ranks' mean.
    """

    sums: Dict[str, BatchSums] = field(default_factory=dict)
    num_inputs: int = 0
    nonfinite: bool = False
    num_outputs: Optional[int] = None
    positions: float = 0

    def add(
        self, sums: Dict[str, BatchSums], num_inputs: int, num_outputs: int, positions: int
    ) -> None:
        """Add one backward pass's sums (a block may hold several)."""
        for name, value in sums.items():
            held = self.sums.get(name)
            self.sums[name] = value if held is None else held.add(value)
        self.num_inputs += num_inputs
        if num_inputs:
            self.num_outputs = num_outputs
            self.positions = max(self.positions, positions)

    @property
    def finite(self) -> bool:
        """Whether every sum of the step is finite (and no output was not)."""
        totals = [t for batch in self.sums.values() for t in batch.totals()]
        finite = not totals or bool(torch.isfinite(torch.stack(totals)).all())
        return finite and not self.nonfinite
