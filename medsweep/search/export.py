"""The sweep's answer: a leaderboard (CSV and Parquet) and ``best.yaml``.

One leaderboard row per trial: id, method, every hyperparameter, best
validation AUC, epochs run, cost (learnable parameters, peak step memory),
the FPT paper's PPE and PME, how the trial ended, and how many trials it trained
with (``cohort_members``: its largest fused cohort, itself included; 1 alone). A
fused member's ``train_step_seconds`` and ``trial_seconds`` are its cohort's.

A multi-objective sweep (``--objective auc,memory``...) also exports its
Pareto front over the chosen objectives: an ``on_pareto_front`` column in the
leaderboard, ``pareto.csv`` (those rows) and a ``pareto_front`` list in
``best.yaml``, whose ``best`` stays the best-AUC trial. The front is taken
over the trials that ended usable (not ``error`` / ``diverged`` / ``collapsed``).

A ``collapsed`` trial (its best epoch predicted one class for every validation
image) keeps its row and its ranking value, but is never selected: not a
method's best, not the sweep's, not retrained by ``final``. The searcher was
told its value like any other's: a region of the space that collapses is
worth knowing, and the study and the board agree on every trial's number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from medsweep.datasets.spec import DatasetSpec
from medsweep.search.pareto import pareto_front
from medsweep.search.space import trial_config
from medsweep.search.study import BEST_YAML, COHORTS_FILE, LEADERBOARD_CSV, LEADERBOARD_PARQUET, PARETO_COLUMN, PARETO_CSV, RAY_DIR, not_finished
from medsweep.trainables.config import PLUMBING_KEYS
from medsweep.trainables.metrics import pme, ppe

# Config keys that are plumbing, not hyperparameters (see medsweep.trainables.config.Placement).
INTERNAL_KEYS = PLUMBING_KEYS
VAL_METRICS = ("val_auc", "val_accuracy", "val_f1", "val_kappa", "val_loss")
# Statuses never selected: no best of a method or of the sweep, not retrained by ``final``, off the Pareto front.
UNUSABLE = ("error", "diverged", "collapsed")


def trial_status(error: Any, last: dict[str, Any], max_epochs: int) -> str:
    """How a trial ended, from its last result: ``error``, ``diverged``, ``collapsed`` (its best epoch's
    validation predictions fell in one class), ``stopped early`` (ASHA or the budget) or ``completed``."""
    if error is not None:
        return "error"
    if last.get("status") == "diverged":
        return "diverged"
    if last.get("best_collapsed") == 1.0:
        return "collapsed"
    if int(last.get("epoch", 0)) < max_epochs:
        return "stopped early"
    return "completed"


def leaderboard(grid, settings, memory_full_mb: float | None = None) -> pd.DataFrame:
    """One row per trial, best first (by best validation AUC).

    A trial that never started (still pending when ``--budget-hours`` ended the
    search: no config, no error) has no row; one the budget stopped before its
    first epoch has a row (``stopped early``, 0 epochs).
    """
    rows = []
    for result in grid:
        if result.error is None and not (result.config or {}).get("method"):
            continue
        config = {k: v for k, v in trial_config(result.config or {}).items() if k not in INTERNAL_KEYS}
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        last = dict(result.metrics or {})
        best = best_epoch_row(history, last)
        best_auc = float(best.get("val_auc", float("nan")))
        pct = float(last.get("learnable_pct", float("nan")))
        mem = float(last.get("peak_mem_mb", float("nan")))
        rows.append(
            {
                "trial_id": last.get("trial_id") or Path(result.path).name,
                **config,
                "config_json": json.dumps(config, sort_keys=True, default=str),
                "best_val_auc": best_auc,
                "best_epoch": int(best.get("epoch", 0)),
                **{f"best_{m}": float(best.get(m, float("nan"))) for m in VAL_METRICS[1:]},
                "epochs_run": int(last.get("epoch", 0)),
                "learnable_params": last.get("learnable_params"),
                "learnable_pct": pct,
                "peak_mem_mb": mem,
                "ppe": ppe(best_auc, pct) if math.isfinite(best_auc) and math.isfinite(pct) else float("nan"),
                "pme": pme(best_auc, mem, memory_full_mb) if memory_full_mb and math.isfinite(mem) else float("nan"),
                "train_step_seconds": float(last.get("train_step_seconds", float("nan"))),
                "trial_seconds": float(last.get("time_total_s", float("nan"))),
                "status": trial_status(result.error, last, settings.max_epochs),
            }
        )
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    fused = cohort_members(Path(settings.out))
    board["cohort_members"] = [fused.get(trial_id, 1) for trial_id in board["trial_id"]]
    if settings.multi_objective:
        board[PARETO_COLUMN] = objective_front(board, settings.objective_columns())
    return rank_trials(board)


def rank_trials(board: pd.DataFrame) -> pd.DataFrame:
    """The board best first: by best validation AUC; a tie (common on a small validation set, where several
    trials reach 1.0) goes to the lower validation loss at that epoch, then to the trial id. Ranked by AUC
    alone, tied trials kept the order Tune listed them in, which differs between a sweep, its resume and its
    extension: best.yaml named another trial each time, and ``final`` ran again for an unchanged answer.

    Trials that can be the answer come first: a collapsed trial (its AUC is real, its predictions one class)
    at the top of the board read as the sweep's winner, while best.yaml and ``final`` passed over it."""
    ranked = board.assign(_unusable=board["status"].isin(UNUSABLE)) if "status" in board else board.assign(_unusable=False)
    order = ["_unusable", "best_val_auc", "best_val_loss", "trial_id"]
    ranked = ranked.sort_values(order, ascending=[True, False, True, True], na_position="last", kind="stable")
    return ranked.drop(columns="_unusable").reset_index(drop=True)


def cohort_members(out: Path) -> dict[str, int]:
    """Each fused trial's largest cohort (members at its start, itself included), from every run's record
    (``ray/cohorts.json``; a member whose cohort failed or whose sweep resumed trained in more than one)."""
    path = out / RAY_DIR / COHORTS_FILE
    sizes: dict[str, int] = {}
    for cohort in json.loads(path.read_text()) if path.is_file() else []:
        for trial_id in cohort["trials"]:
            sizes[trial_id] = max(sizes.get(trial_id, 1), len(cohort["trials"]))
    return sizes


def best_epoch_row(history: pd.DataFrame, last: dict[str, Any]) -> dict[str, Any]:
    """The result of the trial's best epoch, as the loop chose it (its last result's ``best_epoch``:
    the best validation AUC among the epochs that did not collapse, see ``loop.is_better_epoch``)."""
    if history.empty or "epoch" not in history or not last.get("best_epoch"):
        return {}
    rows = history[history["epoch"] == last["best_epoch"]]
    return rows.iloc[-1].to_dict() if not rows.empty else {}


def objective_front(board: pd.DataFrame, objectives: list[tuple[str, str]]) -> np.ndarray:
    """Mask of the usable rows on the Pareto front of ``objectives`` ((column, max|min), one maximised)."""
    objectives = sorted(objectives, key=lambda o: o[1] != "max")  # the score (AUC) first, then the costs
    if [d for _, d in objectives].count("max") != 1:
        raise ValueError(f"one objective to maximise and the others to minimise, got {objectives}")
    usable = ~board["status"].isin(UNUSABLE).to_numpy()
    values = [pd.to_numeric(board[column], errors="coerce").to_numpy(dtype=float) for column, _ in objectives]
    values = [np.where(usable, v, np.nan) for v in values]  # NaN: neither on the front nor dominating
    return pareto_front(*values)


def _plain(value: Any) -> Any:
    """numpy scalars to Python for YAML."""
    return value.item() if isinstance(value, np.generic) else value


RESULT_COLUMNS = (
    "best_val_auc",
    "best_epoch",
    *(f"best_{m}" for m in VAL_METRICS[1:]),
    "epochs_run",
    "learnable_params",
    "learnable_pct",
    "peak_mem_mb",
    "ppe",
    "pme",
    "status",
)


def board_entry(row: pd.Series) -> dict[str, Any]:
    """One best.yaml entry: the exact config the trial ran with, then its validation metrics and cost."""
    metrics = {c: _plain(row[c]) for c in RESULT_COLUMNS if c in row and row[c] == row[c]}
    return {"trial_id": row["trial_id"], "config": json.loads(row["config_json"]), "validation": metrics}


def best_configs(board: pd.DataFrame, spec: DatasetSpec, objectives: list[str] | None = None) -> dict[str, Any]:
    """Best trial per method and overall, with validation metrics and cost; with several
    ``objectives``, also the trials on their Pareto front (best AUC first)."""
    usable = board[~board["status"].isin(UNUSABLE)].dropna(subset=["best_val_auc"]) if not board.empty else board
    per_method = {method: board_entry(group.iloc[0]) for method, group in usable.groupby("method")} if not usable.empty else {}
    overall = usable.iloc[0]["method"] if not usable.empty else None
    entry = {
        "task": spec.task,
        "classes": spec.classes,
        "best_method": overall,
        "best": dict(per_method[overall]) if overall else None,
        "per_method": per_method,
    }
    unselected = {
        method: ", ".join(f"{n} {status}" for status, n in group["status"].value_counts().items())
        for method, group in (board.groupby("method") if not board.empty else ())
        if method not in per_method
    }
    if unselected:  # said, not left out silently: e.g. {"fpt_plus": "2 collapsed"}
        entry["no_usable_trial"] = unselected
    if objectives and len(objectives) > 1 and PARETO_COLUMN in board:
        entry["objectives"] = list(objectives)
        entry["pareto_front"] = [board_entry(row) for _, row in board[board[PARETO_COLUMN].astype(bool)].iterrows()]
    return {spec.name: entry}


class _NoAliasDumper(yaml.SafeDumper):
    """Write repeated entries out in full (no &id001 anchors): best.yaml is read by people."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def pareto_rows(board: pd.DataFrame, settings) -> pd.DataFrame:
    """The leaderboard rows on the front (``pareto.csv``): id, method, the objectives' columns, status, config."""
    columns = ["trial_id", "method", *(c for c, _ in settings.objective_columns()), "status", "config_json"]
    front = board[board[PARETO_COLUMN].astype(bool)] if PARETO_COLUMN in board else board.iloc[0:0]
    return front[[c for c in columns if c in board]].reset_index(drop=True)


def write_outputs(board: pd.DataFrame, settings, spec: DatasetSpec, out: Path) -> None:
    board.to_csv(out / LEADERBOARD_CSV, index=False)
    board.to_parquet(out / LEADERBOARD_PARQUET, index=False)
    if settings.multi_objective:
        pareto_rows(board, settings).to_csv(out / PARETO_CSV, index=False)
    best = best_configs(board, spec, settings.objective)
    (out / BEST_YAML).write_text(yaml.dump(best, Dumper=_NoAliasDumper, sort_keys=False))


def read_best(out: Path) -> dict[str, Any]:
    path = Path(out) / BEST_YAML
    if not path.is_file():
        raise not_finished(out, BEST_YAML)
    return yaml.safe_load(path.read_text())
