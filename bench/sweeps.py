"""Run a real ``run_sweep`` and time its phases without touching the package.

``run_sweep`` reports its progress through a :class:`SweepConsole`; a console
that timestamps those calls splits the sweep's wall time into dataset,
preload, Ray Data materialization and the Tune run, and records every
per-epoch report (trial, epoch, validation AUC) in the order the driver saw
them, which is what the search-efficiency curves need. Ray itself is started
once by the context, before the clock starts, and reported separately.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pandas as pd
from ray.tune import TuneConfig

from medsweep.search.console import SweepConsole

TRIAL_COLUMNS = (
    "trial_id",
    "best_val_auc",
    "epochs_run",
    "trial_seconds",
    "train_step_seconds",
    "lr",
    "weight_decay",
    "batch_size",
    "keep_ratio",
    "num_prompts",
    "peak_mem_mb",
    "status",
)


class TimingConsole(SweepConsole):
    """A silent console that records when each sweep phase ended."""

    def __init__(self, quiet: bool = True, record: bool = False) -> None:
        # SweepConsole's signature: Tune pickles its callbacks and SweepConsole.__setstate__ calls __init__(quiet=...).
        super().__init__(quiet=True)
        self.marks: dict[str, float] = {}
        self.splits: dict[str, int] = {}
        self.num_classes = 0
        self.stores: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []

    def dataset(self, spec) -> None:
        self.marks["dataset"] = time.perf_counter()
        self.splits = {split: len(samples) for split, samples in spec.splits.items()}
        self.num_classes = spec.num_classes

    def store_ready(self, method: str, result) -> None:
        self.marks["preload"] = time.perf_counter()
        store = result.store
        self.stores[method] = {
            "key": store.key,
            "reused": result.reused,
            "seconds": result.seconds,
            "images": result.images_processed,
            "bytes": store.size_bytes(),
            "bytes_per_image": store.bytes_per_image(),
            "columns": [c.name for c in store.columns],
        }

    def data_ready(self, data) -> None:
        self.marks["materialize"] = time.perf_counter()

    def trial_result(self, trial_id: str, config: dict[str, Any], result: dict[str, Any]) -> None:
        self.events.append(
            {
                "t": time.perf_counter(),
                "trial_id": trial_id,
                "epoch": int(result.get("epoch", 0)),
                "val_auc": float(result.get("val_auc", float("nan"))),
                "train_step_seconds": float(result.get("train_step_seconds", float("nan"))),
                "epoch_seconds": float(result.get("epoch_seconds", float("nan"))),
            }
        )

    def trial_done(self, *args: Any, **kwargs: Any) -> None:
        pass

    def leaderboard(self, board, out: Path, limit: int = 15) -> None:
        self.marks["export"] = time.perf_counter()


def _without_actor_reuse(**kwargs: Any) -> TuneConfig:
    return TuneConfig(**{**kwargs, "reuse_actors": False})


def timed_sweep(
    ctx,
    name: str,
    *,
    fresh_store: bool = True,
    ray_defaults: bool = False,
    points: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Run ``run_sweep`` with ``SweepSettings(**overrides)`` (FPT+ only, no W&B) and time it.

    ``fresh_store`` drops every cached preload store first, so the sweep pays
    its own preload as a first sweep on a dataset would. ``ray_defaults`` runs
    the sweep as it ran before medsweep changed two of Ray Tune's defaults:
    ``reuse_actors=False`` (every trial starts a fresh worker process, patched
    into the ``TuneConfig`` that ``medsweep.search.tuning`` builds) and one
    pending trial at a time (``TUNE_MAX_PENDING_TRIALS_PG=1``, Tune's default
    for a searcher), to measure what the two changes save.

    ``points`` replaces the recommended points the sweep runs first (the grid
    arm of figure 5): they are enqueued, in order, into the sweep's own Optuna
    study before the sweep starts. ``build_searcher`` enqueues the recommended
    points only into an empty study (so that ``medsweep resume`` does not run
    them twice) and ``ask()`` hands out waiting trials first, so the sweep runs
    exactly these configs, through the unchanged searcher, Tuner and trial.
    """
    from medsweep.search import tuning
    from medsweep.search.settings import SweepSettings
    from medsweep.search.study import COHORTS_FILE, RAY_DIR
    from medsweep.search.sweep import run_sweep

    ray_start = ctx.ray()
    out = ctx.work / "sweeps" / name
    settings = SweepSettings(
        **{"methods": ["fpt_plus"], "wandb": "disabled", "final_seeds": 0, "cache_dir": ctx.cache_dir, "out": out, **overrides}
    )
    shutil.rmtree(out, ignore_errors=True)  # an old Optuna journal there would seed TPE with stale trials
    if points:
        enqueue(out, points)
    if fresh_store:
        ctx.fresh_stores()
    console = TimingConsole()
    patches = contextlib.ExitStack()
    if ray_defaults:
        patches.enter_context(mock.patch.object(tuning, "TuneConfig", _without_actor_reuse))
        patches.enter_context(mock.patch.dict(os.environ, {tuning.PENDING_TRIALS_ENV: "1"}))
    start = time.perf_counter()
    with patches:
        run_sweep(settings, console)
    end = time.perf_counter()
    marks = console.marks
    board = pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str})
    return {
        "name": name,
        "settings": {k: v for k, v in overrides.items()},
        "fresh_store": fresh_store,
        "points": points,
        "ray_defaults": ray_defaults,
        "backbone": settings.backbone,
        "image_size": settings.image_size,
        "num_classes": console.num_classes,
        "splits": console.splits,
        "stores": console.stores,
        "ray_start_s": ray_start,
        "phases": {
            "dataset_s": marks["dataset"] - start,
            "preload_s": marks["preload"] - marks["dataset"],
            "materialize_s": marks["materialize"] - marks["preload"],
            "tune_s": marks["export"] - marks["materialize"],
            "total_s": end - start,
        },
        "trials": board[[c for c in TRIAL_COLUMNS if c in board]].to_dict(orient="records"),
        "cohorts": json.loads(cohorts.read_text()) if (cohorts := out / RAY_DIR / COHORTS_FILE).is_file() else [],
        "events": [{**e, "t": e["t"] - marks["materialize"]} for e in console.events],
    }


def enqueue(out: Path, points: list[dict[str, Any]]) -> None:
    """Put ``points`` in the study file a sweep writing to ``out`` will open (``run_sweep``'s study name)."""
    import optuna

    from medsweep.search.study import STUDY_NAME, study_storage

    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=study_storage(out), direction="maximize", load_if_exists=True
    )
    for point in points:
        study.enqueue_trial(dict(point))
