"""Class logits as answers: the k most probable labels with their softmax scores, as `pipeline("image-classification")`
gives them. numpy only, so that the exported runtimes without torch answer exactly as the package does.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(-1, keepdims=True)


def top_predictions(logits: np.ndarray, id2label: dict, k: int) -> list[list[dict]]:
    """Per row of class logits `(rows, labels)` (or one row), the k most probable labels with their softmax scores
    (as `pipeline` answers)."""
    probs = softmax(np.atleast_2d(np.asarray(logits, dtype=np.float64)))
    k = min(k, probs.shape[-1])
    answers = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        answers.append([{"label": id2label[int(i)], "score": float(row[i])} for i in order])
    return answers


__all__ = ["softmax", "top_predictions"]
