"""A tqdm progress bar over training that shows the running Fisher estimates."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(monitor, iterable: Iterable[T], **tqdm_options) -> Iterator[T]:
    """Yield from ``iterable`` under a tqdm bar; refresh its postfix on collected steps.

    The postfix shows the trace of each estimate (summed over layers) and the worst
    relative standard error among layers, with that layer's module path: ``worst rse:
    0.52 in layer 0`` for ``model[0]`` (``in the model`` where the model is one layer).
    """
    bar = tqdm(iterable, **{"desc": "fimhooks", **tqdm_options})
    seen = monitor.collected_steps
    for item in bar:
        yield item
        if monitor.collected_steps != seen and not bar.disable:
            seen = monitor.collected_steps
            bar.set_postfix(postfix(monitor.live_estimates()), refresh=False)


def postfix(estimates) -> dict:
    """``{"tr I1": ..., "worst rse": "0.12 in layer 0"}`` from a ``FisherEstimates``."""
    layers = estimates.layer_statistics()
    values = {}
    for e in estimates.estimators:
        values[f"tr {e}"] = f"{sum(s[e]['trace'] for s in layers.values()):.3g}"
    worst_layer, worst = max(
        ((layer, max(s[e]["rse"] for e in estimates.estimators)) for layer, s in layers.items()),
        key=lambda pair: pair[1],
    )
    where = f"layer {worst_layer}" if worst_layer else "the model"
    values["worst rse"] = f"{worst:.2g} in {where}"
    return values
