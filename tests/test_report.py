"""The sweep report: the Pareto front, and the page with its plots on a hand-made sweep folder (no Ray)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from medsweep.errors import ConfigError
from medsweep.search.report import learning_curves, pareto_front, write_report
from medsweep.search.study import PARETO_CSV, REPORT_DIR, STUDY_FILE, STUDY_NAME

NAN = float("nan")


# ------------------------------------------------------------------ Pareto front


def test_pareto_front_keeps_non_dominated_points_and_ties():
    points = [  # (AUC to maximise, cost to minimise)
        (0.90, 10.0),  # on: nothing has >= AUC at <= cost except its twin
        (0.80, 1.0),  # on: the cheapest at this AUC
        (0.80, 5.0),  # dominated by (0.80, 1.0): same AUC, dearer
        (0.90, 10.0),  # on: an exact tie dominates neither
        (0.70, 1.0),  # dominated by (0.80, 1.0): same cost, lower AUC
        (NAN, 0.5),  # unknown AUC: not on the front, and dominates nothing
        (0.95, 20.0),  # on: the best AUC
        (0.85, 12.0),  # dominated by (0.90, 10.0)
    ]
    auc, cost = zip(*points, strict=True)
    assert pareto_front(auc, cost).tolist() == [True, True, False, True, False, False, True, False]


def test_a_collapsed_trial_is_never_on_the_reports_cost_front():
    """Its AUC is the highest and its cost the lowest, but it predicted one class: never a trade-off to take, and
    it does not push the usable trials off the front either."""
    from medsweep.search.report import cost_front

    board = pd.DataFrame(
        {"best_val_auc": [0.9, 0.8, 0.7], "learnable_pct": [1.0, 5.0, 2.0], "status": ["collapsed", "completed", "stopped early"]}
    )
    assert cost_front(board, "learnable_pct").tolist() == [False, True, True]


def test_pareto_front_edge_cases():
    assert pareto_front([0.7], [3.0]).tolist() == [True]
    assert pareto_front([], []).tolist() == []
    assert pareto_front([0.5, 0.6], [NAN, NAN]).tolist() == [False, False]
    assert pareto_front([0.6, 0.5, 0.4], [3.0, 2.0, 1.0]).all()  # a trade-off curve: all on it


# ------------------------------------------------------------------ a hand-made sweep folder

TRIALS = [  # trial id, method, lr, params %, memory MB, val AUC by epoch
    ("a0000001", "linear", 1e-3, 0.12, 0.6, [0.70, 0.74, 0.78]),
    ("a0000002", "linear", 1e-2, 0.12, 0.6, [0.72, 0.80, 0.81]),
    ("a0000003", "linear", 1e-4, 0.12, 0.7, [0.60, 0.62]),
    ("00000004", "fpt_plus", 5e-4, 14.5, 6.0, [0.80, 0.88, 0.90]),  # an all-digit id stays a string
]


def _sweep_folder(root: Path, trials: list[tuple] = TRIALS) -> Path:
    """What a sweep leaves that the report reads: leaderboard.csv, per-trial progress.csv, the Optuna journal.

    As in a real sweep, several methods search ``method`` and prefixed parameters; one method searches its own, bare.
    """
    several = len({t[1] for t in trials}) > 1
    rows = []
    storage = JournalStorage(JournalFileBackend(str(root / STUDY_FILE)))
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize")
    for trial_id, method, lr, pct, mem, aucs in trials:
        config = {"method": method, "lr": lr, "backbone": "vit-tiny", "epochs": 3, "batch_size": 16}
        rows.append(
            {
                "trial_id": trial_id,
                "method": method,
                "lr": lr,
                "config_json": json.dumps(config, sort_keys=True),
                "best_val_auc": max(aucs),
                "best_epoch": int(np.argmax(aucs)) + 1,
                "epochs_run": len(aucs),
                "learnable_pct": pct,
                "peak_mem_mb": mem,
                "ppe": max(aucs),
                "status": "completed" if len(aucs) == 3 else "stopped early",
            }
        )
        folder = root / "ray" / "tune" / f"trial-{trial_id}"
        folder.mkdir(parents=True)
        pd.DataFrame({"epoch": range(1, len(aucs) + 1), "val_auc": aucs, "trial_id": trial_id}).to_csv(
            folder / "progress.csv", index=False
        )
        lr_name = f"{method}.lr" if several else "lr"
        params, distributions = {lr_name: lr}, {lr_name: FloatDistribution(1e-5, 1e-1, log=True)}
        if several:
            params["method"], distributions["method"] = method, CategoricalDistribution(["fpt_plus", "linear"])
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=aucs[-1]))
    (root / "ray" / "tune" / "trial-dead0000").mkdir()  # a trial that died before reporting: no progress.csv
    pd.DataFrame(rows).sort_values("best_val_auc", ascending=False).to_csv(root / "leaderboard.csv", index=False)
    return root


@pytest.fixture()
def sweep_dir(tmp_path) -> Path:
    return _sweep_folder(tmp_path)


def test_report_writes_every_plot_and_references_each(sweep_dir):
    page = write_report(sweep_dir)
    folder = sweep_dir / REPORT_DIR
    assert page == folder / "report.md"
    text = page.read_text()
    pngs = {p.name for p in folder.glob("*.png")}
    referenced = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text))
    assert pngs == referenced == {"auc_vs_params.png", "auc_vs_memory.png", "learning_curves.png", "importance.png"}
    assert all((folder / name).stat().st_size > 10_000 for name in pngs)  # real pictures, not empty canvases
    assert "| 1 | 00000004 | fpt_plus | 0.9 |" in text  # best first, the all-digit id intact
    assert "fpt_plus: 1 completed trial(s)" in text  # why it has no importance
    assert "Not run yet" in text  # no final.yaml


def test_pareto_csv_lists_the_fronts_of_both_costs(sweep_dir):
    write_report(sweep_dir)
    front = pd.read_csv(sweep_dir / REPORT_DIR / PARETO_CSV, dtype={"trial_id": str})
    # params: linear a0000002 (cheapest, best of its cost) and fpt_plus (best AUC); memory adds nothing new
    assert set(front["trial_id"]) == {"a0000002", "00000004"}
    assert front["pareto_learnable_pct"].all() and front["pareto_peak_mem_mb"].all()


def test_learning_curves_read_every_trial_that_reported(sweep_dir):
    curves = learning_curves(sweep_dir)
    assert curves.groupby("trial_id")["epoch"].max().to_dict() == {t[0]: len(t[5]) for t in TRIALS}


def test_html_report(sweep_dir):
    page = write_report(sweep_dir, "html")
    text = page.read_text()
    assert page.name == "report.html" and text.startswith("<!doctype html>")
    assert text.count("<img ") == 4 and "<table" in text


def test_importance_needs_two_differing_trials(tmp_path):
    root = _sweep_folder(tmp_path)
    (root / STUDY_FILE).unlink()
    text = write_report(root).read_text()
    assert "no Optuna study" in text and "importance.png" not in text


def test_importance_of_a_one_method_sweep(tmp_path):
    from medsweep.search.report import param_importances

    root = _sweep_folder(tmp_path, [t for t in TRIALS if t[1] == "linear"])
    found = param_importances(root, only_method="linear")
    assert found.values == {"linear": {"lr": pytest.approx(1.0)}} and found.trials == {"linear": 3}
    assert "importance.png" in write_report(root).read_text()


def test_importance_of_trials_that_all_scored_the_same_is_a_note(tmp_path):
    """Seen in a resumed 3-trial sweep: two linear trials at different lr, the same AUC (fANOVA raised)."""
    from medsweep.search.report import param_importances

    same = [("b0000001", "linear", 1e-4, 0.12, 0.6, [0.60, 0.65]), ("b0000002", "linear", 7.5e-5, 0.12, 0.6, [0.62, 0.65])]
    found = param_importances(_sweep_folder(tmp_path, same), only_method="linear")
    assert found.values == {} and "all 2 completed trials scored the same validation AUC" in found.notes[0]
    assert "importance.png" not in write_report(tmp_path).read_text()


def test_report_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"no leaderboard\.csv"):
        write_report(tmp_path)
    with pytest.raises(ConfigError, match="--format must be md or html"):
        write_report(tmp_path, "pdf")
    # The leaderboard a sweep in which no trial reported writes (an empty frame: no columns at all).
    pd.DataFrame().to_csv(tmp_path / "leaderboard.csv", index=False)
    with pytest.raises(ConfigError, match="has no trials; the sweep ran none to report on"):
        write_report(tmp_path)
