"""One JSON line per collected step: the per-layer scalars of ``FisherEstimates``.

Schema of a line (``version`` 1)::

    {"version": 1, "step": collected steps so far, "backward": backward passes seen
     inside `with monitor:`, "inputs": inputs accumulated, "skipped": batches skipped,
     "time": seconds since the log was opened, "estimators": ["I1", ...],
     "granularity": where Î₁ squares the score, "target_rse": 0.05, "rse_bins": [bin edges],
     "layers": {layer path: FisherEstimates.layer_statistics() entry}}
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import IO, List, Union

from fimhooks.estimates import DEFAULT_TARGET, RSE_BINS

VERSION = 1


def log_record(estimates, step: int, backward: int, seconds: float, target: float) -> dict:
    """The JSON-ready record of one collected step."""
    return {
        "version": VERSION,
        "step": step,
        "backward": backward,
        "inputs": estimates.num_inputs,
        "skipped": estimates.skipped,
        "time": seconds,
        "estimators": list(estimates.estimators),
        "granularity": estimates.granularity,
        "target_rse": target,
        "rse_bins": RSE_BINS,
        "layers": _finite(estimates.layer_statistics(target)),
    }


class FisherLog:
    """Writes a record per collected step to a JSON-lines file and, optionally, TensorBoard.

    Created by ``FisherMonitor.log_to``; ``close()`` detaches it from the monitor. With
    ``target=None`` it writes nothing (ranks other than 0 under ``torch.distributed``).
    """

    def __init__(
        self, monitor, target: Union[str, Path, IO[str]], writer=None, target_rse=DEFAULT_TARGET
    ):
        self._monitor = monitor
        self._owns_file = isinstance(target, (str, Path))
        self._file = open(target, "w", encoding="utf-8") if self._owns_file else target
        self._writer = writer
        self._target = target_rse
        self._start = time.perf_counter()
        self.listening = None  # the monitor's handle, set by ``log_to``

    def __call__(self, monitor) -> None:
        """Log the monitor's state after a collected step."""
        record = log_record(
            monitor.live_estimates(),
            monitor.collected_steps,
            monitor.backward_passes,
            time.perf_counter() - self._start,
            self._target,
        )
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            _write_scalars(self._writer, record)

    def close(self) -> None:
        """Stop logging and close the file if this log opened it (also: ``remove()``)."""
        if self.listening is not None:
            self.listening.remove()
        if self._owns_file:
            self._file.close()

    remove = close


def read_log(path: Union[str, Path]) -> List[dict]:
    """Records of a JSON-lines log.

    A last line cut short (a run killed while writing) is left out with a warning; the
    intact records before it are returned.

    Raises:
        ValueError: if the file is missing, empty or not a fimhooks log, naming the line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"cannot read log {path}: {error.strerror or error}") from error
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if index == len(numbered) - 1 and records:
                warnings.warn(
                    f"{path}:{number}: the last record is cut short (the run was stopped "
                    f"while writing it); reading the {len(records)} records before it.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from error
        missing = [key for key in _REQUIRED if not isinstance(record, dict) or key not in record]
        if not isinstance(record, dict) or record.get("version") != VERSION or missing:
            raise ValueError(
                f"{path}:{number}: not a fimhooks log record (version {VERSION}"
                + (f"; missing {missing})" if isinstance(record, dict) and missing else ")")
            )
        records.append(record)
    if not records:
        raise ValueError(f"{path}: the log has no records")
    return records


#: Per-layer, per-estimator fields written as TensorBoard scalars (where present).
SCALARS = ("trace", "rse", "label_share", "bias", "bound_tightness")
#: Keys every record has (the report reads them).
_REQUIRED = ("version", "step", "estimators", "layers")


def _finite(value):
    """JSON has no infinity or NaN: they become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_scalars(writer, record: dict) -> None:
    for layer, stats in record["layers"].items():
        for e in record["estimators"]:
            for key in SCALARS:
                value = stats[e].get(key)
                if value is not None:
                    writer.add_scalar(
                        f"fimhooks/{layer or 'model'}/{e}/{key}", value, record["step"]
                    )
