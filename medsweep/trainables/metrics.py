"""Validation and test metrics, as the works report them.

Multi-class: macro one-vs-rest AUC on softmax probabilities, accuracy, macro
F1/precision/recall and quadratic kappa (graded labels such as DR grades).
Multi-label: mean AUC over the labels that have both outcomes in the split
(NIH ChestX-ray14 style), on sigmoid probabilities. Both come from
:func:`~medsweep.trainables.statistics.probabilities`, as do the scores the
final answer's bootstrap resamples. The FPT paper's efficiency scores PPE and PME are
here too because the leaderboard ranks by them.

``collapsed`` (1.0 or 0.0) flags a model that tells no image from another: a
multi-class model whose predictions all fall in one class, or a multi-label
model whose score of every label is the same for every image. Its AUC may
still look fine (a ranking learnt in the last logit digits), so the sweep
never selects such a trial (see :mod:`medsweep.search.export`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, precision_score, recall_score, roc_auc_score

from medsweep.trainables.statistics import probabilities


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
    num_classes = logits.shape[1]
    probs = probabilities(logits, "multiclass")
    preds = probs.argmax(axis=1)
    present = np.unique(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(present) < 2:
            auc = float("nan")
        elif num_classes == 2:
            auc = float(roc_auc_score(labels, probs[:, 1]))
        else:
            # One-vs-rest per class present in this split, averaged (macro).
            aucs = [roc_auc_score(labels == c, probs[:, c]) for c in present]
            auc = float(np.mean(aucs))
        return {
            "auc": auc,
            "accuracy": float(accuracy_score(labels, preds)),
            "f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
            "precision": float(precision_score(labels, preds, average="macro", zero_division=0)),
            "recall": float(recall_score(labels, preds, average="macro", zero_division=0)),
            "kappa": float(cohen_kappa_score(labels, preds, weights="quadratic")) if len(present) > 1 else 0.0,
        }


def _multilabel(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    probs = probabilities(logits, "multilabel")
    aucs = [
        roc_auc_score(labels[:, c], probs[:, c])
        for c in range(labels.shape[1])
        if 0 < labels[:, c].sum() < len(labels)
    ]
    preds = (probs >= 0.5).astype(np.int64)
    return {
        "auc": float(np.mean(aucs)) if aucs else float("nan"),
        "accuracy": float((preds == labels).mean()),
        "f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
    }


def ppe(score: float, learnable_pct: float) -> float:
    """Performance-parameter efficiency (FPT paper): score * exp(-log10(r/100 + 1)), r in percent."""
    return score * math.exp(-math.log10(learnable_pct / 100 + 1))


def pme(score: float, memory: float, memory_full: float) -> float:
    """Performance-memory efficiency (FPT paper): score * exp(-log10(m/m_full + 1))."""
    return score * math.exp(-math.log10(memory / memory_full + 1))
