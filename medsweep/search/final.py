"""The final answer per dataset: retrain the chosen configuration with several seeds, test once.

The search selects on the validation split, so its best validation AUC is
optimistically biased; the number to report must come from data that
selected nothing. Here the best configuration of ``best.yaml`` (and, on
request, each method's best) is trained again from scratch for its full epoch
budget (ASHA may have stopped the trial sooner) with seeds ``s, s+1, ...``,
through the same :func:`~medsweep.trainables.loop.fit` a trial runs, fed by
:class:`~medsweep.trainables.store_io.StoreIO` over the method's cached
preload store (no Ray; a DDP trial's config runs in one process with the same
global batch). Each run keeps the checkpoint of its best validation
epoch (the FPT protocol), and only that checkpoint is evaluated, once, on the
test split. The search never reads the test split (``tuning.materialize``
hands Ray Data the train and val shards only), and test metrics are written
nowhere but ``final.yaml`` / ``final.json``.

Confidence interval: a percentile bootstrap of the *mean over seeds* of the
per-seed test AUC, the number reported as the answer, the same draws of test
images for every seed (:func:`~medsweep.trainables.statistics.bootstrap_auc_ci`,
where the statistics live, torch-free). Seed-to-seed spread is reported
separately (the per-seed values and their standard deviation). The test
logits come from :func:`~medsweep.trainables.loop.predict`, the loop's own
evaluation; this module only orchestrates: seeds, files, console.

Layout: ``final.yaml`` / ``final.json`` beside ``best.yaml``;
``final/test_predictions.csv``, every tested seed's probabilities per test
image (seed, method, trial_id, path, label, ``prob_<class>``), from which
final.json's test AUCs are recomputed exactly; and per run
``final/<method>/seed-<n>/`` with ``config.json``, ``metrics.jsonl`` (every
epoch) and ``checkpoint/`` (the selected weights, loadable with
:func:`~medsweep.trainables.loop.load_trained`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
import yaml

from medsweep.datasets.spec import DatasetSpec
from medsweep.datasets.store import PreloadStore
from medsweep.errors import ConfigError
from medsweep.search.console import SweepConsole
from medsweep.search.export import UNUSABLE, board_entry, read_best
from medsweep.search.manifest import FILES_CHANGED, dataset_change
from medsweep.search.settings import SweepSettings, load_settings, sweep_dataset
from medsweep.search.study import FINAL_DIR, FINAL_JSON, FINAL_YAML, LEADERBOARD_PARQUET, TEST_PREDICTIONS_CSV
from medsweep.trainables.loop import device_for_trial, fit, load_trained, predict
from medsweep.trainables.methods import build_method
from medsweep.trainables.preload import preload
from medsweep.trainables.statistics import BOOTSTRAP_RESAMPLES, CI_LEVEL, bootstrap_auc_ci, probabilities
from medsweep.trainables.store_io import StoreIO

PREDICTION_KEYS = ["seed", "method", "trial_id", "path"]  # test_predictions.csv's first columns; label and prob_<class> follow


@dataclass
class SeedRun:
    """One retraining: what final.yaml reports, plus the test probabilities the bootstrap needs."""

    seed: int
    best_epoch: int
    val: dict[str, float]
    test: dict[str, float]
    train_seconds: float
    checkpoint: Path | None
    last_report: dict[str, Any]
    probabilities: np.ndarray | None
    labels: np.ndarray | None


class _BestCheckpointIO(StoreIO):
    """StoreIO that keeps only the checkpoint of the best validation epoch on disk.

    ``fit`` writes one checkpoint per epoch; a full fine-tuning checkpoint of
    a ViT-B with Adam state is about 1 GB, so three seeds x every epoch would
    not fit a disk. ``fit`` reads checkpoints only when it starts (resume),
    so dropping superseded ones while it runs is safe.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.best: Path | None = None
        self.best_report: dict[str, Any] = {}

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        super().report(metrics, checkpoint_dir)
        if checkpoint_dir is None:  # a diverged epoch saves none
            return
        if metrics["best_epoch"] == metrics["epoch"]:  # the loop's own rule: this epoch improved val AUC
            if self.best is not None:
                shutil.rmtree(self.best, ignore_errors=True)
            self.best, self.best_report = checkpoint_dir, dict(metrics)
        else:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)


# ------------------------------------------------------------------ retraining


@dataclass
class Candidate:
    """One configuration retrained with every final seed (not yet tested) and the store it reads."""

    item: dict[str, Any]  # its best.yaml-style entry: trial_id, config, validation
    config: dict[str, Any]
    store: PreloadStore
    runs: list[SeedRun]
    base_seed: int

    @property
    def method(self) -> str:
        return str(self.config["method"])

    @property
    def val_aucs(self) -> list[float]:
        """Each seed's best validation AUC (seeds that produced a checkpoint)."""
        return [r.val["auc"] for r in self.runs if r.checkpoint is not None and math.isfinite(r.val.get("auc", math.nan))]

    @property
    def val_auc_mean(self) -> float:
        return float(np.mean(self.val_aucs)) if self.val_aucs else math.nan


def retrain_best(
    out: Path,
    spec: DatasetSpec,
    settings: SweepSettings,
    seeds: int = 3,
    console: SweepConsole | None = None,
    per_method: bool = False,
    top: int | None = None,
) -> dict[str, Any]:
    """Retrain the sweep's ``top`` best trials with ``seeds`` seeds, test the one with the best mean
    validation AUC once per seed; write final.yaml/json.

    ``top`` (default ``settings.final_top``): candidates are the leaderboard's best usable trials
    (never a collapsed, diverged or failed one). The winner of a noisy search is biased upward
    (its one seed may have been lucky), so the candidates are compared on the mean of fresh
    seeds, still on validation; only the chosen one sees the test split. ``per_method=True``
    also retrains and tests each other method's best configuration, so methods can be compared
    on the test split too. Returns what final.yaml holds.
    """
    if seeds < 1:
        raise ConfigError(f"the final retrain needs at least 1 seed, got {seeds} (0 means: skip the final step)")
    top = settings.final_top if top is None else top
    if top < 1:
        raise ConfigError(f"--top must be at least 1 (1: retrain only the search's best trial), got {top}")
    out = Path(out)
    console = console or SweepConsole()
    entry = _dataset_entry(read_best(out), spec, out)
    change = dataset_change(out, spec)
    if change is not None:
        same_images, what = change
        other = f"the dataset is not the one the sweep searched on ({what}): its candidates are retrained, compared and tested on it as it is now"
        console.console.print(f"[bold]final[/] {FILES_CHANGED if same_images else other}")
    with _torch_threads(max(1, int(settings.cpus_per_trial))):
        candidates = [_retrain(out, spec, settings, item, seeds, console) for item in _candidates(out, entry, top)]
        chosen = max(candidates, key=lambda c: c.val_auc_mean if math.isfinite(c.val_auc_mean) else -math.inf)
        if len(candidates) > 1:
            console.console.print(f"[bold]final[/] chosen: {_why(candidates, chosen)}")
        summary, predictions = _test_and_summarise(out, spec, chosen, console)
        methods = {chosen.method: summary}
        if per_method:
            for name, item in entry["per_method"].items():
                if name not in methods:
                    methods[name], frames = _test_and_summarise(out, spec, _retrain(out, spec, settings, item, seeds, console), console)
                    predictions += frames
    for candidate in candidates:
        if candidate is not chosen:  # untested: only its metrics stay (a full fine-tuning checkpoint is ~1 GB)
            for run in candidate.runs:
                if run.checkpoint is not None:
                    shutil.rmtree(run.checkpoint, ignore_errors=True)
    document = {
        spec.name: {
            "task": spec.task,
            "classes": list(spec.classes),
            "best_method": chosen.method,
            "protocol": _protocol(spec, seeds),
            "selection": _selection(candidates, chosen, seeds),
            "methods": methods,
        }
    }
    (pd.concat(predictions, ignore_index=True) if predictions else pd.DataFrame(columns=PREDICTION_KEYS)).to_csv(out / TEST_PREDICTIONS_CSV, index=False)
    (out / FINAL_YAML).write_text(yaml.safe_dump(document, sort_keys=False))
    (out / FINAL_JSON).write_text(json.dumps(_json_safe(document), indent=2, allow_nan=False))
    console.result(f"final results in {out / FINAL_YAML} and {out / FINAL_JSON}")
    return document


def _candidates(out: Path, entry: dict[str, Any], top: int) -> list[dict[str, Any]]:
    """The ``top`` best usable trials of the leaderboard, best first, as best.yaml entries.

    A folder holding only ``best.yaml`` (no leaderboard, e.g. written by hand) has one candidate, its best."""
    path = out / LEADERBOARD_PARQUET
    if not path.is_file():
        return [entry["best"]]
    board = pd.read_parquet(path)
    usable = board[~board["status"].isin(UNUSABLE)].dropna(subset=["best_val_auc"])
    usable = usable.sort_values("best_val_auc", ascending=False, kind="stable")
    return [board_entry(row) for _, row in usable.head(top).iterrows()] or [entry["best"]]


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Train with the threads a trial had (its CPUs): costs compare with the sweep's, a busy host is not oversubscribed.

    Measured on the loaded 2-core host, demo FPT+ at 128 px: 44 s per seed with torch's default threads, about 8 s with one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _dataset_entry(best: dict[str, Any], spec: DatasetSpec, out: Path) -> dict[str, Any]:
    """best.yaml's entry for ``spec``, with a usable best trial."""
    if spec.name not in best:
        raise ConfigError(
            f"{out / 'best.yaml'} has no dataset {spec.name!r} (it has {', '.join(best) or 'none'}); "
            "pass the dataset the sweep ran on"
        )
    entry = best[spec.name]
    if not entry.get("best"):
        raise ConfigError(
            f"no trial of the sweep in {out} finished usable (every one failed, diverged or collapsed); "
            "fix the failing trials and sweep again"
        )
    return entry


def _protocol(spec: DatasetSpec, seeds: int) -> dict[str, Any]:
    """How the numbers were made, written next to them so a reader need not look up the code."""
    return {
        "seeds": seeds,
        "training": "from scratch, the configuration's full epoch budget, seeds seed..seed+n-1",
        "selection": "per seed, the checkpoint of the epoch with the best validation AUC",
        "test": f"evaluated once per seed on the test split ({len(spec.splits['test'])} images); the search never read it",
        "ci": (
            f"{CI_LEVEL:.0%} percentile bootstrap of the mean over seeds of the test AUC: "
            f"{BOOTSTRAP_RESAMPLES} resamples of the test images with replacement, the same draw for every seed"
        ),
    }


def _selection(candidates: list[Candidate], chosen: Candidate, seeds: int) -> dict[str, Any]:
    """final.yaml's account of the choice: every candidate's validation AUC over the seeds, the winner, why."""
    return {
        "rule": (
            f"the {len(candidates)} best usable trials of the search by best validation AUC, each retrained with "
            f"{_seeds(seeds)}; the highest mean validation AUC is tested (ties: the search's order)"
            if len(candidates) > 1
            else f"the best usable trial of the search by best validation AUC, retrained with {_seeds(seeds)} and tested"
        ),
        "candidates": [
            {
                "trial_id": c.item.get("trial_id"),
                "method": c.method,
                "search_val_auc": _plain_float(c.item.get("validation", {}).get("best_val_auc")),
                "val_auc_mean": c.val_auc_mean,
                "val_auc_std": float(np.std(c.val_aucs, ddof=1)) if len(c.val_aucs) > 1 else math.nan,
                "val_auc_seeds": c.val_aucs,
            }
            for c in candidates
        ],
        "chosen": chosen.item.get("trial_id"),
        "why": _why(candidates, chosen),
    }


def _seeds(count: int) -> str:
    return f"{count} seed" if count == 1 else f"{count} seeds"


def _why(candidates: list[Candidate], chosen: Candidate) -> str:
    seeds = len(chosen.runs)
    mean = f"{chosen.val_auc_mean:.4f} over {_seeds(seeds)}"
    if len(candidates) == 1:
        return f"trial {chosen.item.get('trial_id')} ({chosen.method}) was the only candidate: mean validation AUC {mean}"
    first = candidates[0]
    if chosen is first:
        return f"the search's best trial {first.item.get('trial_id')} ({first.method}) also has the best mean validation AUC, {mean}"
    return (
        f"trial {chosen.item.get('trial_id')} ({chosen.method}, mean validation AUC {mean}) beat the search's best trial "
        f"{first.item.get('trial_id')} ({first.method}, {first.val_auc_mean:.4f}), whose search AUC came from one seed"
    )


def _plain_float(value: Any) -> float:
    return float(value) if value is not None else math.nan


def _retrain(
    out: Path,
    spec: DatasetSpec,
    settings: SweepSettings,
    item: dict[str, Any],
    seeds: int,
    console: SweepConsole,
) -> Candidate:
    """Every seed of one configuration, trained and kept at its best validation epoch (not tested)."""
    config = {**item["config"], "num_classes": spec.num_classes, "task": spec.task}
    name = config["method"]
    result = preload(
        spec,
        build_method(name, config).to_device(device_for_trial()),  # a store not built yet is built on this machine's GPU if any
        settings.cache_dir,
        progress=console.progress,
        with_features=settings.preload_features,
        precision=settings.precision,  # as the sweep resolved it: the store its trials read
    )
    console.store_ready(name, result)
    base_seed = int(config.get("seed", settings.seed))
    trial = str(item.get("trial_id") or "config")
    runs = []
    for i in range(seeds):
        seed_run = _train_seed(result.store, config, base_seed + i, out / FINAL_DIR / name / trial / f"seed-{base_seed + i}")
        console.console.print(
            f"[bold]final[/] {name} {trial} seed {seed_run.seed} ({i + 1}/{seeds}): best epoch {seed_run.best_epoch}  "
            f"val AUC {seed_run.val.get('auc', math.nan):.4f}  ({seed_run.train_seconds:.1f} s)"
        )
        runs.append(seed_run)
    return Candidate(item, config, result.store, runs, base_seed)


def _test_and_summarise(out: Path, spec: DatasetSpec, candidate: Candidate, console: SweepConsole) -> tuple[dict[str, Any], list[pd.DataFrame]]:
    """Test each seed's kept checkpoint once: the candidate's final.yaml entry and its per-image predictions."""
    name, config = candidate.method, candidate.config
    runs = [_test_seed(candidate.store, config, run) for run in candidate.runs]
    for run in runs:
        if run.checkpoint is not None:
            console.console.print(
                f"[bold]final[/] {name} seed {run.seed}: val AUC {run.val.get('auc', math.nan):.4f} -> test AUC {run.test.get('auc', math.nan):.4f}"
            )
    summary = _summarise(out, candidate.item, config, runs, candidate.base_seed)
    ci = summary["test_auc_ci"]
    console.result(
        f"[bold]final[/] {name}: test AUC {summary['mean'].get('test_auc', math.nan):.4f} "
        f"({CI_LEVEL:.0%} CI {ci['low']:.4f}-{ci['high']:.4f}) over {_seeds(len(runs))}"
        if ci
        else f"[bold]final[/] {name}: no seed produced a usable checkpoint (every run diverged)"
    )
    return summary, _predictions(spec, candidate, runs)


def _predictions(spec: DatasetSpec, candidate: Candidate, runs: list[SeedRun]) -> list[pd.DataFrame]:
    """test_predictions.csv's rows of one tested candidate, a frame per tested seed: per test image, its path, label and probabilities.

    What a DeLong test or a calibration plot needs, and what final.json's AUC is computed from.
    The store holds the test images in a seeded order; its ``index`` column maps each
    predicted row back to the image (:meth:`~medsweep.datasets.store.PreloadStore.row_indices`).
    """
    samples = spec.splits["test"]
    paths = [str(samples[i].path) for i in candidate.store.row_indices("test")]
    frames = []
    for run in runs:
        if run.probabilities is None or run.labels is None:  # a diverged seed: nothing was tested
            continue
        columns: dict[str, Any] = {"seed": run.seed, "method": candidate.method, "trial_id": candidate.item.get("trial_id"), "path": paths}
        if spec.task == "multilabel":
            columns |= {f"label_{c}": run.labels[:, i].astype(np.int64) for i, c in enumerate(spec.classes)}
        else:
            columns["label"] = [spec.classes[int(i)] for i in run.labels]
        columns |= {f"prob_{c}": run.probabilities[:, i] for i, c in enumerate(spec.classes)}
        frames.append(pd.DataFrame(columns))
    return frames


def _train_seed(store: PreloadStore, config: dict[str, Any], seed: int, folder: Path) -> SeedRun:
    """Train one seed from scratch and keep its best-validation checkpoint (tested later, if chosen)."""
    shutil.rmtree(folder, ignore_errors=True)  # a rerun starts from scratch, never resumes a stale run
    folder.mkdir(parents=True)
    config = {**config, "seed": seed}
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    io = _BestCheckpointIO(store, log_path=folder / "metrics.jsonl", seed=seed)
    started = time.perf_counter()
    fit(config, io, folder / "epochs")
    seconds = time.perf_counter() - started
    if io.best is None:
        return SeedRun(seed, 0, {}, {}, seconds, None, io.reports[-1] if io.reports else {}, None, None)
    checkpoint = io.best.rename(folder / "checkpoint")
    shutil.rmtree(folder / "epochs", ignore_errors=True)
    best = io.best_report
    return SeedRun(
        seed=seed,
        best_epoch=int(best["epoch"]),
        val={k.removeprefix("val_"): float(v) for k, v in best.items() if k.startswith("val_")},
        test={},
        train_seconds=seconds,
        checkpoint=checkpoint,
        last_report=io.reports[-1],
        probabilities=None,
        labels=None,
    )


def _test_seed(store: PreloadStore, config: dict[str, Any], run: SeedRun) -> SeedRun:
    """``run`` with its kept checkpoint evaluated once on the test split (a run without one as it is)."""
    if run.checkpoint is None:
        return run
    seeded = {**config, "seed": run.seed}
    method = load_trained(seeded["method"], seeded, run.checkpoint)
    metrics, logits, labels = predict(method, StoreIO(store), "test", precision=config.get("precision", "fp32"))
    test = {k: v for k, v in metrics.items() if k != "loss"}  # final.yaml reports the classification metrics
    return replace(run, test=test, probabilities=probabilities(logits, config["task"]), labels=labels)


def _summarise(out: Path, item: dict[str, Any], config: dict[str, Any], runs: list[SeedRun], base_seed: int) -> dict[str, Any]:
    """One method's final.yaml entry: config, per-seed metrics, mean and std, CI, cost."""
    usable = [r for r in runs if r.probabilities is not None]
    flat = [{**{f"val_{k}": v for k, v in r.val.items()}, **{f"test_{k}": v for k, v in r.test.items()}} for r in usable]
    keys = list(flat[0]) if flat else []
    last = runs[-1].last_report
    ci = (
        # A run with probabilities has its labels too (both None only for a run that could not be tested).
        bootstrap_auc_ci([cast(np.ndarray, r.probabilities) for r in usable], cast(np.ndarray, usable[0].labels), config["task"], seed=base_seed)
        if usable
        else None
    )
    return {
        "trial_id": item.get("trial_id"),
        "config": item["config"],
        "seeds": [_seed_entry(out, r) for r in runs],
        "mean": {k: float(np.mean([f[k] for f in flat])) for k in keys},
        "std": {k: float(np.std([f[k] for f in flat], ddof=1)) if len(flat) > 1 else math.nan for k in keys},
        "test_auc_ci": ci,
        "cost": {
            "epochs": int(config["epochs"]),
            "learnable_params": int(last.get("learnable_params", 0)),
            "learnable_pct": float(last.get("learnable_pct", math.nan)),
            "peak_mem_mb": float(last.get("peak_mem_mb", math.nan)),
            "train_seconds_mean": float(np.mean([r.train_seconds for r in runs])),
            "train_seconds_total": float(np.sum([r.train_seconds for r in runs])),
        },
    }


def _seed_entry(out: Path, run: SeedRun) -> dict[str, Any]:
    return {
        "seed": run.seed,
        "best_epoch": run.best_epoch,
        "status": "ok" if run.checkpoint else _failure(run.last_report),
        "val": run.val,
        "test": run.test,
        "train_seconds": run.train_seconds,
        "checkpoint": str(run.checkpoint.relative_to(out)) if run.checkpoint else None,
    }


def _failure(last_report: dict[str, Any]) -> str:
    """Why a seed has no checkpoint to test."""
    return "diverged" if last_report.get("status") == "diverged" else "no finite validation AUC"


def _json_safe(value: Any) -> Any:
    """NaN and infinities to null: final.json stays strict JSON for other tools."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------ command


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.dir)
    read_best(args.dir)  # a sweep without its answer: one line, before the dataset is read (or generated)
    if args.cache_dir is not None:
        settings.cache_dir = args.cache_dir
    spec = sweep_dataset(settings)
    retrain_best(args.dir, spec, settings, seeds=args.seeds, console=SweepConsole(), per_method=args.per_method, top=args.top)
    return 0
