"""F1 as an `evaluate` metric module that ships with vptm, so evaluation needs no network.

Loaded by path through `evaluate.load`; it has the inputs, options and output key of the Hub's `f1` metric
(`average` = "macro" | "micro" | "weighted" | "binary", `labels`, `pos_label`) with scikit-learn's conventions:
labels are those seen in references or predictions, and a label with no true or predicted example scores 0.
"""

import datasets
import evaluate
import numpy as np


class F1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Harmonic mean of precision and recall, per label, averaged as asked.",
            citation="",
            inputs_description="predictions, references: class indices; average, labels, pos_label as scikit-learn.",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, average="binary", labels=None, pos_label=1) -> dict:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if average == "binary":
            labels = [pos_label]
        elif labels is None:
            labels = np.union1d(predictions, references)
        labels = np.asarray(labels)
        true_pos = np.array([np.sum((predictions == c) & (references == c)) for c in labels], dtype=np.float64)
        predicted = np.array([np.sum(predictions == c) for c in labels], dtype=np.float64)
        actual = np.array([np.sum(references == c) for c in labels], dtype=np.float64)
        if average == "micro":
            denominator = predicted.sum() + actual.sum()
            return {"f1": float(2 * true_pos.sum() / denominator) if denominator else 0.0}
        denominator = predicted + actual
        per_label = np.divide(2 * true_pos, denominator, out=np.zeros_like(true_pos), where=denominator > 0)
        if average in ("binary", "macro"):
            return {"f1": float(per_label.mean())}
        if average == "weighted":
            return {"f1": float(np.average(per_label, weights=actual)) if actual.sum() else 0.0}
        if average is None:
            return {"f1": per_label.tolist()}
        raise ValueError(f"average must be 'binary', 'micro', 'macro', 'weighted' or None, got {average!r}")
