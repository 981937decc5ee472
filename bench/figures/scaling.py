"""Figure 7: how the figures grow with the number of trials and with image size.

Trials: the small task of figure 2 (default FPT+ sweep, ``tiny_epochs`` per
trial, fresh preload each) at 4, 16 and (full mode) 64 trials: wall time,
compute floor, their ratio, per-trial overhead.

Image size: FPT+ on ``vit-small-demo`` with the frozen model at 224, 384 and
512 px (side network at a quarter) on a small synthetic set drawn at that
size, without Ray: the preload as a sweep runs it (driver, default torch
threads; seconds and store bytes per image), then two training epochs through
``train_once`` with a trial's torch threads (the second epoch's seconds, so
one-off warm-up is left out; the step's memory proxy), and the FLOPs of both paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsweep.trainables.preload import preload
from medsweep.trainables.runner import train_once

from bench.common import (
    DEMO_SIZE,
    median,
    small_synthetic,
    sweep_config,
    sweep_wall,
    table,
    tiny_sweep,
    trial_method,
    trial_overheads,
    trial_threads,
)
from bench.context import RAY_CPUS
from bench.figures.floor import floor_of
from bench.flops import frozen_flops_per_image, matmul_rate, side_forward_flops_per_sample

NAME = "scaling"
TITLE = "7. Scaling with trials and image size"
PLOT = Path(__file__).resolve().parents[1] / "scaling.png"


def trial_scaling(ctx, rate: float) -> list[dict[str, Any]]:
    rows = []
    for trials in ctx.plan.scaling_trials:
        record = tiny_sweep(ctx, trials)
        floor = floor_of(record, rate)
        wall = sweep_wall(record)
        rows.append(
            {
                "trials": trials,
                "epochs": sum(t["epochs_run"] for t in record["trials"]),
                "wall_s": wall,
                "floor_s": floor["floor_s"],
                "ratio": wall / floor["floor_s"],
                "preload_s": record["phases"]["preload_s"],
                "materialize_s": record["phases"]["materialize_s"],
                "tune_s": record["phases"]["tune_s"],
                "median_overhead_s": median(trial_overheads(record)),
                "tune_s_per_trial": record["phases"]["tune_s"] / trials,
            }
        )
    return rows


def size_scaling(ctx) -> list[dict[str, Any]]:
    rows = []
    for size in ctx.plan.image_sizes:
        spec = small_synthetic(ctx.cache_dir, f"size-{size}", size, ctx.plan.size_split)
        config = sweep_config(spec, {}, epochs=2, size=size)
        method = trial_method(spec, {}, size=size)
        ctx.fresh_stores()
        result = preload(spec, method, ctx.cache_dir)  # as run_sweep: in the driver, default torch threads
        with trial_threads():
            first, second = train_once(spec, config, ctx.cache_dir, ctx.work / f"size-{size}")
        images = sum(len(s) for s in spec.splits.values())
        rows.append(
            {
                "image_size": size,
                "side_image_size": method.side_image_size,
                "images": images,
                "preload_s_per_image": result.seconds / result.images_processed,
                "store_kib_per_image": result.store.bytes_per_image() / 1024,
                "file_kib_per_image": result.store.size_bytes() / images / 1024,
                "epoch_s": second["epoch_seconds"],
                "train_step_s": second["train_step_seconds"] - first["train_step_seconds"],
                "train_images": len(spec.splits["train"]),
                "peak_step_mib": second["peak_mem_mb"],
                "frozen_gflops_per_image": frozen_flops_per_image(method) / 1e9,
                "side_gflops_per_sample": side_forward_flops_per_sample(method) / 1e9,
            }
        )
    return rows


def run(ctx) -> dict[str, Any]:
    trials = trial_scaling(ctx, max(matmul_rate(1), matmul_rate(RAY_CPUS)))
    return {"status": "INFO", "data": {"trials": trials, "sizes": size_scaling(ctx)}}


def _trial_ticks(ax, trials: list[int]) -> None:
    """Plain trial counts on a log axis (not 4 x 10^0)."""
    ax.set_xticks(trials, [str(t) for t in trials])
    ax.minorticks_off()


def plot(data: dict[str, Any], path: Path) -> None:
    """Four panels: wall vs floor and per-trial overhead by trials; preload/epoch and bytes by size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials, sizes = data["trials"], data["sizes"]
    n = [r["trials"] for r in trials]
    px = [r["image_size"] for r in sizes]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    ax = axes[0][0]
    ax.plot(n, [r["wall_s"] for r in trials], "o-", label="sweep wall")
    ax.plot(n, [r["floor_s"] for r in trials], "s--", label="compute floor")
    ax.set(xscale="log", yscale="log", xlabel="trials", ylabel="seconds", title="sweep wall time vs floor")
    _trial_ticks(ax, n)
    ax.legend()
    ax = axes[0][1]
    ax.plot(n, [r["median_overhead_s"] for r in trials], "o-", label="median overhead per trial")
    ax.plot(n, [r["tune_s_per_trial"] for r in trials], "s--", label="Tune phase wall / trials")
    ax.set(xscale="log", xlabel="trials", ylabel="seconds", title="per-trial cost")
    _trial_ticks(ax, n)
    ax.legend()
    ax = axes[1][0]
    ax.plot(px, [r["preload_s_per_image"] for r in sizes], "o-", label="preload s / image")
    ax.plot(px, [r["epoch_s"] / r["train_images"] for r in sizes], "s--", label="training epoch s / image")
    ax.set(yscale="log", xlabel="frozen input, px", ylabel="seconds", title="time per image")
    ax.legend()
    ax = axes[1][1]
    ax.plot(px, [r["store_kib_per_image"] for r in sizes], "o-", label="store KiB / image")
    ax.plot(px, [r["peak_step_mib"] for r in sizes], "s--", label="step memory proxy, MiB")
    ax.set(yscale="log", xlabel="frozen input, px", title="bytes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fixed_share(row: dict[str, Any]) -> float:
    return (row["preload_s"] + row["materialize_s"]) / row["wall_s"]


def render(result: dict[str, Any]) -> str:
    d = result["data"]
    plot(d, PLOT)
    trial_rows = [
        (
            r["trials"],
            r["epochs"],
            r["wall_s"],
            r["floor_s"],
            r["ratio"],
            r["preload_s"],
            r["materialize_s"],
            r["tune_s"],
            r["median_overhead_s"],
        )
        for r in d["trials"]
    ]
    size_rows = [
        (
            f"{r['image_size']} / {r['side_image_size']}",
            r["frozen_gflops_per_image"],
            r["side_gflops_per_sample"] * 1e3,
            r["preload_s_per_image"],
            r["store_kib_per_image"],
            r["file_kib_per_image"],
            r["epoch_s"],
            r["train_step_s"],
            r["peak_step_mib"],
        )
        for r in d["sizes"]
    ]
    first, last = d["trials"][0], d["trials"][-1]
    return "\n\n".join(
        [
            f"![scaling]({PLOT.name})",
            f"Trials (small task, default sweep at {DEMO_SIZE} px, fresh preload per sweep):",
            table(
                ("trials", "epochs", "wall s", "floor s", "wall / floor", "preload s", "materialize s", "tune s", "median overhead / trial, s"),
                trial_rows,
            ),
            f"From {first['trials']} to {last['trials']} trials the wall / floor ratio goes from {first['ratio']:.0f}x "
            f"to {last['ratio']:.0f}x; preload + materialize are {100 * _fixed_share(first):.0f}% of the wall at "
            f"{first['trials']} trials and {100 * _fixed_share(last):.0f}% at {last['trials']}.",
            f"Image size (frozen / side px, `vit-small-demo`, {d['sizes'][0]['images']} images per size, "
            f"second epoch over {d['sizes'][0]['train_images']} training images, `train_once` without Ray):",
            table(
                (
                    "px",
                    "frozen GFLOP / image",
                    "side MFLOP / sample",
                    "preload s / image",
                    "store KiB / image",
                    "Parquet KiB / image",
                    "epoch s",
                    "of which steps s",
                    "step memory proxy MiB",
                ),
                size_rows,
            ),
        ]
    )


def summary(result: dict[str, Any]) -> tuple[str, str]:
    d = result["data"]
    trials = ", ".join(f"{r['trials']}: {r['ratio']:.0f}x" for r in d["trials"])
    sizes = ", ".join(f"{r['image_size']} px: {r['store_kib_per_image']:,.0f} KiB" for r in d["sizes"])
    return "table + plot (no target)", f"wall/floor by trials {trials}; store per image {sizes}"
