"""Figure 3: what orchestration costs per trial, and why trials run in Ray Train local mode.

Per trial: Tune's wall time of the trial (``time_total_s`` at its last
report) minus the seconds spent inside its training steps. What remains is
building the model, Ray Train's local-mode fit, iterating the dataset shard
outside the steps, validation, checkpointing and reporting. Not in it: the
trial's worker process start, which figure 1 counts as idle slots. A sweep
reuses trial processes and starts as many trials at once as there are slots;
in full mode figure 2's default sweep is rerun with Tune's own defaults (a
fresh process per trial, one pending trial at a time) to measure what that saves.

Side by side on the same Ray instance: ``TorchTrainer.fit`` of a loop that
only reports, with one Train worker (the default) and in local mode
(``ScalingConfig(num_workers=0)``, what single-device trials use).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from bench.common import main_sweep, median, table, tiny_sweep, trial_overheads, tune_breakdown
from bench.context import RAY_CPUS

NAME = "overhead"
TITLE = "3. Orchestration overhead per trial"
TARGET_S = 1.0
LOCAL_FITS = 3


def _report_only(config: dict[str, Any]) -> None:
    import ray.train

    ray.train.report({"done": 1})


def _fit_seconds(workers: int, storage: str, index: int) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _report_only,
        scaling_config=ScalingConfig(num_workers=workers),
        run_config=RunConfig(name=f"fit-{workers}-{index}", storage_path=storage),
    )
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def trainer_fits(ctx) -> dict[str, list[float]]:
    """One-worker fits (each starts a worker group, as a trial would) then local-mode fits."""
    ctx.ray()
    with tempfile.TemporaryDirectory(dir=ctx.work) as storage:
        return {
            "one_worker": [_fit_seconds(1, storage, i) for i in range(ctx.plan.worker_fits)],
            "local": [_fit_seconds(0, storage, i) for i in range(LOCAL_FITS)],
        }


def split_overheads(record: dict[str, Any]) -> dict[str, list[float]]:
    """Each trial's overhead in two parts, from its per-epoch reports.

    ``inside_epochs``: epoch time outside training steps (validation, waiting
    for batches); ``between_epochs``: the rest of the trial (model build,
    Train local-mode start, checkpoint save and report after each epoch).
    """
    epoch_time: dict[str, float] = {}
    for event in record["events"]:
        epoch_time[event["trial_id"]] = epoch_time.get(event["trial_id"], 0.0) + event["epoch_seconds"]
    inside, between = [], []
    for trial in record["trials"]:
        epochs = epoch_time.get(trial["trial_id"], float("nan"))
        inside.append(epochs - trial["train_step_seconds"])
        between.append(trial["trial_seconds"] - epochs)
    return {"inside_epochs": inside, "between_epochs": between}


def _tune_costs(record: dict[str, Any]) -> dict[str, Any]:
    return {"name": record["name"], "tune_s": record["phases"]["tune_s"], "trials": len(record["trials"]), **tune_breakdown(record)}


def run(ctx) -> dict[str, Any]:
    record = main_sweep(ctx)
    overheads = trial_overheads(record)
    plan = ctx.plan
    pair = (
        (
            tiny_sweep(ctx, plan.reuse_trials),
            ctx.sweep(trials=plan.reuse_trials, max_epochs=plan.tiny_epochs, ray_defaults=True, fresh_store=False),
        )
        if plan.reuse_whatif
        else None
    )
    med = median(overheads)
    return {
        "status": "PASS" if med <= TARGET_S else "SHORT",
        "data": {
            "sweep": record["name"],
            "trials": record["trials"],
            "overheads": overheads,
            "split": split_overheads(record),
            "median_s": med,
            "fits": trainer_fits(ctx),
            "tune": _tune_costs(record),
            "ray_defaults": [_tune_costs(r) for r in pair] if pair else None,
        },
    }


def _spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), median(values), max(values)


def render(result: dict[str, Any]) -> str:
    d = result["data"]
    trials = d["trials"]
    per_epoch = [o / t["epochs_run"] for o, t in zip(d["overheads"], trials, strict=True) if t["epochs_run"]]
    rows = [
        ("per trial, s", *_spread(d["overheads"])),
        ("  of which inside epochs (validation, batch waits), s", *_spread(d["split"]["inside_epochs"])),
        ("  of which between epochs (build, start, checkpoint, report), s", *_spread(d["split"]["between_epochs"])),
        ("per trial-epoch, s", *_spread(per_epoch)),
        ("trial wall (`trial_seconds`), s", *_spread([t["trial_seconds"] for t in trials])),
        ("training steps (`train_step_seconds`), s", *_spread([t["train_step_seconds"] for t in trials])),
    ]
    fits = d["fits"]
    worker, local = median(fits["one_worker"]), median(fits["local"][1:])
    parts = [
        f"Median over the {len(trials)} trials of sweep `{d['sweep']}` (figure 1's): "
        f"**{d['median_s']:.2f} s** per trial (target <= {TARGET_S:.0f} s).",
        table(("trial_seconds - train_step_seconds", "min", "median", "max"), rows),
    ]
    whatif = d.get("ray_defaults") or []
    tune_rows = [
        (
            c["name"],
            c["trials"],
            c["tune_s"],
            c["train_steps_s"],
            c["in_trial_overhead_s"],
            c["idle_slots_s"],
            c["idle_slots_s"] * RAY_CPUS / c["trials"],
        )
        for c in (d["tune"], *whatif)
    ]
    parts += [
        f"Where the Tune phase's wall time went (idle slots: no trial running in one of the {RAY_CPUS} CPU slots: "
        "Tune's scheduling, each trial's worker process start, experiment-state snapshots):",
        table(("sweep", "trials", "tune s", "steps s", "in-trial overhead s", "idle slots s", "idle slot-s per trial"), tune_rows),
    ]
    if whatif:
        ours, defaults = whatif
        per_trial = (defaults["idle_slots_s"] - ours["idle_slots_s"]) * RAY_CPUS / ours["trials"]
        parts.append(
            f"The same sweep with Ray Tune's defaults (`{defaults['name']}`: a fresh process per trial, one pending "
            f"trial at a time) vs medsweep's (`{ours['name']}`: processes reused, as many pending trials as slots): "
            f"Tune phase {defaults['tune_s']:.1f} s -> {ours['tune_s']:.1f} s "
            f"({defaults['tune_s'] / ours['tune_s']:.1f}x), {per_trial:.1f} idle slot-s per trial saved."
        )
    parts += [
        "`TorchTrainer.fit()` of a loop that only reports, same Ray instance, one-worker fits first:",
        table(
            ("fit", "seconds, each fit"),
            [
                ("one Train worker (default)", ", ".join(f"{s:.1f}" for s in fits["one_worker"])),
                ("local mode (`num_workers=0`)", ", ".join(f"{s:.4f}" for s in fits["local"])),
            ],
        ),
        f"One worker {worker:.1f} s vs local mode {local * 1e3:.1f} ms per fit (after the first local fit); "
        "a trial in local mode pays nothing for a worker group.",
    ]
    return "\n\n".join(parts)


def summary(result: dict[str, Any]) -> tuple[str, str]:
    d = result["data"]
    fits = d["fits"]
    return (
        f"median <= {TARGET_S:.0f} s per trial",
        f"{d['median_s']:.2f} s; Train fit {median(fits['one_worker']):.1f} s (1 worker) vs "
        f"{median(fits['local'][1:]) * 1e3:.1f} ms (local)",
    )
