"""The final answer: test split kept out of the search, retraining a real sweep's best config.

The bootstrap CI it reports is tested with its module, in test_statistics.py.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from medsweep.errors import ConfigError
from medsweep.search.final import (
    retrain_best,
    run,
)
from medsweep.search.settings import SweepSettings, load_settings
from medsweep.search.study import FINAL_JSON, FINAL_YAML, TEST_PREDICTIONS_CSV
from medsweep.trainables.loop import load_trained, predict
from medsweep.trainables.methods import build_method
from medsweep.trainables.metrics import classification_metrics
from medsweep.trainables.preload import PreloadResult, preload
from medsweep.trainables.store_io import StoreIO

LINEAR = {"method": "linear", "backbone": "vit-tiny", "image_size": 64, "seed": 0}


# ------------------------------------------------------------------ retraining without Ray


@pytest.fixture(scope="module")
def cache(feature_cache) -> Path:
    """The session's preload cache: the linear store is built once, then reused."""
    return feature_cache


def _hand_made_sweep(folder: Path, spec, cache: Path, **config) -> SweepSettings:
    """A sweep folder holding only what retrain_best reads: best.yaml with one linear config."""
    config = {**LINEAR, "epochs": 2, "lr": 1e-2, "batch_size": 16, **config}
    entry = {"trial_id": "hand0001", "config": config, "validation": {"best_val_auc": 0.7}}
    best = {"task": spec.task, "classes": spec.classes, "best_method": "linear", "best": entry, "per_method": {"linear": entry}}
    (folder / "best.yaml").write_text(yaml.safe_dump({spec.name: best}))
    return SweepSettings(methods=["linear"], backbone="vit-tiny", image_size=64, out=folder, cache_dir=cache)


def test_retrain_best_reports_each_seed_the_mean_and_a_ci(synthetic_spec, cache, tmp_path):
    document = retrain_best(tmp_path, synthetic_spec, _hand_made_sweep(tmp_path, synthetic_spec, cache), seeds=2)
    assert yaml.safe_load((tmp_path / FINAL_YAML).read_text()) == json.loads((tmp_path / FINAL_JSON).read_text())
    method = document[synthetic_spec.name]["methods"]["linear"]
    assert [s["seed"] for s in method["seeds"]] == [0, 1]
    assert method["seeds"][0]["test"] != method["seeds"][1]["test"]  # different seeds, different models
    for seed in method["seeds"]:
        assert seed["status"] == "ok" and seed["best_epoch"] in (1, 2)
        logged = [json.loads(line) for line in (tmp_path / seed["checkpoint"]).parent.joinpath("metrics.jsonl").open()]
        assert [m["epoch"] for m in logged] == [1, 2]  # the full budget
        assert seed["val"]["auc"] == max(m["val_auc"] for m in logged)
    assert method["mean"]["test_auc"] == pytest.approx(np.mean([s["test"]["auc"] for s in method["seeds"]]))
    assert method["test_auc_ci"]["low"] <= method["mean"]["test_auc"] <= method["test_auc_ci"]["high"]


def _aucs_from_predictions(path: Path, spec, method: str) -> dict[int, float]:
    """Each seed's test AUC recomputed from test_predictions.csv alone (the log-probabilities are logits with the same softmax)."""
    frame = pd.read_csv(path)
    frame = frame[frame["method"] == method]
    probs = [f"prob_{c}" for c in spec.classes]
    aucs = {}
    for seed, rows in frame.groupby("seed"):
        if spec.task == "multilabel":
            p = rows[probs].to_numpy()
            logits, labels = np.log(p) - np.log1p(-p), rows[[f"label_{c}" for c in spec.classes]].to_numpy()
        else:
            logits, labels = np.log(rows[probs].to_numpy()), rows["label"].map(spec.classes.index).to_numpy()
        aucs[int(seed)] = classification_metrics(logits, labels, spec.task)["auc"]
    return aucs


def test_test_predictions_give_back_each_seeds_test_auc_and_the_images_true_labels(synthetic_spec, cache, tmp_path):
    document = retrain_best(tmp_path, synthetic_spec, _hand_made_sweep(tmp_path, synthetic_spec, cache), seeds=2)
    method = json.loads((tmp_path / FINAL_JSON).read_text())[synthetic_spec.name]["methods"]["linear"]
    frame = pd.read_csv(tmp_path / TEST_PREDICTIONS_CSV)
    test = synthetic_spec.splits["test"]
    assert list(frame.columns[:5]) == ["seed", "method", "trial_id", "path", "label"]
    assert list(frame.columns[5:]) == [f"prob_{c}" for c in synthetic_spec.classes]
    for _, rows in frame.groupby("seed"):
        assert sorted(rows["path"]) == sorted(str(s.path) for s in test)  # every test image once per seed
    truth = {str(s.path): synthetic_spec.classes[int(s.label)] for s in test}  # the row-to-image mapping is exact
    assert (frame["path"].map(truth) == frame["label"]).all()
    assert set(frame["trial_id"]) == {"hand0001"} and set(frame["method"]) == {"linear"}
    aucs = _aucs_from_predictions(tmp_path / TEST_PREDICTIONS_CSV, synthetic_spec, "linear")
    assert aucs == pytest.approx({s["seed"]: s["test"]["auc"] for s in method["seeds"]}, abs=1e-9)
    assert np.mean(list(aucs.values())) == pytest.approx(document[synthetic_spec.name]["methods"]["linear"]["mean"]["test_auc"], abs=1e-9)


def test_the_top_candidates_are_retrained_and_only_the_best_mean_on_validation_is_tested(synthetic_spec, cache, tmp_path):
    """Two trials on the board: both retrained with two seeds, chosen by mean validation AUC, the other untested."""
    settings = _hand_made_sweep(tmp_path, synthetic_spec, cache)
    configs = {"trial-a": {**LINEAR, "epochs": 2, "lr": 1e-2, "batch_size": 16}, "trial-b": {**LINEAR, "epochs": 2, "lr": 1e-4, "batch_size": 16}}
    rows = [
        {"trial_id": t, "method": "linear", "best_val_auc": auc, "status": "completed", "config_json": json.dumps(c)}
        for (t, c), auc in zip(configs.items(), (0.9, 0.8), strict=True)
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "leaderboard.parquet")
    document = retrain_best(tmp_path, synthetic_spec, settings, seeds=2, top=2)[synthetic_spec.name]
    selection = document["selection"]
    candidates = {c["trial_id"]: c for c in selection["candidates"]}
    assert list(candidates) == ["trial-a", "trial-b"]  # the board's order
    for trial_id, candidate in candidates.items():
        runs = [tmp_path / "final" / "linear" / trial_id / f"seed-{seed}" for seed in (0, 1)]
        logged = [[json.loads(line)["val_auc"] for line in (run / "metrics.jsonl").open()] for run in runs]
        assert candidate["val_auc_seeds"] == [max(aucs) for aucs in logged]
        assert candidate["val_auc_mean"] == pytest.approx(np.mean(candidate["val_auc_seeds"]))
        assert all((run / "checkpoint").exists() == (trial_id == selection["chosen"]) for run in runs)  # the others untested
    chosen = max(candidates.values(), key=lambda c: c["val_auc_mean"])
    assert selection["chosen"] == chosen["trial_id"] and chosen["trial_id"] in selection["why"]
    assert document["methods"]["linear"]["config"] == configs[chosen["trial_id"]]
    assert [s["seed"] for s in document["methods"]["linear"]["seeds"]] == [0, 1]


def test_a_diverging_seed_is_reported_without_test_metrics(synthetic_spec, cache, tmp_path):
    from medsweep.search.console import SweepConsole

    settings = _hand_made_sweep(tmp_path, synthetic_spec, cache, lr=1e12, optimizer="sgd", grad_clip=0.0)
    # The sweep searched on one image fewer: final retrains on the set as it is, and says so.
    sizes = {split: len(samples) for split, samples in synthetic_spec.splits.items()}
    searched = {"classes": synthetic_spec.classes, "manifest_hash": "0" * 16, "membership_hash": "1" * 16, "splits": {**sizes, "val": sizes["val"] - 1}}
    (tmp_path / "manifest.json").write_text(json.dumps({"dataset": searched}))
    console = SweepConsole(record=True)
    method = retrain_best(tmp_path, synthetic_spec, settings, seeds=1, console=console)[synthetic_spec.name]["methods"]["linear"]
    said = " ".join(console.text().split())
    assert f"final the dataset is not the one the sweep searched on (val {sizes['val'] - 1} images then, {sizes['val']} now)" in said
    assert method["seeds"][0]["status"] == "diverged" and method["seeds"][0]["test"] == {}
    assert method["test_auc_ci"] is None and method["mean"] == {}
    assert pd.read_csv(tmp_path / TEST_PREDICTIONS_CSV).empty  # nothing was tested: the header alone


# ------------------------------------------------------------------ the test split stays out of the search


def test_search_data_step_reads_only_the_train_and_val_shards(synthetic_spec, cache, monkeypatch, ray_session):
    """The search's data step (``data.store_data``, real Ray Data) never asks the store for a test shard.

    Spies on ``PreloadStore.shard_paths``: every reader needs it to find a file.
    """
    from medsweep.datasets.store import PreloadStore
    from medsweep.search.data import store_data

    config = {**LINEAR, "num_classes": synthetic_spec.num_classes}
    store = preload(synthetic_spec, build_method("linear", config), cache).store
    asked = []
    shard_paths = PreloadStore.shard_paths

    def spy(self, split):
        asked.append(split)
        return shard_paths(self, split)

    monkeypatch.setattr(PreloadStore, "shard_paths", spy)
    data, _ = store_data(PreloadResult(store, True, 0.0, 0))

    assert set(asked) == {"train", "val"}
    assert set(data.blocks) == set(data.shard_rows) == {"train", "val"}
    train = list(data.tables("train", range(len(data.shard_rows["train"]))))
    assert sum(table.num_rows for table in train) == data.num_rows("train") == store.num_rows("train")


def test_missing_best_yaml_is_a_one_line_error(synthetic_spec, tmp_path):
    with pytest.raises(ConfigError, match=r"no best\.yaml") as error:
        retrain_best(tmp_path, synthetic_spec, SweepSettings(methods=["linear"], out=tmp_path))
    assert "\n" not in str(error.value)


def test_zero_seeds_is_refused(synthetic_spec, tmp_path):
    with pytest.raises(ConfigError, match="at least 1 seed"):
        retrain_best(tmp_path, synthetic_spec, SweepSettings(methods=["linear"], out=tmp_path), seeds=0)


def test_missing_sweep_json_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"no sweep\.json"):
        load_settings(tmp_path)


# ------------------------------------------------------------------ a real sweep


@pytest.fixture(scope="module")
def finished(tiny_sweep, tmp_path_factory):
    """A copy of the shared tiny sweep, after ``medsweep final DIR --per-method`` (3 seeds)."""
    source, _, _ = tiny_sweep
    out = tmp_path_factory.mktemp("final") / "sweep"
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("wandb"))
    run(argparse.Namespace(dir=out, seeds=3, per_method=True, cache_dir=None, top=None))
    return out


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
def test_final_yaml_has_three_seeds_with_test_metrics_and_a_ci(finished):
    document = yaml.safe_load((finished / FINAL_YAML).read_text())
    assert _strict_json((finished / FINAL_JSON).read_text()) == json.loads(json.dumps(document))  # same content
    (dataset, entry), = document.items()
    best = yaml.safe_load((finished / "best.yaml").read_text())[dataset]
    selection = entry["selection"]
    board = pd.read_csv(finished / "leaderboard.csv", dtype={"trial_id": str})
    usable = board[~board["status"].isin(["error", "diverged", "collapsed"])]
    assert [c["trial_id"] for c in selection["candidates"]] == list(usable["trial_id"][:3])  # --final-top 3
    assert selection["candidates"][0]["trial_id"] == best["best"]["trial_id"]
    chosen = next(c for c in selection["candidates"] if c["trial_id"] == selection["chosen"])
    assert chosen["val_auc_mean"] == max(c["val_auc_mean"] for c in selection["candidates"])
    assert entry["best_method"] == chosen["method"]
    assert set(entry["methods"]) == set(best["per_method"]) and "linear" in entry["methods"]  # FPT+ may collapse here
    chosen_config = json.loads(board.set_index("trial_id").loc[chosen["trial_id"], "config_json"])
    for name, method in entry["methods"].items():
        assert method["config"] == (chosen_config if name == chosen["method"] else best["per_method"][name]["config"])
        assert [s["seed"] for s in method["seeds"]] == [0, 1, 2]
        for seed in method["seeds"]:
            assert seed["status"] == "ok"
            assert 1 <= seed["best_epoch"] <= method["config"]["epochs"]
            assert {"auc", "accuracy", "f1", "kappa"} <= set(seed["test"])
            assert all(math.isfinite(v) for v in seed["test"].values())
            assert (finished / seed["checkpoint"] / "checkpoint.pt").is_file()
            assert not (finished / seed["checkpoint"]).parent.joinpath("epochs").exists()  # superseded epochs gone
        ci = method["test_auc_ci"]
        assert ci["point"] == pytest.approx(method["mean"]["test_auc"])
        assert ci["low"] <= ci["point"] <= ci["high"]
        assert ci["resamples"] == 1000
        assert method["cost"]["learnable_params"] > 0 and method["cost"]["train_seconds_total"] > 0


@pytest.mark.slow
def test_test_predictions_of_a_real_sweep_give_back_final_jsons_aucs(finished):
    """Every tested method (--per-method), every seed: the AUC recomputed from the CSV is final.json's."""
    spec = _spec(load_settings(finished))
    document = _strict_json((finished / FINAL_JSON).read_text())[spec.name]
    for name, method in document["methods"].items():
        aucs = _aucs_from_predictions(finished / TEST_PREDICTIONS_CSV, spec, name)
        assert aucs == pytest.approx({s["seed"]: s["test"]["auc"] for s in method["seeds"]}, abs=1e-9)
        assert np.mean(list(aucs.values())) == pytest.approx(method["mean"]["test_auc"], abs=1e-9)
    frame = pd.read_csv(finished / TEST_PREDICTIONS_CSV, dtype={"trial_id": str})
    assert set(frame["trial_id"]) == {str(m["trial_id"]) for m in document["methods"].values()}


@pytest.mark.slow
def test_the_kept_checkpoint_is_the_best_validation_epoch(finished):
    settings = load_settings(finished)
    document = next(iter(yaml.safe_load((finished / FINAL_YAML).read_text()).values()))
    method = document["best_method"]
    seed = document["methods"][method]["seeds"][0]
    config = {**document["methods"][method]["config"], "seed": seed["seed"]}
    store = preload(_spec(settings), build_method(method, config), settings.cache_dir).store
    _, logits, labels = predict(load_trained(method, config, finished / seed["checkpoint"]), StoreIO(store), "val")
    assert classification_metrics(logits, labels, config["task"])["auc"] == pytest.approx(seed["val"]["auc"], abs=1e-6)


@pytest.mark.slow
def test_test_metrics_appear_only_in_the_final_files(finished):
    def keys(value):
        if isinstance(value, dict):
            return set(value) | {k for v in value.values() for k in keys(v)}
        if isinstance(value, list):
            return {k for v in value for k in keys(v)}
        return set()

    assert not [c for c in pd.read_csv(finished / "leaderboard.csv").columns if "test" in c]
    assert not [k for k in keys(yaml.safe_load((finished / "best.yaml").read_text())) if "test" in str(k)]
    for progress in (finished / "ray" / "tune").glob("trial-*/progress.csv"):
        assert not [c for c in pd.read_csv(progress, nrows=0).columns if "test" in c]
    assert "test_auc" in keys(yaml.safe_load((finished / FINAL_YAML).read_text()))


@pytest.mark.slow
def test_report_of_a_finished_sweep_shows_the_final_results(finished):
    from medsweep.search.report import write_report

    page = write_report(finished)
    text = page.read_text()
    assert "Final test results" in text and "Not run yet" not in text
    assert "(final_test.png)" in text and (page.parent / "final_test.png").is_file()


def _spec(settings: SweepSettings):
    from medsweep.datasets import load_dataset

    return load_dataset(settings.dataset, cache_dir=settings.cache_dir, seed=settings.seed, synthetic_size=settings.image_size)
