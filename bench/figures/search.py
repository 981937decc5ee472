"""Figure 5: compute to come within 0.005 AUC of the grid's best: TPE + ASHA vs random vs grid.

Three searches over FPT+ on the CPU benchmark, all with the same epoch cap:

* TPE + ASHA: the main sweep of figure 1 (``run_sweep`` defaults: seeded TPE,
  the recommended point first, ASHA on validation AUC by epoch);
* random: ``run_sweep(search="random", early_stopping=False)``;
* grid: the sweep has no grid mode, so the grid runs here: every combination
  of a few learning rates and keep ratios around the recommended point (the
  other searched values at their recommended value), each config produced by
  replaying the sweep's own search space (``medsweep.spaces.replay``) and
  trained with ``medsweep.trainables.runner.train_once``, the loop a trial
  runs, over the same preload store without Ray (torch threads as a trial;
  batches come in ``StoreIO``'s shuffled order, not Ray Data's, so a config
  does not score exactly as it would inside a sweep).

Compute is counted in epochs trained (each epoch costs about the same FLOPs
whatever the trial); the anytime curve of each search is the best validation
AUC seen after each finished epoch, in the order the epochs finished. "Equal
compute" is the smallest total any of the three spent.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

from bench.common import demo_spec, main_sweep, random_sweep, recommended_point, sweep_config, table, trial_threads
from medsweep.trainables.runner import train_once

NAME = "search"
TITLE = "5. Search efficiency: TPE + early stopping vs random vs grid"
TOLERANCE = 0.005
PLOT = Path(__file__).resolve().parents[1] / "search.png"


def grid_search(ctx) -> dict[str, Any]:
    """Train every grid point in turn; returns its configs, per-epoch AUCs and wall time."""
    spec = demo_spec(ctx.cache_dir)
    runs, events = [], []
    start = time.perf_counter()
    for index, (lr, keep) in enumerate(itertools.product(ctx.plan.grid_lrs, ctx.plan.grid_keep_ratios)):
        config = sweep_config(spec, {"lr": lr, "keep_ratio": keep}, ctx.plan.main_epochs)
        with trial_threads():
            reports = train_once(spec, config, ctx.cache_dir, ctx.work / "grid" / f"point-{index}")
        events += [{"trial_id": f"grid-{index}", "epoch": r["epoch"], "val_auc": r["val_auc"]} for r in reports]
        runs.append({"lr": lr, "keep_ratio": keep, "best_val_auc": max(r["val_auc"] for r in reports)})
    return {"recommended": recommended_point(spec), "runs": runs, "events": events, "seconds": time.perf_counter() - start}


def anytime(events: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(epochs trained so far, best validation AUC so far) after each finished epoch."""
    best, curve = -math.inf, []
    for done, event in enumerate(events, start=1):
        if event["val_auc"] == event["val_auc"]:
            best = max(best, event["val_auc"])
        curve.append((done, best))
    return curve


def epochs_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((epochs for epochs, best in curve if best >= target), None)


def best_at(curve: list[tuple[int, float]], budget: int) -> float:
    return max((best for epochs, best in curve if epochs <= budget), default=float("nan"))


def recommended_auc(trials: list[dict[str, Any]], recommended: dict[str, Any]) -> float:
    """Best validation AUC of the trial that ran the recommended point (every search runs it first)."""
    for trial in trials:
        if all(math.isclose(float(trial[k]), float(v)) for k, v in recommended.items()):
            return trial["best_val_auc"]
    return float("nan")


def run(ctx) -> dict[str, Any]:
    tpe = main_sweep(ctx)
    rnd = random_sweep(ctx)
    grid = grid_search(ctx)
    grid_trials = [{**grid["recommended"], **r} for r in grid["runs"]]
    curves = {
        "TPE + ASHA": anytime(sorted(tpe["events"], key=lambda e: e["t"])),
        "random": anytime(sorted(rnd["events"], key=lambda e: e["t"])),
        "grid": anytime(grid["events"]),
    }
    target = max(r["best_val_auc"] for r in grid["runs"]) - TOLERANCE
    budget = min(curve[-1][0] for curve in curves.values())
    arms = {
        name: {
            "trials": trials,
            "epochs_total": curve[-1][0],
            "epochs_to_target": epochs_to(curve, target),
            "best_at_budget": best_at(curve, budget),
            "best": curve[-1][1],
            "seconds": seconds,
        }
        for (name, curve), trials, seconds in zip(
            curves.items(),
            (len(tpe["trials"]), len(rnd["trials"]), len(grid["runs"])),
            (tpe["phases"]["tune_s"], rnd["phases"]["tune_s"], grid["seconds"]),
        )
    }
    tpe_cost = arms["TPE + ASHA"]["epochs_to_target"]
    others = [a["epochs_to_target"] for n, a in arms.items() if n != "TPE + ASHA"]
    wins = tpe_cost is not None and tpe_cost <= budget and all(o is None or tpe_cost <= o for o in others)
    return {
        "status": "PASS" if wins else "SHORT",
        "data": {
            "val_images": tpe["splits"]["val"],
            "target_auc": target,
            "budget_epochs": budget,
            "arms": arms,
            "curves": curves,
            "grid": grid,
            "recommended_auc": {
                name: recommended_auc(trials, grid["recommended"])
                for name, trials in (("TPE + ASHA", tpe["trials"]), ("random", rnd["trials"]), ("grid", grid_trials))
            },
        },
    }


def plot(data: dict[str, Any], path: Path) -> None:
    """Anytime curves: best validation AUC so far against epochs trained so far, one line per search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, curve in data["curves"].items():
        ax.step([c[0] for c in curve], [c[1] for c in curve], where="post", label=name)
    ax.axhline(data["target_auc"], color="grey", linestyle=":", label=f"grid best - {TOLERANCE}")
    ax.axvline(data["budget_epochs"], color="grey", linestyle="--", label="equal compute")
    ax.set(xlabel="epochs trained", ylabel="best validation AUC so far", title="search efficiency (FPT+, CPU benchmark)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(result: dict[str, Any]) -> str:
    d = result["data"]
    plot(d, PLOT)
    grid = d["grid"]
    rows = [
        (
            name,
            a["trials"],
            a["epochs_total"],
            a["epochs_to_target"] if a["epochs_to_target"] is not None else "not reached",
            a["best_at_budget"],
            a["best"],
            a["seconds"],
        )
        for name, a in d["arms"].items()
    ]
    lrs = sorted({r["lr"] for r in grid["runs"]})
    keeps = sorted({r["keep_ratio"] for r in grid["runs"]})
    tpe = d["arms"]["TPE + ASHA"]
    costs = {a["epochs_to_target"] for a in d["arms"].values()}
    verdict = (
        ("All three tied" if len(costs) == 1 else "TPE + ASHA got there first") + " (see the table)."
        if result["status"] == "PASS"
        else "TPE + ASHA did not get there first"
        + (" (it never reached the target)" if tpe["epochs_to_target"] is None else "")
        + f". With {d['val_images']} validation images and one seed per search, an AUC difference of "
        f"{TOLERANCE} is within run-to-run noise; separating the searches needs several seeds."
    )
    same = d["recommended_auc"]
    noise = (
        "The same recommended config scored "
        + ", ".join(f"{v:.4f} ({k})" for k, v in same.items())
        + f": same config and seed, so this spread is pipeline noise (batch order, Ray Data vs StoreIO); "
        f"compare it with the {TOLERANCE} tolerance."
    )
    return "\n\n".join(
        [
            f"Target: the grid's best validation AUC - {TOLERANCE} = **{d['target_auc']:.4f}**. Equal compute: "
            f"{d['budget_epochs']} epochs (the smallest total of the three). Grid: lr in "
            f"{', '.join(f'{v:g}' for v in lrs)} x keep_ratio in {', '.join(f'{v:g}' for v in keeps)}, other values "
            f"recommended ({', '.join(f'{k}={v}' for k, v in grid['recommended'].items() if k not in ('lr', 'keep_ratio'))}).",
            table(
                ("search", "trials", "epochs in all", "epochs to target", "best AUC at equal compute", "best AUC", "wall s"),
                rows,
            ),
            f"![search curves]({PLOT.name})",
            "Wall seconds are not comparable across rows: the sweeps run two trials at once through Ray, the grid "
            "runs one config after another in-process. " + verdict,
            noise,
        ]
    )


def summary(result: dict[str, Any]) -> tuple[str, str]:
    d = result["data"]
    cost = {name: a["epochs_to_target"] for name, a in d["arms"].items()}
    measured = ", ".join(f"{name} {'-' if c is None else c}" for name, c in cost.items())
    return "TPE + ASHA reaches grid best - 0.005 with the least compute", f"epochs to target: {measured}"
