"""The MLflow tracker (``--tracker mlflow``): one MLflow run per trial, for clusters that cannot use W&B.

Ray's :class:`~ray.air.integrations.mlflow.MLflowLoggerCallback` logs from the
driver, so a store on the driver's disk serves a multi-node cluster too. The
default store is SQLite in the sweep folder (:data:`MLFLOW_DB`), not MLflow's
``file:`` store: MLflow 3 put the file store in maintenance mode (it refuses to
start without ``MLFLOW_ALLOW_FILE_STORE=true``), while SQLite works with
``mlflow-skinny`` alone. ``MLFLOW_TRACKING_URI``, when set, wins (a team's server).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.result import TRAINING_ITERATION

from medsweep.errors import ConfigError
from medsweep.search.space import trial_config
from medsweep.search.study import MLFLOW_DB


def check_tracker(tracker: str) -> None:
    """Refuse ``--tracker mlflow`` without MLflow installed, before any data is read or trial run."""
    if tracker == "mlflow" and importlib.util.find_spec("mlflow") is None:
        raise ConfigError("--tracker mlflow needs MLflow: pip install 'medsweep[mlflow]' (or mlflow-skinny), or use --tracker wandb|none")


def mlflow_uri(out: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the SQLite store ``<out>/mlflow.db`` (an absolute path)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(out).resolve() / MLFLOW_DB}"


def mlflow_experiment(out: Path) -> str:
    """The sweep's MLflow experiment, ``medsweep-<out folder name>``: a shared tracking server keeps each
    sweep's trials together (W&B groups them by the same name), and ``medsweep resume`` / ``extend`` of
    the sweep log into the same experiment."""
    return f"medsweep-{Path(out).resolve().name}"


class SweepMlflowCallback(MLflowLoggerCallback):
    """One MLflow run per trial, named ``<method>-<trial id>`` and tagged with the dataset, method and trial id.

    Ray's callback tags every run alike and names it after the Tune trial; the
    per-trial tags are set where it opens a trial's run. It keeps its
    trial -> run map only in memory, so after ``medsweep resume`` a restored
    trial would open a second run: the run is found again by its ``trial_id``
    tag instead. Metrics are logged at step = the loop's ``epoch`` (Tune's
    iteration counter restarts when a trial is restored from its checkpoint).
    Runs end when their trials do (``FINISHED``, or ``FAILED``); a run whose trial an interrupt stopped (no trial
    end for Tune) ends ``KILLED`` with the experiment, and ``medsweep resume`` sets it ``RUNNING`` again.
    """

    def __init__(self, dataset: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dataset = dataset

    def setup(self, *args: Any, **kwargs: Any) -> None:
        # MLflow logs its store's schema migrations at INFO on the first use of a SQLite file; the
        # sweep's console says what happens instead.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        super().setup(*args, **kwargs)

    def log_trial_start(self, trial) -> None:
        if trial not in self._trial_runs:
            method = str(trial.config.get("method", "unknown"))
            found = self._existing_run(trial.trial_id)
            if found is None:
                tags = {**(self.tags or {}), "dataset": self.dataset, "method": method, "trial_id": trial.trial_id}
                found = self.mlflow_util.start_run(tags=tags, run_name=f"{method}-{trial.trial_id}").info.run_id
            self._trial_runs[trial] = found
        self.mlflow_util._get_client().update_run(self._trial_runs[trial], status="RUNNING")  # a retried or resumed trial
        # The run's parameters: the flat config the trial ran with (``lr``, not the ``fpt_plus.lr`` a sweep of
        # several methods samples), as the leaderboard has it. Ray's own log_trial_start would log the sampled one.
        self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=trial_config(trial.config))

    def log_trial_result(self, iteration: int, trial, result: dict[str, Any]) -> None:
        step = int(result.get("epoch") or result[TRAINING_ITERATION])
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=result, step=step)

    def on_experiment_end(self, trials, **info: Any) -> None:
        """Runs still ``RUNNING`` belong to trials Tune stopped to resume them (Ctrl-C, SIGTERM): left so, MLflow
        showed them running for ever."""
        client = self.mlflow_util._get_client()
        for run_id in self._trial_runs.values():
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status="KILLED")
        super().on_experiment_end(trials, **info)

    def _existing_run(self, trial_id: str) -> str | None:
        """The run an earlier driver of this sweep opened for ``trial_id``, if any."""
        experiment = str(self.mlflow_util.experiment_id)  # set by setup()
        runs = self.mlflow_util._get_client().search_runs([experiment], filter_string=f"tags.trial_id = '{trial_id}'", max_results=1)
        return runs[0].info.run_id if runs else None
