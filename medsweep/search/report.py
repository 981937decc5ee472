"""``medsweep report DIR``: a finished sweep as a page to read, with plots to look at.

Writes ``DIR/report/report.md`` (or ``report.html``), its PNG plots and
``pareto.csv``. Sections: the leaderboard's top rows; validation AUC against
cost (learnable parameters %, peak step memory) with the Pareto front (the
trials no other trial beats on both AUC and cost) highlighted; every trial's
learning curve; hyperparameter importance per method from the Optuna study;
the test results of ``medsweep final`` when ``final.yaml`` exists; and what the
sweep ran with, from ``manifest.json`` (:mod:`medsweep.search.manifest`).

Everything is read from files a sweep leaves (``leaderboard.csv``,
``ray/tune/trial-*/progress.csv``, the Optuna journal, ``final.yaml``), so a
report can be made again at any time, on any machine, without Ray. Plots
use matplotlib's object API (no pyplot), so no global backend is switched.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import shlex
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure

from medsweep.errors import ConfigError
from medsweep.search.export import UNUSABLE
from medsweep.search.manifest import read_manifest
from medsweep.search.pareto import pareto_front
from medsweep.search.study import (
    BEST_YAML,
    FINAL_YAML,
    LEADERBOARD_CSV,
    MANIFEST_JSON,
    PARETO_CSV,
    REPORT_DIR,
    STUDY_FILE,
    experiment_dir,
    load_study,
    not_finished,
)
from medsweep.trainables.config import NOT_HYPERPARAMETERS

TOP_ROWS = 15
# Keys of a trial's config that are the data, backbone or budget, not a choice of the search.
FIXED_KEYS = (*NOT_HYPERPARAMETERS, "side_image_size")
# (x column, axis label, file, title) of each accuracy-vs-cost plot.
COST_AXES = (
    (
        "learnable_pct",
        "learnable parameters (% of all parameters)",
        "auc_vs_params.png",
        "Validation AUC vs learnable parameters",
    ),
    ("peak_mem_mb", "peak memory of one training step (MB)", "auc_vs_memory.png", "Validation AUC vs training memory"),
)
SCORE = "best_val_auc"
DPI = 120


# ------------------------------------------------------------------ analysis


def cost_front(board: pd.DataFrame, x: str) -> np.ndarray:
    """Mask of the trials on the AUC-vs-``x`` front among those that can be the answer: a collapsed trial's AUC
    is real but its predictions one class, so it is never a trade-off worth taking (as in best.yaml's front)."""
    usable = ~board["status"].isin(UNUSABLE).to_numpy()
    score = board[SCORE].where(usable)  # NaN: neither on the front nor dominating
    return pareto_front(score, board[x]) & usable


def pareto_table(board: pd.DataFrame) -> pd.DataFrame:
    """The usable trials on the AUC-vs-params or AUC-vs-memory front, with a flag column for each."""
    flags = {f"pareto_{x}": cost_front(board, x) for x, *_ in COST_AXES}
    columns = ["trial_id", "method", SCORE, *(x for x, *_ in COST_AXES), "config_json"]
    table = board[[c for c in columns if c in board]].assign(**flags)
    return table[np.logical_or.reduce(list(flags.values()))].reset_index(drop=True)


def learning_curves(out: Path) -> pd.DataFrame:
    """Validation AUC by epoch of every trial (``trial_id``, ``epoch``, ``val_auc``) from Ray's progress.csv.

    A restored trial may log an epoch twice; the later row wins.
    """
    frames = []
    for path in sorted(experiment_dir(out).glob("trial-*/progress.csv")):
        try:
            frame = pd.read_csv(path, usecols=["trial_id", "epoch", "val_auc"], dtype={"trial_id": str})
        except (pd.errors.EmptyDataError, ValueError):  # a trial that died before its first epoch
            continue
        frames.append(frame.drop_duplicates("epoch", keep="last"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["trial_id", "epoch", "val_auc"])


@dataclass
class Importances:
    """Per method, fANOVA importance of each varying hyperparameter; notes for methods without."""

    values: dict[str, dict[str, float]]
    trials: dict[str, int]
    notes: list[str]


def param_importances(out: Path, only_method: str | None = None) -> Importances:
    """Hyperparameter importance per method from the sweep's Optuna study.

    Per method, because each method has its own parameters and the study's
    common space is only ``method``. A one-method sweep searches no ``method``
    parameter; ``only_method`` names it. Needs at least 2 completed trials of
    the method with a parameter that varies and scores that differ; otherwise a note says why not.
    """
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    if not (out / STUDY_FILE).is_file():
        return Importances({}, {}, [f"no Optuna study ({STUDY_FILE}) in the sweep folder: importances need it"])
    source = load_study(out)
    complete = [t for t in source.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # A multi-objective study (--objective auc,memory): importance for validation AUC, its maximised value.
    auc = source.directions.index(optuna.study.StudyDirection.MAXIMIZE) if len(source.directions) > 1 else None
    method_of = {t.number: t.params.get("method", only_method) for t in complete}
    values: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    notes: list[str] = []
    for method in sorted({m for m in method_of.values() if m is not None}):
        trials = [t for t in complete if method_of[t.number] == method]
        varying = _varying_params(trials)
        if len(trials) < 2 or not varying:
            notes.append(
                f"{method}: {len(trials)} completed trial(s), {len(varying)} varying parameter(s); "
                "importance needs at least 2 trials that differ (run more --trials)"
            )
            continue
        scores = {t.values[auc] if auc is not None else t.value for t in trials}
        if len(scores) < 2:  # fANOVA has no variance to attribute (it raises)
            notes.append(
                f"{method}: all {len(trials)} completed trials scored the same validation AUC, so no parameter "
                "explains a difference (run more --trials)"
            )
            continue
        with _quiet_optuna():
            study = optuna.create_study(directions=source.directions)
            study.add_trials(trials)
            target = (lambda t: t.values[auc]) if auc is not None else None
            found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), params=varying, target=target)
        values[method] = {name.removeprefix(f"{method}."): float(v) for name, v in found.items()}
        counts[method] = len(trials)
    return Importances(values, counts, notes)


def _varying_params(trials: list) -> list[str]:
    """Parameters every trial has and that take more than one value (fANOVA needs both)."""
    names = set.intersection(*(set(t.params) for t in trials)) - {"method"} if trials else set()
    return sorted(n for n in names if len({json.dumps(t.params[n]) for t in trials}) > 1)


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """No "A new study created in memory" lines in the user's terminal."""
    import optuna

    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


# ------------------------------------------------------------------ plots


def method_colours(methods: Sequence[str]) -> dict[str, Any]:
    """One fixed colour per method (sorted names), the same in every plot."""
    palette = colormaps["tab10"]
    return {m: palette(i % 10) for i, m in enumerate(sorted(set(methods)))}


def plot_cost(board: pd.DataFrame, x: str, xlabel: str, title: str, colours: dict[str, Any], path: Path) -> None:
    """AUC against one cost, trials coloured by method, the Pareto front ringed, joined and labelled."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for method, group in board.groupby("method"):
        ax.scatter(group[x], group[SCORE], s=40, color=colours[method], alpha=0.8, label=method)
    front = board[cost_front(board, x)].sort_values(x)
    ax.plot(front[x], front[SCORE], color="black", linewidth=1, drawstyle="steps-post", zorder=1)
    ax.scatter(front[x], front[SCORE], s=130, facecolors="none", edgecolors="black", linewidths=1.5, label="Pareto front")
    for i, (_, row) in enumerate(front.iterrows()):
        right = i == len(front) - 1 and len(front) > 1  # the costliest point's label goes left, inside the axes
        ax.annotate(
            str(row["trial_id"]), (row[x], row[SCORE]), textcoords="offset points",
            xytext=(-8 if right else 8, 4), ha="right" if right else "left", fontsize=8,
        )
    ax.margins(0.08)
    values = board[x].dropna()
    if len(values) and values.min() > 0 and values.max() / values.min() > 10:
        ax.set_xscale("log")
        xlabel += ", log scale"
    ax.set(title=title, xlabel=xlabel, ylabel="best validation AUC")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def plot_curves(curves: pd.DataFrame, board: pd.DataFrame, colours: dict[str, Any], path: Path) -> None:
    """Validation AUC by epoch, one line per trial coloured by method; the best trial drawn bold."""
    methods = board.set_index("trial_id")["method"]
    best = board.iloc[0]["trial_id"]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    labelled: set[str] = set()
    for trial_id, group in curves.groupby("trial_id"):
        method = methods.get(trial_id, "?")
        group = group.sort_values("epoch")
        is_best = trial_id == best
        label = f"best: {trial_id} ({method})" if is_best else (method if method not in labelled else None)
        labelled.add(method)
        ax.plot(
            group["epoch"],
            group["val_auc"],
            marker="o",
            markersize=3,
            color=colours.get(method, "grey"),
            linewidth=2.8 if is_best else 1.2,
            alpha=1.0 if is_best else 0.6,
            label=label,
            zorder=3 if is_best else 2,
        )
    ax.set(title="Validation AUC by epoch (short lines: stopped early by ASHA)", xlabel="epoch", ylabel="validation AUC")
    ax.xaxis.get_major_locator().set_params(integer=True)  # type: ignore[call-arg]  # the default AutoLocator is a MaxNLocator
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def plot_importances(importances: Importances, colours: dict[str, Any], path: Path) -> None:
    """One horizontal bar chart per method, most important parameter on top."""
    methods = sorted(importances.values)
    fig = Figure(figsize=(7, 1.2 + 0.45 * sum(len(importances.values[m]) + 1 for m in methods)))
    axes = fig.subplots(len(methods), 1, squeeze=False)[:, 0]
    for ax, method in zip(axes, methods, strict=True):
        ranked = sorted(importances.values[method].items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in ranked], [v for _, v in ranked], color=colours.get(method, "grey"))
        ax.set_xlim(0, 1)
        ax.set_title(f"{method} ({importances.trials[method]} trials)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("importance (fANOVA share of validation AUC variance)")
    fig.suptitle("Hyperparameter importance per method")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def plot_final(methods: dict[str, Any], colours: dict[str, Any], path: Path) -> None:
    """Test AUC per method: each seed as a dot, the mean as a bar with its bootstrap CI."""
    names = list(methods)
    fig = Figure(figsize=(7, 1.5 + 0.7 * len(names)))
    ax = fig.subplots()
    for y, name in enumerate(names):
        entry = methods[name]
        aucs = [s["test"].get("auc", math.nan) for s in entry["seeds"] if s.get("test")]
        ci = entry.get("test_auc_ci") or {}
        mean = entry["mean"].get("test_auc", math.nan)
        colour = colours.get(name, "grey")
        ax.scatter(aucs, [y] * len(aucs), color=colour, alpha=0.6, s=30, label="seeds" if y == 0 else None)
        if ci:
            ax.errorbar(
                [mean], [y], xerr=[[mean - ci["low"]], [ci["high"] - mean]], fmt="D", color=colour,
                ecolor="black", capsize=5, markersize=8, label="mean, 95% bootstrap CI" if y == 0 else None,
            )
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.set(title="Test AUC of the retrained configurations", xlabel="test AUC")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


# ------------------------------------------------------------------ page


@dataclass
class Block:
    """One piece of the page: a heading, a paragraph, a table or an image; rendered as Markdown or HTML."""

    kind: str
    text: str = ""  # heading or paragraph text; an image's file name
    table: pd.DataFrame | None = None
    caption: str = ""  # an image's alt text


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def render_markdown(title: str, blocks: list[Block]) -> str:
    lines = [f"# {title}", ""]
    for block in blocks:
        if block.kind == "heading":
            lines += [f"## {block.text}", ""]
        elif block.kind == "text":
            lines += [block.text, ""]
        elif block.kind == "image":
            lines += [f"![{block.caption}]({block.text})", ""]
        elif block.kind == "table":
            table = block.table
            assert table is not None
            cells = [[_fmt(v).replace("|", "\\|") for v in row] for row in table.itertuples(index=False)]
            lines += ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
            lines += ["| " + " | ".join(row) + " |" for row in cells]
            lines.append("")
    return "\n".join(lines)


def render_html(title: str, blocks: list[Block]) -> str:
    body = []
    for block in blocks:
        if block.kind == "heading":
            body.append(f"<h2>{html.escape(block.text)}</h2>")
        elif block.kind == "text":
            body.append(f"<p>{html.escape(block.text)}</p>")
        elif block.kind == "image":
            body.append(f'<img src="{html.escape(block.text)}" alt="{html.escape(block.caption)}">')
        elif block.kind == "table":
            assert block.table is not None
            body.append(block.table.map(_fmt).to_html(index=False, border=0))
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}"
        "img{max-width:100%;display:block;margin:1em 0}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(body)}</body></html>"
    )


def _hyperparameters(config_json: str) -> str:
    config = json.loads(config_json)
    return " ".join(f"{k}={_fmt(v)}" for k, v in sorted(config.items()) if k not in FIXED_KEYS)


def leaderboard_blocks(board: pd.DataFrame) -> list[Block]:
    """The top trials by best validation AUC, then the collapsed ones apart (never selected, see export)."""
    counts = ", ".join(f"{n} {status}" for status, n in board["status"].value_counts().items())
    collapsed = board[board["status"] == "collapsed"]
    ranked = board[board["status"] != "collapsed"]
    top = ranked.head(TOP_ROWS)
    shown = f"top {len(top)} of {len(ranked)}" if len(ranked) > len(top) else f"all {len(ranked)}"
    apart = "; the collapsed are listed apart below" if len(collapsed) else ""
    blocks = [
        Block("heading", "Leaderboard"),
        Block("text", f"{shown} trials by best validation AUC, of {len(board)} ({counts}{apart}); every column is in leaderboard.csv."),
        Block("table", table=_board_table(top)),
    ]
    if not collapsed.empty:
        blocks += [
            Block("heading", "Collapsed trials"),
            Block(
                "text",
                f"{len(collapsed)} trial(s) predicted one class for every validation image at their best epoch. "
                "They are never a method's or the sweep's best and are not retrained; their configurations "
                "(often a learning rate too high or too low for the method) are worth avoiding.",
            ),
            Block("table", table=_board_table(collapsed)),
        ]
    return blocks


def _board_table(top: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "rank": range(1, len(top) + 1),
            "trial": top["trial_id"],
            "method": top["method"],
            "val AUC": top[SCORE],
            "best epoch": top["best_epoch"],
            "epochs": top["epochs_run"],
            "params %": top["learnable_pct"],
            "mem MB": top["peak_mem_mb"],
            "PPE": top["ppe"],
            "status": top["status"],
            "hyperparameters": top["config_json"].map(_hyperparameters),
        }
    )


def cost_blocks(board: pd.DataFrame, folder: Path, colours: dict[str, Any]) -> list[Block]:
    blocks = [
        Block("heading", "Accuracy vs cost"),
        Block(
            "text",
            "Ringed trials are on the Pareto front: no other trial has both a higher validation AUC and a lower cost. "
            f"They are listed in {PARETO_CSV}.",
        ),
    ]
    for x, xlabel, name, title in COST_AXES:
        plot_cost(board, x, xlabel, title, colours, folder / name)
        blocks.append(Block("image", name, caption=title))
    front = pareto_table(board)
    front.to_csv(folder / PARETO_CSV, index=False)
    shown = front.drop(columns=["config_json"], errors="ignore")
    blocks.append(Block("table", table=shown))
    return blocks


def curve_blocks(out: Path, board: pd.DataFrame, folder: Path, colours: dict[str, Any]) -> list[Block]:
    curves = learning_curves(out)
    blocks = [Block("heading", "Learning curves")]
    if curves.empty:
        return [*blocks, Block("text", "No per-epoch results under ray/tune/trial-*/progress.csv.")]
    plot_curves(curves, board, colours, folder / "learning_curves.png")
    return [*blocks, Block("image", "learning_curves.png", caption="validation AUC by epoch per trial")]


def importance_blocks(out: Path, board: pd.DataFrame, folder: Path, colours: dict[str, Any]) -> list[Block]:
    methods = board["method"].unique()
    found = param_importances(out, only_method=methods[0] if len(methods) == 1 else None)
    blocks = [Block("heading", "Hyperparameter importance")]
    if found.values:
        plot_importances(found, colours, folder / "importance.png")
        blocks += [
            Block(
                "text",
                "fANOVA on each method's completed trials, scoring the value Optuna recorded for each trial "
                "(its best epoch's validation AUC, as on the leaderboard). With few trials these shares "
                "are rough.",
            ),
            Block("image", "importance.png", caption="hyperparameter importance per method"),
        ]
    return blocks + [Block("text", note) for note in found.notes]


def final_blocks(out: Path, folder: Path, colours: dict[str, Any]) -> list[Block]:
    blocks = [Block("heading", "Final test results")]
    path = out / FINAL_YAML
    if not path.is_file():
        return [*blocks, Block("text", f"Not run yet: `medsweep final {shlex.quote(str(out))}` retrains the best configuration and tests it once.")]
    document = next(iter(yaml.safe_load(path.read_text()).values()))
    methods = document["methods"]
    rows = []
    for name, entry in methods.items():
        mean, std, ci = entry["mean"], entry["std"], entry.get("test_auc_ci") or {}
        rows.append(
            {
                "method": name + (" (best on val)" if name == document["best_method"] else ""),
                "seeds": len(entry["seeds"]),
                "val AUC": _mean_std(mean.get("val_auc", math.nan), std.get("val_auc", math.nan)),
                "test AUC": _mean_std(mean.get("test_auc", math.nan), std.get("test_auc", math.nan)),
                "95% CI": f"{ci['low']:.3f}-{ci['high']:.3f}" if ci else "",
                **{f"test {k}": mean.get(f"test_{k}", math.nan) for k in ("accuracy", "f1", "kappa")},
                "params %": entry["cost"]["learnable_pct"],
                "train s/seed": entry["cost"]["train_seconds_mean"],
            }
        )
    plot_final(methods, colours, folder / "final_test.png")
    return [
        *blocks,
        *selection_blocks(document.get("selection")),
        Block("text", _protocol_text(document["protocol"])),
        Block("table", table=pd.DataFrame(rows)),
        Block("image", "final_test.png", caption="test AUC per method and seed"),
    ]


def selection_blocks(selection: dict[str, Any] | None) -> list[Block]:
    """Which of the retrained candidates was tested, each one's validation AUC over the seeds, and why."""
    if not selection:
        return []
    table = pd.DataFrame(
        {
            "trial": [c["trial_id"] + (" (chosen)" if c["trial_id"] == selection["chosen"] else "") for c in selection["candidates"]],
            "method": [c["method"] for c in selection["candidates"]],
            "search val AUC (1 seed)": [c["search_val_auc"] for c in selection["candidates"]],
            "retrained val AUC": [_mean_std(c["val_auc_mean"], c["val_auc_std"]) for c in selection["candidates"]],
        }
    )
    return [Block("text", f"Candidates: {selection['rule']}. Chosen: {selection['why']}."), Block("table", table=table)]


def _mean_std(mean: float, std: float) -> str:
    """``0.812 ± 0.010``; the mean alone for one seed (no spread to show)."""
    return f"{mean:.3f}" if not math.isfinite(std) else f"{mean:.3f} ± {std:.3f}"


def _protocol_text(protocol: dict[str, Any]) -> str:
    return (
        f"Selection: {protocol['selection']}. Test: {protocol['test']}. CI: {protocol['ci']}. "
        "± is the standard deviation over seeds; the CI is test-set sampling of the mean."
    )


def reproducibility_blocks(out: Path) -> list[Block]:
    """``manifest.json`` in a few rows: what a reader needs to rerun the sweep or to trust its numbers."""
    blocks = [Block("heading", "Reproducibility")]
    manifest = read_manifest(out)
    if manifest is None:
        return [*blocks, Block("text", f"No readable {MANIFEST_JSON} (a sweep from before medsweep wrote one).")]
    tool = manifest.get("medsweep", {})
    commit = tool.get("git_commit")
    dataset = manifest.get("dataset", {})
    seeds = manifest.get("seeds", {})
    final = seeds.get("final") or []
    rows = {
        "medsweep": f"{tool.get('version')}" + (f" (commit {commit[:12]}{', uncommitted changes' if tool.get('git_dirty') else ''})" if commit else ""),
        "Python": f"{manifest.get('python')} on {manifest.get('platform')}",
        "packages": ", ".join(f"{name} {version}" for name, version in manifest.get("packages", {}).items() if version),
        "devices": _devices_text(manifest.get("devices", {})),
        "dataset": (
            f"{dataset.get('name')}: manifest hash {dataset.get('manifest_hash')}, "
            + ", ".join(f"{split} {n}" for split, n in dataset.get("splits", {}).items())
            + "".join(f"; {note}" for note in dataset.get("auc_notes", []))
        ),
        "stores": ", ".join(f"{method} {key}" for method, key in manifest.get("stores", {}).items()),
        "seeds": f"search {seeds.get('search')}" + (f", final {', '.join(map(str, final))}" if final else ", no final retrain"),
        "command": f"{manifest.get('command')} ({manifest.get('started')})",
    }
    resumes = manifest.get("resumes") or []
    if resumes:
        rows["resumed"] = "; ".join(f"{r.get('command')} ({r.get('started')})" for r in resumes)
    table = pd.DataFrame({"": list(rows), "value": list(rows.values())})
    return [*blocks, Block("text", f"From {MANIFEST_JSON}, written when the sweep started."), Block("table", table=table)]


def _devices_text(devices: dict[str, Any]) -> str:
    nodes = [
        f"{n.get('host')} ({_fmt(n.get('cpus'))} CPUs, {_fmt(n.get('gpus'))} GPUs{' ' + n['accelerator'] if n.get('accelerator') else ''})"
        for n in devices.get("nodes", [])
    ]
    cuda = devices.get("driver_cuda") or []
    return "; ".join(nodes) + (f"; driver CUDA: {', '.join(cuda)}" if cuda else "")


def write_report(out: Path, fmt: str = "md") -> Path:
    """Write the report of the sweep in ``out`` under ``out/report/``; returns the page's path."""
    out = Path(out)
    if fmt not in ("md", "html"):
        raise ConfigError(f"--format must be md or html, got {fmt!r}")
    board_path = out / LEADERBOARD_CSV
    if not board_path.is_file():
        raise not_finished(out, LEADERBOARD_CSV)
    try:
        board = pd.read_csv(board_path, dtype={"trial_id": str})  # an all-digit id is still an id
    except pd.errors.EmptyDataError:  # the leaderboard of a sweep in which no trial reported has no columns
        board = pd.DataFrame()
    if board.empty:
        raise ConfigError(f"{board_path} has no trials; the sweep ran none to report on")
    folder = out / REPORT_DIR
    folder.mkdir(exist_ok=True)
    colours = method_colours(board["method"].tolist())
    blocks = [
        *leaderboard_blocks(board),
        *cost_blocks(board, folder, colours),
        *curve_blocks(out, board, folder, colours),
        *importance_blocks(out, board, folder, colours),
        *final_blocks(out, folder, colours),
        *reproducibility_blocks(out),
    ]
    title = f"medsweep report: {_dataset_name(out)} ({out.name})"
    page = folder / f"report.{fmt}"
    page.write_text(render_markdown(title, blocks) if fmt == "md" else render_html(title, blocks))
    return page


def _dataset_name(out: Path) -> str:
    best = out / BEST_YAML
    if best.is_file():
        return ", ".join(yaml.safe_load(best.read_text()) or {}) or "?"
    return "?"


def run(args: argparse.Namespace) -> int:
    page = write_report(args.dir, args.format)
    print(f"report written to {page} (plots and {PARETO_CSV} beside it)")
    return 0
