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
per-seed test AUC, the number reported as the answer. Each of the 1000
resamples draws test images with replacement (seeded) and applies the same
draw to every seed's predictions, so the interval reflects test-set sampling
for the reported quantity. Seed-to-seed spread is reported separately (the
per-seed values and their standard deviation); averaging the seeds'
probabilities into an ensemble instead would score a model nobody trained.

Layout: ``final.yaml`` / ``final.json`` beside ``best.yaml``, and per run
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
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from medsweep.datasets.spec import DatasetSpec
from medsweep.datasets.store import LABEL, PreloadStore, decode_columns
from medsweep.errors import ConfigError
from medsweep.search.console import SweepConsole
from medsweep.search.export import read_best
from medsweep.search.settings import SweepSettings, load_settings, sweep_dataset
from medsweep.search.study import FINAL_DIR, FINAL_JSON, FINAL_YAML
from medsweep.trainables.backbones import backbone_normalisation
from medsweep.trainables.inputs import model_inputs
from medsweep.trainables.loop import device_for_trial, fit, load_trained
from medsweep.trainables.methods import Method, build_method
from medsweep.trainables.metrics import classification_metrics
from medsweep.trainables.preload import preload
from medsweep.trainables.store_io import StoreIO

BOOTSTRAP_RESAMPLES = 1000
CI_LEVEL = 0.95
_BOOTSTRAP_CHUNK = 100  # resamples scored at once: bounds memory at a few chunk x test-images arrays
EVAL_BATCH = 64


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


# ------------------------------------------------------------------ metrics


def probabilities(logits: np.ndarray, task: str) -> np.ndarray:
    """Softmax (multi-class) or sigmoid (multi-label) probabilities, the scores the AUC ranks."""
    logits = logits.astype(np.float64)
    if task == "multilabel":
        return 1 / (1 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def resampled_auc(probs: np.ndarray, labels: np.ndarray, task: str, counts: np.ndarray) -> np.ndarray:
    """Macro AUC of each bootstrap resample, given as ``counts`` [B, N]: how often each test image was drawn.

    Matches :func:`~medsweep.trainables.metrics.classification_metrics`: the
    mean of one-vs-rest (multi-class) or per-label AUCs over the classes with
    both outcomes in the resample (NaN when none has), ties counted half.
    Each class's scores are sorted once; a resample only reweights them
    (Mann-Whitney U with multiplicities), O(B x N) per class instead of a sort
    per resample. Measured on the shared 2-core host, 3 seeds x 1000
    resamples of a 25,600-image, 14-label test set (NIH ChestX-ray14 size):
    25 s this way, about 5 min ranking every resample.
    """
    targets = labels.astype(bool) if task == "multilabel" else labels[:, None] == np.arange(probs.shape[1])
    per_class = np.full((counts.shape[0], probs.shape[1]), np.nan)
    for c in range(probs.shape[1]):
        order = np.argsort(probs[:, c], kind="stable")
        scores, positive = probs[order, c], targets[order, c]
        weights = counts[:, order]  # integer multiplicities: the sums below are exact
        neg = np.where(positive, 0, weights)
        pos = weights - neg
        group_starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])  # runs of tied scores
        if len(group_starts) < len(scores):
            neg, pos = np.add.reduceat(neg, group_starts, axis=1), np.add.reduceat(pos, group_starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg  # negatives scored strictly lower than each group
        twice_u = (pos * (2 * below + neg)).sum(axis=1)  # a tied negative counts half
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        valid = (n_pos > 0) & (n_neg > 0)
        per_class[valid, c] = twice_u[valid] / (2 * n_pos[valid] * n_neg[valid])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no valid class: NaN
        return np.nanmean(per_class, axis=1)


def _draw_counts(rng: np.random.Generator, resamples: int, n: int) -> np.ndarray:
    """[resamples, n] multiplicities of ``n`` images drawn with replacement, per resample."""
    draws = rng.integers(0, n, size=(resamples, n)) + n * np.arange(resamples)[:, None]
    return np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n)


def bootstrap_auc_ci(
    probs_per_seed: list[np.ndarray],
    labels: np.ndarray,
    task: str,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> dict[str, Any]:
    """Percentile bootstrap CI of the mean over seeds of the test AUC (see the module docstring).

    Every resample draws ``len(labels)`` test images with replacement from
    ``numpy.random.default_rng(seed)`` and scores all seeds on the same draw.
    Resamples whose AUC is undefined (one class only) are dropped and counted.
    """
    if not probs_per_seed:
        raise ValueError("bootstrap_auc_ci needs the test probabilities of at least one seed")
    n = len(labels)
    identity = np.ones((1, n), dtype=np.int64)
    point = float(np.mean([resampled_auc(p, labels, task, identity)[0] for p in probs_per_seed]))
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, _BOOTSTRAP_CHUNK):
        counts = _draw_counts(rng, min(_BOOTSTRAP_CHUNK, resamples - start), n)
        means.append(np.mean([resampled_auc(p, labels, task, counts) for p in probs_per_seed], axis=0))
    values = np.concatenate(means)
    finite = values[np.isfinite(values)]
    tail = (1 - level) / 2 * 100
    low, high = (np.percentile(finite, [tail, 100 - tail]) if finite.size else (math.nan, math.nan))
    return {
        "point": point,
        "low": float(low),
        "high": float(high),
        "level": level,
        "resamples": resamples,
        "resamples_used": int(finite.size),
        "bootstrap_seed": seed,
    }


@torch.no_grad()
def predict(method: Method, store: PreloadStore, split: str, batch_size: int = EVAL_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of every image of ``split`` (eval mode, no augmentation), in store order.

    The evaluation half of ``fit``'s per-epoch validation, returning the raw
    logits because the bootstrap needs per-image scores, not only metrics.
    """
    device = device_for_trial()
    method.to(device).eval()
    io = StoreIO(store)
    mean, std = backbone_normalisation(method.config.backbone)
    stored = {c.name for c in io.columns}
    images = {k: v for k, v in method.image_inputs().items() if k in stored}
    features = tuple(k for k in method.feature_keys() if k in stored)
    logits, labels = [], []
    for arrays in io.batches(split, batch_size, epoch=0, shuffle=False):
        inputs = model_inputs(decode_columns(arrays, io.columns), images, features, mean, std, device, None)
        logits.append(method(inputs).float().cpu().numpy())
        labels.append(arrays[LABEL])
    return np.concatenate(logits), np.concatenate(labels)


# ------------------------------------------------------------------ retraining


def retrain_best(
    out: Path,
    spec: DatasetSpec,
    settings: SweepSettings,
    seeds: int = 3,
    console: SweepConsole | None = None,
    per_method: bool = False,
) -> dict[str, Any]:
    """Retrain the sweep's best configuration with ``seeds`` seeds, test each once; write final.yaml/json.

    ``per_method=True`` also retrains each other method's best configuration,
    so methods can be compared on the test split too. Returns what final.yaml holds.
    """
    if seeds < 1:
        raise ConfigError(f"the final retrain needs at least 1 seed, got {seeds} (0 means: skip the final step)")
    out = Path(out)
    console = console or SweepConsole()
    entry = _dataset_entry(read_best(out), spec, out)
    chosen = entry["per_method"] if per_method else {entry["best_method"]: entry["best"]}
    with _torch_threads(max(1, int(settings.cpus_per_trial))):
        methods = {name: _retrain_method(out, spec, settings, name, item, seeds, console) for name, item in chosen.items()}
    document = {
        spec.name: {
            "task": spec.task,
            "classes": list(spec.classes),
            "best_method": entry["best_method"],
            "protocol": _protocol(spec, seeds),
            "methods": methods,
        }
    }
    (out / FINAL_YAML).write_text(yaml.safe_dump(document, sort_keys=False))
    (out / FINAL_JSON).write_text(json.dumps(_json_safe(document), indent=2, allow_nan=False))
    console.console.print(f"final results in {out / FINAL_YAML} and {out / FINAL_JSON}")
    return document


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
            f"no trial of the sweep in {out} finished with a validation AUC; fix the failing trials and sweep again"
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


def _retrain_method(
    out: Path,
    spec: DatasetSpec,
    settings: SweepSettings,
    name: str,
    item: dict[str, Any],
    seeds: int,
    console: SweepConsole,
) -> dict[str, Any]:
    """All seeds of one method's best configuration, then its summary."""
    config = {**item["config"], "num_classes": spec.num_classes, "task": spec.task}
    result = preload(
        spec,
        build_method(name, config),
        settings.cache_dir,
        progress=console.progress,
        with_features=settings.preload_features,
        precision=settings.precision,  # as the sweep resolved it: the store its trials read
    )
    console.store_ready(name, result)
    base_seed = int(config.get("seed", settings.seed))
    runs = []
    for i in range(seeds):
        seed_run = _train_seed(result.store, config, base_seed + i, out / FINAL_DIR / name / f"seed-{base_seed + i}")
        console.console.print(
            f"[bold]final[/] {name} seed {seed_run.seed} ({i + 1}/{seeds}): best epoch {seed_run.best_epoch}  "
            f"val AUC {seed_run.val.get('auc', math.nan):.4f} -> test AUC {seed_run.test.get('auc', math.nan):.4f}  "
            f"({seed_run.train_seconds:.1f} s)"
        )
        runs.append(seed_run)
    summary = _summarise(out, item, config, runs, base_seed)
    ci = summary["test_auc_ci"]
    console.console.print(
        f"[bold]final[/] {name}: test AUC {summary['mean'].get('test_auc', math.nan):.4f} "
        f"({CI_LEVEL:.0%} CI {ci['low']:.4f}-{ci['high']:.4f}) over {seeds} seeds"
        if ci
        else f"[bold]final[/] {name}: no seed produced a usable checkpoint (every run diverged)"
    )
    return summary


def _train_seed(store: PreloadStore, config: dict[str, Any], seed: int, folder: Path) -> SeedRun:
    """Train one seed from scratch, reload its best-validation checkpoint, test it once."""
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
    method = load_trained(config["method"], config, checkpoint)
    logits, labels = predict(method, store, "test")
    task = config["task"]
    return SeedRun(
        seed=seed,
        best_epoch=int(best["epoch"]),
        val={k.removeprefix("val_"): float(v) for k, v in best.items() if k.startswith("val_")},
        test=classification_metrics(logits, labels, task),
        train_seconds=seconds,
        checkpoint=checkpoint,
        last_report=io.reports[-1],
        probabilities=probabilities(logits, task),
        labels=labels,
    )


def _summarise(out: Path, item: dict[str, Any], config: dict[str, Any], runs: list[SeedRun], base_seed: int) -> dict[str, Any]:
    """One method's final.yaml entry: config, per-seed metrics, mean and std, CI, cost."""
    usable = [r for r in runs if r.probabilities is not None]
    flat = [{**{f"val_{k}": v for k, v in r.val.items()}, **{f"test_{k}": v for k, v in r.test.items()}} for r in usable]
    keys = list(flat[0]) if flat else []
    last = runs[-1].last_report
    ci = (
        bootstrap_auc_ci([r.probabilities for r in usable], usable[0].labels, config["task"], seed=base_seed)
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
    if args.cache_dir is not None:
        settings.cache_dir = args.cache_dir
    spec = sweep_dataset(settings)
    retrain_best(args.dir, spec, settings, seeds=args.seeds, console=SweepConsole(), per_method=args.per_method)
    return 0
