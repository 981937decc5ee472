"""Figure 1: how far a sweep's wall time is from the FLOPs it must do at this machine's matmul rate.

The floor counts the work no implementation can skip: one frozen-backbone
pass over every image (the preload) and each trial's side-network training
(forward + backward ~ 3 x forward per training sample, one forward per
validation sample, for the epochs the trial really ran). FLOPs are counted
with ``FlopCounterMode`` on one batch of each path; the rate is the best
sustained large fp32 matmul on the same cores, measured right after the sweep.
"""

from __future__ import annotations

from typing import Any

from bench.common import main_sweep, sweep_flops, sweep_wall, table, tune_breakdown
from bench.context import RAY_CPUS
from bench.flops import matmul_rate

NAME = "floor"
TITLE = "1. Compute floor: sweep wall time over the FLOPs it must do"
TARGET = 1.3


def floor_of(record: dict[str, Any], rate: float) -> dict[str, float]:
    """FLOPs of a sweep record and the seconds they take at ``rate`` FLOP/s."""
    flops = sweep_flops(record)
    return {**flops, "floor_s": flops["total_flops"] / rate}


def run(ctx) -> dict[str, Any]:
    record = main_sweep(ctx)
    rates = {"threads_1": matmul_rate(1), f"threads_{RAY_CPUS}": matmul_rate(RAY_CPUS)}
    rate = max(rates.values())
    floor = floor_of(record, rate)
    wall = sweep_wall(record)
    ratio = wall / floor["floor_s"]
    return {
        "status": "PASS" if ratio <= TARGET else "SHORT",
        "data": {
            "sweep": record["name"],
            "backbone": record["backbone"],
            "image_size": record["image_size"],
            "trials": len(record["trials"]),
            "epochs_trained": sum(t["epochs_run"] for t in record["trials"]),
            "splits": record["splits"],
            "rates": rates,
            "rate": rate,
            **floor,
            "wall_s": wall,
            "ratio": ratio,
            "ray_start_s": record["ray_start_s"],
            "phases": record["phases"],
            "tune": tune_breakdown(record),
            "train_steps_core_s": sum(t["train_step_seconds"] for t in record["trials"]),
        },
    }


def render(result: dict[str, Any]) -> str:
    d = result["data"]
    p, t = d["phases"], d["tune"]
    floor_train = d["train_flops"] / d["rate"]
    floor_preload = d["preload_flops"] / d["rate"]
    rows = [
        ("Ray start (`ray.init`, once per process)", d["ray_start_s"], 0.0),
        ("dataset resolve (images already on disk)", p["dataset_s"], 0.0),
        ("preload: frozen pass over every image + Parquet write", p["preload_s"], floor_preload),
        ("Ray Data read + materialize (train, val)", p["materialize_s"], 0.0),
        (f"Tune: training steps (sum / {RAY_CPUS} concurrent trials)", t["train_steps_s"], floor_train),
        ("Tune: in-trial overhead (trial time - step time, / 2)", t["in_trial_overhead_s"], 0.0),
        ("Tune: idle slots (scheduling, trial start/stop, export)", t["idle_slots_s"], 0.0),
        ("**total**", d["wall_s"], d["floor_s"]),
    ]
    ach_train = d["train_flops"] / d["train_steps_core_s"] if d["train_steps_core_s"] else float("nan")
    gaps = sorted(rows[:-1], key=lambda row: row[2] - row[1])[:3]
    why = "; ".join(f"{name} +{s - f:.1f} s" for name, s, f in gaps)
    return "\n\n".join(
        [
            f"**{d['trials']}-trial FPT+ sweep** (`{d['backbone']}`, {d['image_size']} px, synthetic set "
            f"{'/'.join(str(n) for n in d['splits'].values())} train/val/test images, "
            f"TPE + ASHA, {d['epochs_trained']} epochs trained in all): wall **{d['wall_s']:.1f} s** vs floor "
            f"**{d['floor_s']:.2f} s** = **{d['ratio']:.0f}x** (target <= {TARGET}x).",
            f"FLOPs: preload {d['preload_flops'] / 1e9:.1f} G + training {d['train_flops'] / 1e9:.1f} G = "
            f"{d['total_flops'] / 1e9:.1f} G; matmul rate "
            + ", ".join(f"{k.replace('_', ' ')}: {v / 1e9:.1f} GFLOP/s" for k, v in d["rates"].items())
            + f" (the floor uses the better of the two, {d['rate'] / 1e9:.1f} GFLOP/s).",
            table(("where the wall time went", "seconds", "floor seconds"), rows),
            f"Largest gaps above the floor: {why}. Inside the training steps the side network ran at "
            f"{ach_train / 1e9:.2f} GFLOP/s per core ({100 * ach_train / d['rates']['threads_1']:.1f}% of the "
            "one-thread matmul rate): its matmuls are small, far below the size at which that rate is reached, and "
            "the step time also holds batch decoding, augmentation and the optimizer step.",
        ]
    )


def summary(result: dict[str, Any]) -> tuple[str, str]:
    d = result["data"]
    return f"wall / floor <= {TARGET}", f"{d['ratio']:.0f}x ({d['wall_s']:.0f} s vs {d['floor_s']:.2f} s, {d['trials']} trials)"
