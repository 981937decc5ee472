"""What a sweep leaves in its ``--out`` folder: the names of its files, and its Optuna study.

The bottom of :mod:`medsweep.search` with :mod:`medsweep.search.settings`: the
modules that write these files (``sweep``, ``tuning``, ``export``, ``final``,
``report``) and the ones that read them (``resume``, ``dashboard``, ``sync``)
import the names from here, so each file is named once and
:data:`SWEEP_OUTPUTS` (what ``--overwrite`` deletes) lists what is really written.

The study is a file-backed Optuna journal (:func:`study_storage`): the
searcher writes it, ``medsweep dashboard`` and the report read it.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from medsweep.errors import ConfigError

if TYPE_CHECKING:
    import optuna

# optuna is imported inside the functions: `medsweep --help` imports this module (through the
# parsers of resume and dashboard and through interrupts) and must not pay for it.

SETTINGS_FILE = "sweep.json"  # the SweepSettings a sweep ran with (medsweep.search.settings.load_settings)
STUDY_NAME = "medsweep"
STUDY_FILE = "optuna-study.log"
LEADERBOARD_CSV = "leaderboard.csv"
LEADERBOARD_PARQUET = "leaderboard.parquet"
BEST_YAML = "best.yaml"
PARETO_CSV = "pareto.csv"  # the front of a multi-objective sweep (and, under REPORT_DIR, the report's copy)
PARETO_COLUMN = "on_pareto_front"  # the leaderboard's column marking that front's trials
FINAL_YAML = "final.yaml"
FINAL_JSON = "final.json"
FINAL_DIR = "final"  # final/<method>/seed-<n>/: each final retrain's run
TEST_PREDICTIONS_CSV = "final/test_predictions.csv"  # each tested seed's probabilities per test image
MANIFEST_JSON = "manifest.json"  # versions, devices, data, stores, seeds, command line (medsweep.search.manifest)
REPORT_DIR = "report"
RAY_DIR = "ray"  # Tune's experiment (ray/tune), which `medsweep resume` restores
TUNE_DIR = "tune"  # under RAY_DIR: the sweep's own Tune experiment (extensions have their own, medsweep.search.extend)
TRAIN_DIR = "train"  # the trials' Ray Train storage (checkpoints)
COHORTS_FILE = "cohorts.json"  # under RAY_DIR: the cohorts the servers trained (trial ids per cohort), every run's
WANDB_DIR = "wandb"  # W&B's run folders (offline runs for `medsweep sync`)
MLFLOW_DB = "mlflow.db"  # --tracker mlflow: the SQLite MLflow store (medsweep.search.tracking)
LOCK_FILE = "sweep.lock"  # held by the driver running the sweep (medsweep.search.lock)
# What a sweep writes into its --out folder; --overwrite deletes these (and only these) first.
SWEEP_OUTPUTS = (
    SETTINGS_FILE, STUDY_FILE, LEADERBOARD_CSV, LEADERBOARD_PARQUET, BEST_YAML, PARETO_CSV,
    FINAL_YAML, FINAL_JSON, FINAL_DIR, REPORT_DIR, MANIFEST_JSON, RAY_DIR, TRAIN_DIR, WANDB_DIR, MLFLOW_DB, LOCK_FILE,
)  # fmt: skip


def not_finished(out: Path, missing: str) -> ConfigError:
    """The one line for a folder without ``missing`` (an answer file): a sweep that has not finished is told to
    resume (an interrupted one holds its settings but no answer yet), any other folder to name a sweep's."""
    if (Path(out) / SETTINGS_FILE).is_file():
        return ConfigError(f"the sweep in {out} has not finished (no {missing}); finish it with `medsweep resume {shlex.quote(str(out))}` first")
    return ConfigError(f"{out} has no {missing}; pass the output folder of a finished sweep (see `medsweep sweep --out`)")


def study_storage(out: Path) -> optuna.storages.JournalStorage:
    """The sweep's file-backed Optuna storage (the searcher writes it, ``medsweep dashboard`` reads it)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(Path(out).resolve() / STUDY_FILE)))


def experiment_dir(out: Path) -> Path:
    """Where Tune keeps the sweep's experiment (``tuner.pkl``, its snapshots, the trial folders)."""
    return Path(out).resolve() / RAY_DIR / TUNE_DIR


def load_study(out: Path) -> optuna.Study:
    """The sweep's Optuna study from its file-backed storage."""
    import optuna

    return optuna.load_study(study_name=STUDY_NAME, storage=study_storage(out))


def fail_orphaned_trials(out: Path) -> int:
    """Mark the study's trials still ``RUNNING`` after the search ended as ``FAIL``; returns how many.

    Such a trial was asked of the study but never ran: by a driver killed after Tune's last
    snapshot (``medsweep resume``), or pending when ``--budget-hours`` ended the search. Left
    RUNNING, the dashboard would show it running and the sampler treat it as pending."""
    from optuna.trial import TrialState

    study = load_study(out)
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in orphans:
        study.tell(trial.number, state=TrialState.FAIL)
    return len(orphans)
