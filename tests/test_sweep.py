"""A real sweep end to end: Ray Data, Ray Train local mode, Tune + Optuna + ASHA, W&B offline, outputs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from medsweep.search.study import load_study
from medsweep.spaces import points_to_evaluate

pytestmark = pytest.mark.slow


def test_sweep_writes_a_leaderboard_with_one_row_per_trial(tiny_sweep):
    out, settings, _ = tiny_sweep
    board = pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str})
    assert len(board) == settings.trials
    assert board["trial_id"].is_unique
    assert set(board["method"]) == {"fpt_plus", "linear"}
    for column in ("lr", "best_val_auc", "epochs_run", "learnable_params", "learnable_pct", "peak_mem_mb", "ppe", "status"):
        assert column in board, column
    assert board["status"].isin(["completed", "stopped early", "collapsed"]).all()
    assert (board["cohort_members"] == 1).all()  # the default on CPUs: every trial alone
    assert settings.trial_precision == "fp32" and (board["precision"] == "fp32").all()  # --precision auto, trials on CPUs
    assert (board["epochs_run"] >= 1).all() and (board["epochs_run"] <= settings.max_epochs).all()
    assert board["best_val_auc"].is_monotonic_decreasing
    parquet = pd.read_parquet(out / "leaderboard.parquet")
    pd.testing.assert_frame_equal(parquet.astype({"trial_id": str}), board, check_dtype=False)  # the same board twice
    fpt = board[board["method"] == "fpt_plus"]
    assert (fpt["keep_ratio"] > 0).all() and (fpt["keep_ratio"] <= 1).all()


def _tune_results(out) -> pd.DataFrame:
    """Every result each trial reported, as Tune wrote it (``ray/tune/trial-*/result.json``, one JSON per line):
    a record of the trials kept apart from the leaderboard's writer."""
    paths = sorted((out / "ray" / "tune").glob("trial-*/result.json"))
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows).astype({"trial_id": str})


def test_leaderboard_matches_what_each_trial_reported_to_tune(tiny_sweep):
    """Each row of leaderboard.parquet against its trial's own results: best validation AUC over
    its epochs, the epochs it ran, its cost and its method."""
    out, _, _ = tiny_sweep
    board = pd.read_parquet(out / "leaderboard.parquet").astype({"trial_id": str}).set_index("trial_id")
    reported = _tune_results(out).groupby("trial_id")
    assert sorted(board.index) == sorted(reported.groups)
    for trial_id, results in reported:
        row, last = board.loc[trial_id], results.sort_values("epoch").iloc[-1]
        best = results[results["epoch"] == last["best_epoch"]].iloc[-1]  # the loop's best epoch
        usable = results[results["val_collapsed"] == 0.0]
        assert row["best_val_auc"] == pytest.approx((usable if len(usable) else results)["val_auc"].max()), trial_id
        assert row["best_val_auc"] == pytest.approx(best["val_auc"]) and row["best_epoch"] == best["epoch"], trial_id
        assert row["epochs_run"] == last["epoch"], trial_id
        assert row["learnable_params"] == last["learnable_params"], trial_id
        assert row["peak_mem_mb"] == pytest.approx(last["peak_mem_mb"]), trial_id
        assert row["method"] == last["config"]["method"], trial_id


def test_recommended_points_run_first_then_tpe(tiny_sweep):
    out, settings, _ = tiny_sweep
    trials = sorted(load_study(out).trials, key=lambda t: t.number)
    assert len(trials) == settings.trials
    expected = points_to_evaluate(settings.methods, dataset="synthetic")
    for trial, point in zip(trials, expected, strict=False):  # more trials than recommended points
        assert trial.params == pytest.approx(point)
    # Every trial ran with the sweep's fixed values over the space's constants.
    for config in pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str})["config_json"].map(json.loads):
        assert config["backbone"] == "vit-tiny" and config["epochs"] == settings.max_epochs


def test_the_study_was_told_the_leaderboards_ranking_value_of_every_trial(tiny_sweep):
    """One objective, told and selected alike: the values in the Optuna study are the board's best_val_auc."""
    out, _, _ = tiny_sweep
    board = pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str})
    told = sorted(t.value for t in load_study(out).trials if t.state.name == "COMPLETE")
    assert told == pytest.approx(sorted(board["best_val_auc"]))


def test_best_yaml_names_the_best_config_per_method(tiny_sweep):
    out, _, _ = tiny_sweep
    (best,) = yaml.safe_load((out / "best.yaml").read_text()).values()
    board = pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str})
    board = board[board["status"] != "collapsed"]  # never selected (tests/test_collapse.py)
    assert best["best_method"] == board.iloc[0]["method"]
    assert set(best["per_method"]) == set(board["method"])
    for method, entry in best["per_method"].items():
        top = board[board["method"] == method].iloc[0]
        assert entry["trial_id"] == top["trial_id"]
        assert entry["validation"]["best_val_auc"] == pytest.approx(top["best_val_auc"])
        assert entry["config"]["method"] == method
        assert isinstance(entry["config"]["batch_size"], int)


def test_each_trial_streams_to_its_own_offline_wandb_run(tiny_sweep):
    out, settings, _ = tiny_sweep
    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == settings.trials
    board = pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str})
    assert {p.stem.removeprefix("run-") for p in runs} == set(board["trial_id"])


def test_console_reports_preload_data_and_trials(tiny_sweep):
    _, settings, text = tiny_sweep
    assert "preload fpt_plus: store" in text and "written in" in text
    assert "materialized once, shared by every trial" in text
    # Both methods could fuse; on CPUs (the tests' machine) the default runs each trial alone, and says why.
    assert "cohorts off: each trial of fpt_plus, linear runs alone; on CPUs that is the faster" in text
    assert text.count("done ") == settings.trials
    assert "leaderboard" in text


def test_second_sweep_on_the_same_inputs_reuses_the_stores(tiny_sweep, tmp_path):
    from medsweep.datasets import load_dataset
    from medsweep.search.console import SweepConsole
    from medsweep.search.sweep import prepare_stores

    _, settings, _ = tiny_sweep
    spec = load_dataset(settings.dataset, cache_dir=settings.cache_dir)
    console = SweepConsole(record=True)
    results = prepare_stores(settings, spec, console)
    assert all(r.reused for r in results.values())
    assert console.text().count("reused") == 2
