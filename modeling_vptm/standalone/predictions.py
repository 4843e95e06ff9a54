"""Class logits as answers: the k most probable labels with their softmax scores, as `pipeline("image-classification")`
gives them. numpy only, so that the exported runtimes without torch answer exactly as the package does.
"""

from __future__ import annotations

import json

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(-1, keepdims=True)


def top_predictions(logits: np.ndarray, id2label: dict, k: int) -> list[list[dict]]:
    """Per row of class logits, the k most probable labels with their softmax scores (as `pipeline` answers)."""
    probs = softmax(np.atleast_2d(logits))
    k = min(k, probs.shape[-1])
    answers = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        answers.append([{"label": id2label[int(i)], "score": float(row[i])} for i in order])
    return answers


def format_top(top: list[dict]) -> str:
    return "\t".join(f"{p['label']}={p['score']:.4f}" for p in top)


def write_jsonl(path: str | None, rows: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


__all__ = ["format_top", "softmax", "top_predictions", "write_jsonl"]
