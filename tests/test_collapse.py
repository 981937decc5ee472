"""Collapsed trials (one prediction for every validation image): detected, marked, never selected."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from medsweep.datasets import load_imagefolder
from medsweep.search.export import UNUSABLE, best_configs, rank_trials, trial_status
from medsweep.search.final import _candidates
from medsweep.search.study import LEADERBOARD_PARQUET
from medsweep.trainables.loop import LoopState, fit, is_better_epoch
from medsweep.trainables.methods import build_method
from medsweep.trainables.metrics import classification_metrics, prediction_collapsed
from medsweep.trainables.preload import preload
from medsweep.trainables.store_io import StoreIO


def test_one_predicted_class_for_every_image_is_a_collapse():
    one_class = np.array([[2.0, 0.1, 0.0], [3.0, 1.0, 0.5], [0.9, 0.8, 0.7]])
    assert prediction_collapsed(one_class, "multiclass")
    assert not prediction_collapsed(np.array([[2.0, 0.1], [0.0, 1.0]]), "multiclass")
    assert not prediction_collapsed(one_class[:1], "multiclass")  # one image says nothing


def test_a_multilabel_collapse_is_a_constant_score_per_label_not_an_all_negative_prediction():
    constant = np.tile([[-3.0, 0.5]], (4, 1))
    assert prediction_collapsed(constant, "multilabel")
    rare_label_still_ranked = np.array([[-3.0, 0.5], [-2.0, 0.4], [-4.0, 0.6], [-3.5, 0.1]])  # never > 0.5 on label 0
    assert not prediction_collapsed(rare_label_still_ranked, "multilabel")


def test_classification_metrics_flag_a_collapse():
    labels = np.array([0, 1, 2, 0])
    logits = np.array([[3.0, 1.0, 0.0], [2.0, 1.5, 0.0], [2.0, 0.0, 1.9], [5.0, 0.0, 0.0]])  # ranks, yet argmax is 0 everywhere
    metrics = classification_metrics(logits, labels, "multiclass")
    assert metrics["collapsed"] == 1.0 and metrics["auc"] > 0.5
    assert classification_metrics(np.eye(3)[labels] * 4, labels, "multiclass")["collapsed"] == 0.0
    assert math.isnan(classification_metrics(np.full((4, 3), np.nan), labels, "multiclass")["collapsed"])


@pytest.fixture(scope="module")
def identical_val_images(synthetic_root, tmp_path_factory):
    """The synthetic set with every validation image replaced by one of them: no model can tell them apart."""
    root = tmp_path_factory.mktemp("identical-val") / "data"
    shutil.copytree(synthetic_root, root)
    images = sorted((root / "val").rglob("*.png"))
    for image in images[1:]:
        shutil.copyfile(images[0], image)
    return load_imagefolder(root)


def test_a_trial_whose_best_epoch_predicts_one_class_reports_it(identical_val_images, tmp_path):
    spec = identical_val_images
    config = {"method": "linear", "backbone": "vit-tiny", "image_size": 64, "num_classes": spec.num_classes, "task": spec.task}
    store = preload(spec, build_method("linear", config), tmp_path / "cache").store
    io = StoreIO(store)
    fit({**config, "epochs": 2, "lr": 1e-2, "batch_size": 16}, io, tmp_path / "run")
    assert [r["val_collapsed"] for r in io.reports] == [1.0, 1.0]
    assert io.reports[-1]["best_collapsed"] == 1.0
    assert trial_status(None, io.reports[-1], max_epochs=2) == "collapsed"


def _row(trial_id: str, method: str, auc: float, status: str) -> dict:
    config = {"method": method, "lr": 0.01}
    return {"trial_id": trial_id, "method": method, "best_val_auc": auc, "status": status, "config_json": json.dumps(config)}


def test_a_collapsed_trial_is_never_a_best_or_a_final_candidate(synthetic_spec, tmp_path):
    board = pd.DataFrame(
        [
            _row("collapsed1", "linear", 0.99, "collapsed"),  # the highest AUC on the board
            _row("good00001", "linear", 0.90, "completed"),
            _row("fpt000001", "fpt_plus", 0.80, "stopped early"),
            _row("diverged1", "fpt_plus", 0.95, "diverged"),
        ]
    )
    assert "collapsed" in UNUSABLE
    entry = best_configs(board, synthetic_spec)[synthetic_spec.name]
    assert entry["best"]["trial_id"] == "good00001"
    assert {m: e["trial_id"] for m, e in entry["per_method"].items()} == {"linear": "good00001", "fpt_plus": "fpt000001"}
    only_collapsed = best_configs(board.iloc[[0, 2]], synthetic_spec)[synthetic_spec.name]
    assert only_collapsed["no_usable_trial"] == {"linear": "1 collapsed"} and list(only_collapsed["per_method"]) == ["fpt_plus"]
    board.to_parquet(tmp_path / LEADERBOARD_PARQUET)
    assert [c["trial_id"] for c in _candidates(tmp_path, entry, top=3)] == ["good00001", "fpt000001"]
    assert [c["trial_id"] for c in _candidates(tmp_path, entry, top=1)] == ["good00001"]


def test_trials_tied_on_auc_rank_the_same_whatever_order_tune_lists_them_in(synthetic_spec):
    """On a small validation set several trials reach the same AUC (often 1.0). Ranked by AUC alone they kept
    Tune's listing order, which a resume or an extension changes: best.yaml named another trial, and final ran
    again for an unchanged sweep. Ties go to the lower validation loss, then the trial id."""
    rows = [
        {**_row("cccc0003", "linear", 1.0, "completed"), "best_val_loss": 0.20},
        {**_row("aaaa0001", "linear", 0.9, "completed"), "best_val_loss": 0.10},
        {**_row("bbbb0002", "linear", 1.0, "completed"), "best_val_loss": 0.05},
        {**_row("dddd0004", "linear", 1.0, "completed"), "best_val_loss": 0.20},
        {**_row("eeee0005", "linear", float("nan"), "error"), "best_val_loss": float("nan")},
        {**_row("ffff0006", "linear", 1.0, "collapsed"), "best_val_loss": 0.01},  # never the answer: after the usable
    ]
    expected = ["bbbb0002", "cccc0003", "dddd0004", "aaaa0001", "ffff0006", "eeee0005"]
    for order in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [1, 5, 3, 0, 4, 2]):
        board = rank_trials(pd.DataFrame([rows[i] for i in order]))
        assert list(board["trial_id"]) == expected
        assert best_configs(board, synthetic_spec)[synthetic_spec.name]["best"]["trial_id"] == "bbbb0002"


def _epochs(*vals: tuple[float, float]) -> tuple[int, float]:
    """Run ``is_better_epoch`` over (auc, collapsed) epochs as the loop does; (best epoch, its AUC)."""
    state = LoopState()
    for epoch, (auc, collapsed) in enumerate(vals):
        if is_better_epoch({"auc": auc, "collapsed": collapsed}, state):
            state.best_auc, state.best_epoch, state.best_collapsed = auc, epoch, collapsed == 1.0
    return state.best_epoch, state.best_auc


def test_the_best_epoch_is_the_best_auc_among_epochs_that_did_not_collapse():
    assert _epochs((0.83, 1.0), (0.80, 0.0), (0.82, 0.0)) == (2, 0.82)  # a collapsed early peak is replaced
    assert _epochs((0.80, 0.0), (0.90, 1.0)) == (0, 0.80)  # a collapsed epoch never replaces a usable one
    assert _epochs((0.70, 1.0), (0.75, 1.0)) == (1, 0.75)  # all collapsed: the highest AUC (the trial is collapsed)
    assert _epochs((0.70, 0.0), (math.nan, math.nan), (0.72, 0.0)) == (2, 0.72)
