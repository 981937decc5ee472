"""Helpers several figures share: the benchmark task, trial configs, FLOP totals, markdown."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import torch

from medsweep.datasets import load_dataset, load_imagefolder, make_synthetic
from medsweep.datasets.spec import DatasetSpec
from medsweep.search.settings import DEMO_BACKBONE, SweepSettings, fixed_config
from medsweep.search.space import build_search
from medsweep.spaces import points_to_evaluate, replay
from medsweep.trainables.methods import Method, build_method

from bench.context import RAY_CPUS
from bench.flops import frozen_flops_per_image, side_forward_flops_per_sample

METHOD = "fpt_plus"
DEMO_SIZE = SweepSettings().image_size  # the sweep's default resolution (128 px)
# Searched keys that change the FLOPs of a training sample (batch size only changes how they are grouped).
FLOP_KEYS = ("keep_ratio", "num_prompts")


@contextmanager
def trial_threads() -> Iterator[None]:
    """Torch threads as a sweep trial sets them (``cpus_per_trial``), for loops run outside Ray."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(SweepSettings().cpus_per_trial)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def demo_spec(cache_dir: Path, size: int = DEMO_SIZE) -> DatasetSpec:
    """The CPU benchmark: the built-in synthetic set (360/120/120 images, 3 grades) at ``size`` px."""
    return load_dataset("synthetic", cache_dir=cache_dir, synthetic_size=size)


def small_synthetic(cache_dir: Path, name: str, size: int, split: tuple[int, int, int]) -> DatasetSpec:
    """A smaller synthetic set (same generator) for settings whose frozen pass is too slow for 600 images."""
    n_train, n_val, n_test = split
    root = make_synthetic(cache_dir / name, image_size=size, n_train=n_train, n_val=n_val, n_test=n_test)
    return load_imagefolder(root, name=name)


def trial_method(spec: DatasetSpec, params: dict[str, Any], backbone: str = DEMO_BACKBONE, size: int = DEMO_SIZE) -> Method:
    """The FPT+ model a sweep trial with searched ``params`` builds (same fixed values as ``run_sweep``)."""
    settings = SweepSettings(methods=[METHOD], backbone=backbone, image_size=size)
    return build_method(METHOD, {**fixed_config(settings, spec, METHOD), **params})


def sweep_config(
    spec: DatasetSpec, params: dict[str, Any], epochs: int, backbone: str = DEMO_BACKBONE, size: int = DEMO_SIZE
) -> dict[str, Any]:
    """The flat config a sweep trial gets for searched ``params`` (the rest at the recommended point).

    Replays the sweep's own search space, so constants (optimizer, clipping,
    side reduction...) are exactly what ``run_sweep`` would run.
    """
    settings = SweepSettings(methods=[METHOD], backbone=backbone, image_size=size, max_epochs=epochs)
    space, points = build_search([METHOD], {METHOD: fixed_config(settings, spec, METHOD)}, dataset=spec.name)
    return replay(space, {**points[0], **params})


def recommended_point(spec: DatasetSpec) -> dict[str, Any]:
    """The searched values of the recommended point (what a sweep's first trial runs)."""
    return points_to_evaluate([METHOD], dataset=spec.name)[0]


def classes_only(num_classes: int) -> DatasetSpec:
    """A spec with classes and no images: all that building a model (and counting its FLOPs) reads."""
    return DatasetSpec("classes-only", Path("."), "multiclass", [f"grade{k}" for k in range(num_classes)], {})


@cache
def _side_flops(backbone: str, size: int, num_classes: int, params: tuple[tuple[str, Any], ...]) -> int:
    return side_forward_flops_per_sample(trial_method(classes_only(num_classes), dict(params), backbone, size))


def sweep_flops(record: dict[str, Any]) -> dict[str, float]:
    """FLOPs a sweep must do: one frozen pass over every image, then each trial's epochs.

    Training: forward + backward ~ 3 x forward per training sample per epoch,
    plus one forward per validation sample, with the forward counted for each
    trial's own ``keep_ratio`` and ``num_prompts``. The one memory-probe step
    a trial runs before training is left out (one batch in thousands).
    """
    splits, num_classes = record["splits"], record["num_classes"]
    backbone, size = record["backbone"], record["image_size"]
    method = trial_method(classes_only(num_classes), {}, backbone, size)
    preload = sum(splits.values()) * frozen_flops_per_image(method)
    train = 0.0
    for trial in record["trials"]:
        params = tuple((k, trial[k]) for k in FLOP_KEYS if k in trial)
        per_sample = _side_flops(backbone, size, num_classes, params)
        train += trial["epochs_run"] * (3 * splits["train"] + splits["val"]) * per_sample
    return {"preload_flops": float(preload), "train_flops": float(train), "total_flops": float(preload + train)}


def slot_runs(record: dict[str, Any]) -> list[tuple[float, float]]:
    """(Tune seconds, training-step seconds) of each run that held a trial slot: a trial, or a fused cohort.

    A fused member reports its cohort's step seconds (its steps ran with its cohort's), so a cohort
    counts once: its longest member's time in Tune and steps. Trials in no cohort count alone."""
    trials = {str(t["trial_id"]): t for t in record["trials"]}
    runs, fused = [], set()
    for cohort in record.get("cohorts", []):
        members = [trials[t] for t in cohort["trials"] if t in trials]
        fused.update(cohort["trials"])
        if members:
            runs.append((max(m["trial_seconds"] for m in members), max(m["train_step_seconds"] for m in members)))
    runs += [(t["trial_seconds"], t["train_step_seconds"]) for trial_id, t in trials.items() if trial_id not in fused]
    return runs


def trial_overheads(record: dict[str, Any]) -> list[float]:
    """Per slot run (a trial, or a fused cohort): Tune's wall time of it minus the seconds inside its training steps."""
    return [seconds - steps for seconds, steps in slot_runs(record)]


def tune_breakdown(record: dict[str, Any]) -> dict[str, float]:
    """Split the Tune phase's wall time into training steps, in-trial overhead and idle slots.

    With ``RAY_CPUS`` one-CPU slots at once (trials, or cohort servers), slot-seconds / ``RAY_CPUS``
    is wall time; idle slots are Tune's own scheduling, trial start and teardown.
    """
    steps = sum(steps for _, steps in slot_runs(record)) / RAY_CPUS
    in_trial = sum(trial_overheads(record)) / RAY_CPUS
    return {"train_steps_s": steps, "in_trial_overhead_s": in_trial, "idle_slots_s": record["phases"]["tune_s"] - steps - in_trial}


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def sweep_wall(record: dict[str, Any]) -> float:
    """What a user waits for: Ray start plus the whole ``run_sweep``."""
    return record["ray_start_s"] + record["phases"]["total_s"]


# -- markdown ---------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: Any) -> str:
    """Numbers with 3 significant digits (thousands separated), everything else as text."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


# -- the sweeps the figures share (run once per invocation by the context) -------------

HEAVY_BACKBONE = "vit-base-patch16-384"


def main_sweep(ctx) -> dict[str, Any]:
    """The issue's FPT+ sweep: default TPE + ASHA, ``main_trials`` trials (figures 1 and 3)."""
    return ctx.sweep(trials=ctx.plan.main_trials, max_epochs=ctx.plan.main_epochs)


def tiny_sweep(ctx, trials: int, preload: bool = True) -> dict[str, Any]:
    """The small task of figures 2 and 7: default sweep, ``tiny_epochs`` epochs per trial."""
    extra = {} if preload else {"preload_features": False}
    return ctx.sweep(trials=trials, max_epochs=ctx.plan.tiny_epochs, **extra)


def heavy_sweep(ctx, preload: bool) -> dict[str, Any]:
    """Figure 2 where the frozen model dominates: ViT-B/16 frozen at 128 px on a small synthetic set."""
    spec = small_synthetic(ctx.cache_dir, "heavy-set", DEMO_SIZE, ctx.plan.heavy_split)
    return ctx.sweep(
        dataset=str(spec.root),
        backbone=HEAVY_BACKBONE,
        trials=ctx.plan.heavy_trials,
        max_epochs=ctx.plan.heavy_epochs,
        preload_features=preload,
    )

