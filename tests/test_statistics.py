"""The final answer's statistics, torch-free: probabilities from logits, the vectorised AUC, the bootstrap CI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from medsweep.trainables.metrics import classification_metrics
from medsweep.trainables.statistics import bootstrap_auc_ci, probabilities, resampled_auc


def _labels(n: int = 60, classes: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def _logits(labels: np.ndarray, seed: int, classes: int = 3, signal: float = 1.5) -> np.ndarray:
    """Logits that carry some signal about ``labels`` (AUC well above 0.5, below 1), one model per seed."""
    logits = np.random.default_rng(100 + seed).normal(size=(len(labels), classes))
    logits[np.arange(len(labels)), labels] += signal
    return logits


# ------------------------------------------------------------------ bootstrap (moved from test_final.py, unchanged)


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_resample_counts_give_the_auc_of_the_resampled_images(task):
    rng = np.random.default_rng(4)
    if task == "multilabel":
        labels = (rng.random((40, 3)) < 0.4).astype(np.float32)
        logits = np.round(rng.normal(size=(40, 3)) + labels, 1)
    else:
        labels = _labels(n=40)
        logits = np.round(_logits(labels, 1), 1)
    index = rng.integers(0, 40, size=(5, 40))
    counts = np.stack([np.bincount(row, minlength=40) for row in index])
    got = resampled_auc(probabilities(logits, task), labels, task, counts)
    expected = [classification_metrics(logits[row], labels[row], task)["auc"] for row in index]
    assert got == pytest.approx(expected, abs=1e-12)


def test_vectorised_auc_matches_for_multilabel_and_skips_one_outcome_labels():
    rng = np.random.default_rng(2)
    labels = (rng.random((50, 4)) < 0.4).astype(np.float32)
    labels[:, 3] = 0  # no positive: left out, as in the metric
    logits = rng.normal(size=(50, 4)) + labels
    expected = classification_metrics(logits, labels, "multilabel")["auc"]
    got = resampled_auc(probabilities(logits, "multilabel"), labels, "multilabel", np.ones((1, 50), dtype=int))
    assert got[0] == pytest.approx(expected, abs=1e-12)


def test_bootstrap_ci_covers_the_mean_over_seeds_and_is_deterministic():
    labels = _labels()
    logits = [_logits(labels, seed) for seed in range(3)]
    probs = [probabilities(x, "multiclass") for x in logits]
    point = np.mean([classification_metrics(x, labels, "multiclass")["auc"] for x in logits])

    first = bootstrap_auc_ci(probs, labels, "multiclass", seed=7)
    again = bootstrap_auc_ci(probs, labels, "multiclass", seed=7)
    other = bootstrap_auc_ci(probs, labels, "multiclass", seed=8)

    assert first == again
    assert (first["low"], first["high"]) != (other["low"], other["high"])
    assert first["point"] == pytest.approx(point)
    assert first["low"] < first["point"] < first["high"]
    assert first["low"] > 0.5 and first["high"] < 1.0
    assert first["resamples_used"] == first["resamples"] == 1000


def test_bootstrap_ci_narrows_with_more_test_images():
    def width(n: int) -> float:
        labels = _labels(n=n)
        ci = bootstrap_auc_ci([probabilities(_logits(labels, 0), "multiclass")], labels, "multiclass", resamples=300)
        return ci["high"] - ci["low"]

    assert width(800) < width(50) / 2


def test_bootstrap_ci_of_multilabel_scores_contains_its_point_and_repeats_per_seed():
    rng = np.random.default_rng(3)
    labels = (rng.random((80, 4)) < 0.3).astype(np.float32)
    probs = [probabilities(rng.normal(size=(80, 4)) + 1.2 * labels, "multilabel") for _ in range(2)]
    first = bootstrap_auc_ci(probs, labels, "multilabel", resamples=200, seed=5)
    assert first["low"] < first["point"] < first["high"]
    assert bootstrap_auc_ci(probs, labels, "multilabel", resamples=200, seed=5) == first
    other = bootstrap_auc_ci(probs, labels, "multilabel", resamples=200, seed=6)
    assert (other["low"], other["high"]) != (first["low"], first["high"]) and other["point"] == first["point"]


def test_bootstrap_ci_needs_a_seed():
    with pytest.raises(ValueError, match="at least one seed"):
        bootstrap_auc_ci([], _labels(), "multiclass")


# ------------------------------------------------------------------ probabilities


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_probabilities_match_torch(task):
    logits = np.random.default_rng(0).normal(scale=4.0, size=(32, 5)).astype(np.float32)
    logits[0] = [80.0, -80.0, 0.0, 30.0, -30.0]  # large logits: the max shift keeps the softmax finite
    expected = torch.from_numpy(logits).double()
    expected = torch.sigmoid(expected) if task == "multilabel" else torch.softmax(expected, dim=1)
    got = probabilities(logits, task)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-12, atol=1e-300)


def test_statistics_import_neither_torch_nor_ray():
    code = (
        "import sys; import medsweep.trainables.statistics, medsweep.trainables.metrics; "
        "heavy = sorted(m for m in ('torch', 'ray') if m in sys.modules); print(heavy); sys.exit(bool(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
