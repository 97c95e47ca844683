"""``FisherEstimates``: a detached snapshot of a monitor's running diagonal estimates."""

from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import Tensor

from fimhooks.running import ESTIMATORS, RunningDiagonal

Diagonal = Dict[str, Tensor]


class FisherEstimates:
    """Running diagonal estimates and their variances, keyed by parameter name.

    Every tensor is float64, shaped like its parameter, per observation (SPEC §1).

    Args:
        accumulators: ``{param name: RunningDiagonal}`` (owned by the snapshot).
        layer_of: ``{param name: module path}``.
        estimators: The estimators that were collected.
        exact_pass: Whether the closed-form (exact-pass) quantities were collected.
        skipped: Collected batches skipped for non-finite statistics.
    """

    def __init__(
        self,
        accumulators: Dict[str, RunningDiagonal],
        *,
        layer_of: Dict[str, str],
        estimators: tuple,
        exact_pass: bool,
        skipped: int = 0,
    ):
        self._acc = accumulators
        self._layer_of = layer_of
        self.estimators = tuple(estimators)
        self.exact_pass = exact_pass
        self.skipped = skipped

    @property
    def num_inputs(self) -> int:
        """Inputs accumulated so far."""
        return max((a.num_inputs for a in self._acc.values()), default=0)

    def fisher(self, estimator: str) -> Diagonal:
        """Running diagonal estimate ``{name: [*param.shape]}``."""
        self._check(estimator)
        return {n: a.fisher(estimator) for n, a in self._acc.items()}

    def variance(self, estimator: str) -> Diagonal:
        """Closed-form label-noise variance of the running estimate (SPEC §3, §5).

        Zero for ``"exact"``, which has no label noise.
        """
        self._check(estimator)
        if not self.exact_pass:
            raise ValueError(
                "the closed-form variance needs the exact pass: include 'exact' (or 'I2') "
                "in estimators; with estimators=('I1',) use empirical_variance('I1')."
            )
        return {n: a.label_variance(estimator) for n, a in self._acc.items()}

    def data_variance(self) -> Diagonal:
        """Data-noise variance of the running exact estimate (SPEC §4)."""
        if not self.exact_pass:
            raise ValueError("data_variance needs 'exact' or 'I2' in estimators.")
        self._check_collected()
        return {n: a.sample_variance("exact") for n, a in self._acc.items()}

    def empirical_variance(self, estimator: str) -> Diagonal:
        """Sample variance of the per-input summands over ``N`` (SPEC §4)."""
        self._check(estimator)
        return {n: a.sample_variance(estimator) for n, a in self._acc.items()}

    def summary(self) -> str:
        """Per-layer table: traces, relative standard errors, noise shares, zero v₂."""
        self._check_collected()
        rows = [self._layer_row(layer, names) for layer, names in self._layers().items()]
        header = ["layer", "params"]
        for e in self.estimators:
            header += [f"tr {e}", f"rse {e}"]
        if self.exact_pass and "I1" in self.estimators:
            header.append("label share I1")
        if "I2" in self.estimators:
            header += ["label share I2", "zero v2"]
        title = f"fimhooks: diagonal Fisher over {self.num_inputs} inputs" + (
            f", {self.skipped} batches skipped" if self.skipped else ""
        )
        return title + "\n" + _format_table(header, rows)

    def _layer_row(self, layer: str, names: List[str]) -> list:
        accs = [self._acc[n] for n in names]
        row = [layer or "<model>", sum(a.fisher(self.estimators[0]).numel() for a in accs)]
        noise = {}
        for e in self.estimators:
            fisher = torch.cat([a.fisher(e).flatten() for a in accs])
            label, total = self._total_and_label_variance(e, accs)
            noise[e] = (label, total)
            rse = total.sum().sqrt() / fisher.norm()
            row += [_fmt(fisher.sum().item()), _fmt(rse.item())]
        if self.exact_pass and "I1" in self.estimators:
            label, total = noise["I1"]
            row.append(_fmt((label.sum() / total.sum()).item()))
        if "I2" in self.estimators:
            label, total = noise["I2"]
            row.append(_fmt((label.sum() / total.sum()).item()))
            zero = torch.cat([(a.label_variance("I2") == 0).flatten() for a in accs])
            row.append(f"{int(zero.sum())}/{zero.numel()}")
        return row

    def _total_and_label_variance(self, estimator, accs):
        """Label and label+data variance (SPEC §4); empirical if no exact pass."""
        if not self.exact_pass:
            total = torch.cat([a.sample_variance(estimator).flatten() for a in accs])
            return torch.zeros_like(total), total
        label = torch.cat([a.label_variance(estimator).flatten() for a in accs])
        data = torch.cat([a.sample_variance("exact").flatten() for a in accs])
        return label, label + data

    def _layers(self) -> Dict[str, List[str]]:
        layers: Dict[str, List[str]] = {}
        for name, layer in self._layer_of.items():  # model order
            if name in self._acc:
                layers.setdefault(layer, []).append(name)
        return layers

    def _check(self, estimator: str) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose from {ESTIMATORS}.")
        if estimator not in self.estimators:
            raise ValueError(
                f"{estimator!r} was not collected; the monitor computes {self.estimators}."
            )
        self._check_collected()

    def _check_collected(self) -> None:
        if not self._acc:
            raise RuntimeError("no batch has been collected yet.")

    def __repr__(self) -> str:
        return (
            f"FisherEstimates(estimators={self.estimators}, num_inputs={self.num_inputs}, "
            f"parameters={len(self._acc)}, skipped={self.skipped})"
        )


def _fmt(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3g}"


def _format_table(header: list, rows: list) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
