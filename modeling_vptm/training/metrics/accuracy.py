"""Accuracy as an `evaluate` metric module that ships with vptm, so evaluation needs no network.

Loaded by path through `evaluate.load`; it has the inputs and output key of the Hub's `accuracy` metric
(`predictions`, `references`, optional `sample_weight` → `{"accuracy": ...}`).
"""

import datasets
import evaluate
import numpy as np


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their reference label.",
            citation="",
            inputs_description="predictions, references: class indices; sample_weight: optional per-example weights.",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, sample_weight=None) -> dict:
        correct = np.asarray(predictions) == np.asarray(references)
        return {"accuracy": float(np.average(correct, weights=sample_weight)) if len(correct) else float("nan")}
