"""Classification metrics through `evaluate`: the ones vptm ships load offline, any other name from the Hub.

`compute_metrics(["accuracy", "f1"])` returns the function `Trainer(compute_metrics=...)` takes. F1, precision
and recall are macro-averaged over the classes (the usual choice for multi-class accuracy tables).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np


SHIPPED_METRICS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics")
DEFAULT_METRICS = ("accuracy", "f1")
# metrics whose Hub version averages over classes: ask for the macro average, as for a multi-class table
MACRO_AVERAGED = {"f1", "precision", "recall"}


def shipped_metrics() -> list[str]:
    return sorted(name[:-3] for name in os.listdir(SHIPPED_METRICS_DIR) if name.endswith(".py"))


def load_metric(name: str):
    """The `evaluate` module for `name`: the copy shipped with vptm when there is one (no network), else
    `evaluate.load(name)` (the Hub's metric, or a local path)."""
    import evaluate

    shipped = os.path.join(SHIPPED_METRICS_DIR, f"{name}.py")
    try:
        return evaluate.load(shipped if os.path.isfile(shipped) else name)
    except Exception as error:  # evaluate raises several types (FileNotFoundError, ConnectionError, ...)
        raise ValueError(
            f"Cannot load the metric {name!r}: it is not one that vptm ships ({', '.join(shipped_metrics())}) and "
            f"`evaluate.load({name!r})` failed ({type(error).__name__}: {str(error).rstrip('.')}). Other metrics come "
            "from the Hub, so they need a network connection the first time."
        ) from error


def compute_metrics(names: Sequence[str] = DEFAULT_METRICS) -> Callable[..., dict[str, float]]:
    """A `Trainer` `compute_metrics` function that scores argmax predictions with each named metric."""
    if not names:
        raise ValueError("compute_metrics needs at least one metric name, got none")
    modules = {name: load_metric(name) for name in names}

    def compute(prediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = np.argmax(logits, axis=-1)
        scores: dict[str, float] = {}
        for name, module in modules.items():
            options = {"average": "macro"} if name in MACRO_AVERAGED else {}
            scores.update(module.compute(predictions=predicted, references=prediction.label_ids, **options))
        return scores

    return compute


__all__ = [
    "DEFAULT_METRICS",
    "compute_metrics",
    "load_metric",
    "shipped_metrics",
]
