"""The validation and test metrics, computed in numpy, equal scikit-learn's (which the package no longer imports:
``test_layering.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, precision_score, recall_score, roc_auc_score

from medsweep.trainables.metrics import classification_metrics, quadratic_kappa
from medsweep.trainables.statistics import probabilities


def _sklearn_multiclass(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """What the metrics were when scikit-learn computed them (the code this module replaced)."""
    probs = probabilities(logits, "multiclass")
    preds = probs.argmax(axis=1)
    present = np.unique(labels)
    if len(present) < 2:
        auc = float("nan")
    elif logits.shape[1] == 2:
        auc = roc_auc_score(labels, probs[:, 1])
    else:
        auc = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present])
    return {
        "auc": auc,
        "accuracy": accuracy_score(labels, preds),
        "f1": f1_score(labels, preds, average="macro", zero_division=0),
        "precision": precision_score(labels, preds, average="macro", zero_division=0),
        "recall": recall_score(labels, preds, average="macro", zero_division=0),
        "kappa": cohen_kappa_score(labels, preds, weights="quadratic") if len(present) > 1 else 0.0,
    }


def _cases(classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 80))
    labels = rng.integers(0, classes, n)
    if seed % 4 == 0:
        labels = np.where(labels == classes - 1, 0, labels)  # a class missing from the split
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += rng.uniform(0, 3)  # some signal
    if seed % 3 == 0:
        logits = np.round(logits, 0)  # many tied scores
    if seed % 5 == 0:
        logits[:, 0] += 10  # every prediction one class
    return logits, labels


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_multiclass_metrics_equal_scikit_learns(classes):
    for seed in range(60):
        logits, labels = _cases(classes, seed)
        got = classification_metrics(logits, labels, "multiclass")
        expected = _sklearn_multiclass(logits, labels)
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, abs=1e-12, nan_ok=True), (seed, name)


def test_multilabel_metrics_equal_scikit_learns():
    for seed in range(60):
        rng = np.random.default_rng(seed)
        n, labels_count = int(rng.integers(2, 60)), int(rng.integers(2, 6))  # one column would be a binary task to scikit-learn
        labels = (rng.random((n, labels_count)) < rng.uniform(0.05, 0.6)).astype(np.int64)
        logits = np.round(rng.normal(size=(n, labels_count)) + 2 * labels - 1, int(seed % 2))
        got = classification_metrics(logits, labels, "multilabel")
        probs = probabilities(logits, "multilabel")
        aucs = [roc_auc_score(labels[:, c], probs[:, c]) for c in range(labels_count) if 0 < labels[:, c].sum() < n]
        preds = (probs >= 0.5).astype(np.int64)
        assert got["auc"] == pytest.approx(np.mean(aucs) if aucs else float("nan"), abs=1e-12, nan_ok=True), seed
        assert got["f1"] == pytest.approx(f1_score(labels, preds, average="macro", zero_division=0), abs=1e-12), seed
        assert got["accuracy"] == pytest.approx(float((preds == labels).mean())), seed


def test_quadratic_kappa_weighs_by_class_index_among_the_classes_seen():
    """Grades 0, 2 and 4 only: scikit-learn weighs a 0-vs-4 disagreement by index distance 2, not 4."""
    labels, preds = np.array([0, 2, 4, 4, 2, 0]), np.array([0, 4, 4, 2, 2, 2])
    assert quadratic_kappa(labels, preds) == pytest.approx(cohen_kappa_score(labels, preds, weights="quadratic"), abs=1e-12)
    assert quadratic_kappa(labels, labels) == 1.0
