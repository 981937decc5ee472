"""Figure 11: figure 1's FPT+ sweep with fused cohorts against one process per trial, side by side.

Both sweeps run in this invocation on the same Ray instance, store and
search: the default (cohorts, ``--cohort-size`` auto) and ``--cohort-size 1``
(every trial its own Tune trial and process, as before cohorts). Each is
timed whole (Ray start plus ``run_sweep``) and set against the FLOP floor of
figure 1, counted for the epochs its trials really ran.

Then, on the same Ray, what starting the members costs without any of
medsweep: 16 trivial Tune trials (0.01 CPU each, as a fused sweep's
members), started all at once and two at a time (as the sweep starts its
members: as many pending as trial slots), against 16 plain Ray actors of the
same size; the seconds until the last one has run its first line bound how
soon 16 members can all train on this machine, whatever the cohort does.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.common import demo_spec, main_sweep, sweep_wall, table
from bench.context import RAY_CPUS
from bench.figures.floor import floor_of
from bench.flops import cuda_matmul_rate, matmul_rate
from bench.start_cost import start_cost

NAME = "cohort_sweep"
TITLE = "11. Fused cohorts: figure 1's sweep, cohorts vs one process per trial"
TARGET_SPEEDUP = 3.0
TARGET_RATIO = 6.0
CPU_MEMBERS = 8  # members per cohort for the fused arm on CPUs


def run(ctx) -> dict[str, Any]:
    demo_spec(ctx.cache_dir)  # the synthetic set is written before either clock starts, not inside the first sweep
    # On a GPU the default sizes cohorts from the memory probe; on CPUs the default runs trials alone, so fuse explicitly.
    fused = main_sweep(ctx) if torch.cuda.is_available() else ctx.sweep(trials=ctx.plan.main_trials, max_epochs=ctx.plan.main_epochs, cohort_size=CPU_MEMBERS)
    alone = ctx.sweep(trials=ctx.plan.main_trials, max_epochs=ctx.plan.main_epochs, cohort_size=1)
    rate = cuda_matmul_rate() if torch.cuda.is_available() else max(matmul_rate(1), matmul_rate(RAY_CPUS))  # where the trials trained
    rows = {}
    for name, record in (("cohorts", fused), ("one per trial", alone)):
        wall = sweep_wall(record)
        floor = floor_of(record, rate)["floor_s"]
        rows[name] = {
            "wall_s": wall,
            "floor_s": floor,
            "ratio": wall / floor,
            "cohort_size": record.get("settings", {}).get("cohort_size"),
            **arm_summary(record),
        }
    speedup = rows["one per trial"]["wall_s"] / rows["cohorts"]["wall_s"]
    passed = speedup >= TARGET_SPEEDUP and rows["cohorts"]["ratio"] <= TARGET_RATIO
    data = {
        "rows": rows,
        "speedup": speedup,
        "rate": rate,
        "backbone": fused["backbone"],
        "image_size": fused["image_size"],
        "start_cost": start_cost(ctx, paced=RAY_CPUS),
    }
    return {"status": "PASS" if passed else "SHORT", "data": data}


def arm_summary(record: dict[str, Any]) -> dict[str, Any]:
    """One sweep as the cohort figures (11, 11b) show it: its trials and epochs, its Tune run, the sizes of its
    cohorts, the seconds from the start of the Tune run to its first and to its last result, and the seconds
    outside the Tune run (Ray start, dataset, store, materialize, outputs), which no fusing shortens."""
    times = [event["t"] for event in record.get("events", [])]
    return {
        "trials": len(record["trials"]),
        "epochs_trained": sum(t["epochs_run"] for t in record["trials"]),
        "tune_s": record["phases"]["tune_s"],
        "cohorts": sorted((len(c["trials"]) for c in record.get("cohorts", [])), reverse=True),
        "outside_tune_s": sweep_wall(record) - record["phases"]["tune_s"],
        **({"first_result_s": min(times), "last_result_s": max(times)} if times else {}),
    }


def render(result: dict[str, Any]) -> str:
    d = result["data"]
    cohorts = d["rows"]["cohorts"].get("cohorts", [])
    rows = [(name, r["trials"], r["epochs_trained"], r["wall_s"], r["tune_s"], r["floor_s"], f"{r['ratio']:.1f}x") for name, r in d["rows"].items()]
    headers = ("sweep", "trials", "epochs trained", "wall s", "of which Tune s", "floor s", "wall / floor")
    return "\n\n".join(
        [
            f"FPT+ on `{d['backbone']}` at {d['image_size']} px, figure 1's sweep (TPE + ASHA) run twice in one invocation.",
            table(headers, rows),
            f"Cohorts are **x{d['speedup']:.2f}** faster in wall time (target >= {TARGET_SPEEDUP}x) at "
            f"**{d['rows']['cohorts']['ratio']:.1f}x** the floor (target <= {TARGET_RATIO}x). ASHA stops trials on "
            "what they report, so the two searches may train different numbers of epochs (the table counts them).",
            f"The fused sweep's {len(cohorts)} cohorts had {', '.join(map(str, cohorts))} members. Members fuse only when "
            "every shape key agrees (keep ratio is masked; num_prompts, batch size and the other shape keys are "
            "grouped); the searcher hands a fused method's trials out in runs of K that share their leader's shape "
            "keys (`medsweep/search/cohort_pins.py`), so they fill whole cohorts. Before it, TPE drew those keys per "
            "trial and the same sweep split into 11 cohorts of 1-3 members.",
            _window_text(d["rows"]),
            _start_cost_text(d.get("start_cost")),
        ]
    )


def _window_text(rows: dict[str, dict[str, Any]]) -> str:
    """Where each arm's wall time went: outside the Tune run, before the first result, between first and last."""
    if any("first_result_s" not in row for row in rows.values()):
        return ""
    lines = [
        f"{name}: {r['outside_tune_s']:.1f} s outside the Tune run, first result {r['first_result_s']:.1f} s into it, last {r['last_result_s']:.1f} s"
        for name, r in rows.items()
    ]
    alone = rows["one per trial"]
    needed = alone["wall_s"] / TARGET_SPEEDUP
    return (
        f"*Where the time went.* {'; '.join(lines)}. The training itself (first to last result) is where fusing acts. "
        f"A {TARGET_SPEEDUP:g}x speed-up needs the whole fused sweep in {needed:.1f} s, while the one-per-trial "
        f"sweep already spends {alone['outside_tune_s']:.1f} s outside its Tune run (Ray start, dataset, store, "
        "materialize, outputs), which fusing cannot shorten: at this toy scale no fusion reaches the target; only "
        "sweeps whose training dominates their wall time (larger images, more epochs, a GPU) can approach it."
    )


def _start_cost_text(cost: dict[str, float] | None) -> str:
    """What bounds the fused arm on this machine: starting one Tune trial actor per member."""
    if cost is None:
        return ""
    extra = RAY_CPUS * (cost["tune_last_s"] - cost["actors_s"]) / cost["count"]
    return (
        f"*What bounds it here.* On the same Ray, {cost['count']:.0f} trivial Tune trials (0.01 CPU, a function that "
        f"only reports) started all at once reported first after {cost['tune_first_s']:.1f} s and last after "
        f"{cost['tune_last_s']:.1f} s; started {cost['paced']:.0f} at a time, as the sweep starts its members (as many "
        f"pending as trial slots: process starts compete for the cores), first after {cost['paced_first_s']:.1f} s "
        f"and last after {cost['paced_last_s']:.1f} s; {cost['count']:.0f} plain Ray actors of the same size had all run `__init__` "
        f"after {cost['actors_s']:.1f} s: a Tune trial's actor costs ~{extra:.1f} CPU-seconds more than a plain one "
        f"(it imports Tune and Train). Every member is a Tune trial, as the search, ASHA and the trackers need, so on "
        "2 cores a 16-trial fused sweep pays that for each member before its cohorts can train, where one process per "
        "trial starts 2 actors and reuses them. Until 2026-12-07 each member (and the router) also imported torch "
        "and the model code, because Ray imports the module of an actor handle's class wherever the handle goes and "
        "the servers' class lived beside them; the fused sweep took 150 s then (42 s alone). A fused step saves the "
        "batch making and the optimizers' per-tensor overhead on CPUs, not the matmuls (figure 10), so the default "
        "runs trials alone on CPUs; on a GPU, where "
        "K members share one launch sequence and one CUDA context, cohorts are the default."
    )


def summary(result: dict[str, Any]) -> tuple[str, str]:
    d = result["data"]
    fused, alone = d["rows"]["cohorts"], d["rows"]["one per trial"]
    return (
        f"cohorts >= {TARGET_SPEEDUP}x faster, wall / floor <= {TARGET_RATIO}x",
        f"x{d['speedup']:.2f}, {fused['ratio']:.1f}x floor ({fused['wall_s']:.0f} s vs {alone['wall_s']:.0f} s)",
    )
