"""Metrics through `evaluate`: the shipped modules agree with scikit-learn and load with no network."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from transformers import EvalPrediction

from modeling_vptm.training.evaluation import DEFAULT_METRICS, compute_metrics, load_metric, shipped_metrics


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))


def test_shipped_metrics_cover_the_defaults():
    assert set(DEFAULT_METRICS) <= set(shipped_metrics())


@pytest.mark.parametrize("average", ["macro", "micro", "weighted"])
def test_f1_equals_scikit_learn(average):
    rng = np.random.default_rng(0)
    references = rng.integers(0, 6, 80)
    predictions = np.where(rng.random(80) < 0.5, references, rng.integers(0, 7, 80))  # label 6: predicted only
    f1 = load_metric("f1").compute(predictions=predictions, references=references, average=average)["f1"]
    assert f1 == pytest.approx(f1_score(references, predictions, average=average, zero_division=0))


def test_f1_binary_and_hand_computed():
    # pos_label 1: tp 1, fp 1, fn 1 -> precision 1/2, recall 1/2, f1 1/2
    assert load_metric("f1").compute(predictions=[1, 1, 0, 0], references=[1, 0, 1, 0])["f1"] == pytest.approx(0.5)
    # macro over {0, 1, 2}: label 0 f1 2/3, label 1 f1 2/3, label 2 never right -> 0; mean 4/9
    macro = load_metric("f1").compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 2], average="macro")["f1"]
    assert macro == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError, match="average must be"):
        load_metric("f1").compute(predictions=[0], references=[0], average="samples")


def test_compute_metrics_scores_argmax_predictions():
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(64, 10)), rng.integers(0, 10, 64)
    scores = compute_metrics()(EvalPrediction(predictions=(logits, logits[:, :3]), label_ids=labels))
    predicted = logits.argmax(-1)
    assert scores == pytest.approx(
        {"accuracy": accuracy_score(labels, predicted), "f1": f1_score(labels, predicted, average="macro")}
    )


def test_unknown_metric_offline_is_refused_by_name():
    with pytest.raises(ValueError, match=r"Cannot load the metric 'no_such_metric'.*accuracy, f1"):
        load_metric("no_such_metric")
    with pytest.raises(ValueError, match="at least one metric"):
        compute_metrics([])
