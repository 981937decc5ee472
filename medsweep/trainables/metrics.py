"""Validation and test metrics, as the works report them.

Multi-class: macro one-vs-rest AUC on softmax probabilities, accuracy, macro
F1/precision/recall and quadratic kappa (graded labels such as DR grades).
Multi-label: mean AUC over the labels that have both outcomes in the split
(NIH ChestX-ray14 style), on sigmoid probabilities. Both come from
:func:`~medsweep.trainables.statistics.probabilities`, as do the scores the
final answer's bootstrap resamples. The FPT paper's efficiency scores PPE and PME are
here too because the leaderboard ranks by them.

The scores are computed in numpy, equal to scikit-learn's (``roc_auc_score``,
``f1_score``/``precision_score``/``recall_score`` with ``average="macro",
zero_division=0``, ``cohen_kappa_score(weights="quadratic")``; the tests compare
them): every trial process computes metrics, and importing scikit-learn (with
SciPy) cost each of them about a second of CPU at start-up.

``collapsed`` (1.0 or 0.0) flags a model that tells no image from another: a
multi-class model whose predictions all fall in one class, or a multi-label
model whose score of every label is the same for every image. Its AUC may
still look fine (a ranking learnt in the last logit digits), so the sweep
never selects such a trial (see :mod:`medsweep.search.export`).
"""

from __future__ import annotations

import math

import numpy as np

from medsweep.trainables.statistics import probabilities, resampled_auc


def classification_metrics(logits: np.ndarray, labels: np.ndarray, task: str) -> dict[str, float]:
    """Metrics of ``logits`` [N, C] against ``labels`` ([N] class ids or [N, C] 0/1).

    Non-finite logits (a diverged model) give NaN metrics rather than an error.
    """
    if not np.isfinite(logits).all():
        names = ("auc", "accuracy", "f1") if task == "multilabel" else ("auc", "accuracy", "f1", "precision", "recall", "kappa")
        return {**{name: float("nan") for name in names}, "collapsed": float("nan")}
    metrics = _multilabel(logits, labels) if task == "multilabel" else _multiclass(logits, labels.astype(np.int64))
    return {**metrics, "collapsed": float(prediction_collapsed(logits, task))}


# Multi-label scores closer than this across every image count as one constant prediction.
CONSTANT_SCORE_SPREAD = 1e-6


def prediction_collapsed(logits: np.ndarray, task: str) -> bool:
    """Whether ``logits`` [N, C] of N > 1 images predict the same for every image.

    Multi-class: every argmax is one class. Multi-label: every label's
    probability spans less than ``CONSTANT_SCORE_SPREAD`` over the images (a
    rare label predicted absent everywhere is fine as long as its scores still
    rank the images, so the thresholded predictions are not the test).
    """
    if len(logits) < 2:
        return False
    if task == "multilabel":
        probs = probabilities(logits, "multilabel")
        return bool((np.ptp(probs, axis=0) < CONSTANT_SCORE_SPREAD).all())
    return len(np.unique(logits.argmax(axis=1))) == 1


def _multiclass(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    probs = probabilities(logits, "multiclass")
    preds = probs.argmax(axis=1)
    classes = np.union1d(labels, preds)  # scikit-learn's labels: those in either
    truth, predicted = labels[:, None] == classes, preds[:, None] == classes
    precision, recall, f1 = _per_class_scores(truth, predicted)
    return {
        "auc": _macro_auc(probs, labels, "multiclass"),
        "accuracy": float((preds == labels).mean()),
        "f1": float(f1.mean()),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "kappa": quadratic_kappa(labels, preds) if len(np.unique(labels)) > 1 else 0.0,
    }


def _multilabel(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    probs = probabilities(logits, "multilabel")
    preds = (probs >= 0.5).astype(np.int64)
    _, _, f1 = _per_class_scores(labels == 1, preds == 1)
    return {
        "auc": _macro_auc(probs, labels, "multilabel"),
        "accuracy": float((preds == labels).mean()),
        "f1": float(f1.mean()),
    }


def _macro_auc(probs: np.ndarray, labels: np.ndarray, task: str) -> float:
    """Mean one-vs-rest (multi-class) or per-label AUC over the classes with both outcomes (NaN when none has),
    ties counted half: the bootstrap's own AUC (:func:`~medsweep.trainables.statistics.resampled_auc`) of the
    images drawn once each, so the reported metric and its confidence interval are one computation."""
    return float(resampled_auc(probs, labels, task, np.ones((1, len(labels)), dtype=np.int64))[0])


def _per_class_scores(truth: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of the boolean [N, C] ``truth`` and ``predicted``: precision, recall and F1, 0 where undefined."""
    tp = (truth & predicted).sum(axis=0).astype(np.float64)
    fp = (~truth & predicted).sum(axis=0)
    fn = (truth & ~predicted).sum(axis=0)

    def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)

    return ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(2 * tp, 2 * tp + fp + fn)


def quadratic_kappa(labels: np.ndarray, preds: np.ndarray) -> float:
    """Cohen's kappa with quadratic weights over the classes in either array, weighted by their index
    among those classes (as scikit-learn weighs them); NaN when the expected disagreement is zero."""
    classes, index = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    k = len(classes)
    observed = np.zeros((k, k))
    np.add.at(observed, (index[: len(labels)], index[len(labels) :]), 1)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
    weights = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2
    disagreement = (weights * expected).sum()
    return float(1 - (weights * observed).sum() / disagreement) if disagreement else float("nan")


def ppe(score: float, learnable_pct: float) -> float:
    """Performance-parameter efficiency (FPT paper): score * exp(-log10(r/100 + 1)), r in percent."""
    return score * math.exp(-math.log10(learnable_pct / 100 + 1))


def pme(score: float, memory: float, memory_full: float) -> float:
    """Performance-memory efficiency (FPT paper): score * exp(-log10(m/m_full + 1))."""
    return score * math.exp(-math.log10(memory / memory_full + 1))
