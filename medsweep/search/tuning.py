"""The Ray half of a sweep: start Ray, share the stores, build the searcher, run or restore the Tuner.

A fresh sweep (:func:`run_tuner`) and a resumed one (:func:`resume_tuner`)
build the trainable the same way (:func:`build_trainable`): its materialized
datasets are object references that die with the driver, so a resume must
rebuild them. The searcher and the callbacks are *not* rebuilt on resume:
``Tuner.restore`` unpickles them from ``tuner.pkl`` and Tune then loads the
searcher's last state (``searcher-state-*.pkl``: its Optuna trial of every
Tune trial, the trials it has completed, the sample counter) and the callbacks'
state (``callback-states-*.pkl``). ``Tuner.restore`` takes no ``tune_config``,
so a new searcher could not be passed, and it would be overwritten anyway
(``OptunaSearch.restore`` replaces its whole ``__dict__``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from optuna.samplers import RandomSampler, TPESampler
from optuna.storages import JournalStorage
from ray import tune
from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune import Callback, CheckpointConfig, FailureConfig, PlacementGroupFactory, RunConfig, TuneConfig, Tuner
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from medsweep.datasets.spec import DatasetSpec
from medsweep.search.console import SweepConsole
from medsweep.search.data import share_stores
from medsweep.search.space import build_search
from medsweep.search.sweep import STUDY_NAME, SweepSettings, fixed_config, study_storage, wandb_mode
from medsweep.search.trial import StoreData, run_trial
from medsweep.trainables.preload import PreloadResult

METRIC = "val_auc"
DRIVER_MEMORY_BYTES = 256 * 2**20
WANDB_PROJECT = "medsweep"


def start_ray(settings: SweepSettings) -> None:
    """Join ``--address`` or start a local Ray with this machine's CPUs; quiet logs."""
    if ray.is_initialized():
        return
    mode = wandb_mode(settings.wandb)
    os.environ["WANDB_MODE"] = mode  # read by W&B and by Ray's API-key check (no prompt offline)
    os.environ.setdefault("WANDB_SILENT", "true")
    # Tune warns at every forced experiment snapshot (each trial checkpoint with num_to_keep set);
    # per-epoch checkpoints of short trials are the point here, not a misconfiguration.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    env = {"WANDB_MODE": mode, "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False, "logging_level": logging.WARNING}
    if settings.address:
        ray.init(address=settings.address, **kwargs)
    else:
        ray.init(address="local", include_dashboard=False, **kwargs)  # never join a stray `ray start` cluster
    quiet_ray_data()


def quiet_ray_data() -> None:
    """Ray Data logs every execution plan at INFO; the console reports reads in one line instead."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)


def default_gpus_per_trial(settings: SweepSettings) -> float:
    """The user's value, else 0 without GPUs in the cluster, else a quarter of one."""
    if settings.gpus_per_trial is not None:
        return settings.gpus_per_trial
    return 0.25 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def trial_resources(settings: SweepSettings, gpus: float):
    """What a trial reserves: its CPU and GPU fraction, or only a driver slot for DDP trials."""

    def resources(config: dict[str, Any]) -> PlacementGroupFactory:
        if int(config.get("workers", 1)) > 1:
            # The Train worker group reserves its own CPUs/GPUs; the trial process only
            # waits for it, so it holds no CPU (even 0.01 CPU would leave a 2-CPU machine
            # unable to place 2 one-CPU workers).
            return PlacementGroupFactory([{"memory": DRIVER_MEMORY_BYTES}])
        bundle = {"CPU": settings.cpus_per_trial}
        if gpus:
            bundle["GPU"] = gpus
        return PlacementGroupFactory([bundle])

    return resources


class ConsoleCallback(Callback):
    """Forwards trial events to the console (progress lines the user can follow).

    Its count of finished trials is saved with the experiment (``get_state``),
    so a resumed sweep keeps counting from where the interrupted one stopped.
    """

    def __init__(self, console: SweepConsole, total: int) -> None:
        self.console = console
        self.total = total
        self.finished = 0

    def get_state(self) -> dict[str, Any]:
        return {"finished": self.finished}

    def set_state(self, state: dict[str, Any]) -> None:
        self.finished = state["finished"]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.console.trial_result(trial.trial_id, trial.config, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        self.console.trial_done(trial.trial_id, trial.config, trial.last_result, self.finished, self.total)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.console.trial_error(trial.trial_id, trial.config, str(trial.error_file))


class SweepWandbCallback(WandbLoggerCallback):
    """One W&B run per trial, tagged with the dataset and the trial's method, named ``<method>-<trial id>``.

    Ray's callback takes one fixed set of ``wandb.init`` arguments for every
    trial; ``log_trial_start`` is where a trial's run is opened, so the
    per-trial tags are set there (the base class merges ``self.kwargs`` last).
    Each run ends with ``wandb.finish`` when its trial ends, which writes the
    run's summary (last value of every metric, ``best_val_auc`` included).
    """

    def __init__(self, dataset: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dataset = dataset

    def log_trial_start(self, trial) -> None:
        method = trial.config.get("method", "unknown")
        self.kwargs = {**self.kwargs, "tags": [self.dataset, method], "name": f"{method}-{trial.trial_id}"}
        super().log_trial_start(trial)


class SweepSearch(OptunaSearch):
    """OptunaSearch that records a trial ending without a finite metric (a diverged trial) as FAIL.

    Optuna refuses a NaN value in ``tell`` and Ray only logs the refusal, which
    leaves the trial RUNNING in the study for ever (the dashboard shows it
    running, the sampler treats it as pending).
    """

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if result is not None and not math.isfinite(float(result.get(self.metric, math.nan))):
            result, error = None, True
        super().on_trial_complete(trial_id, result=result, error=error)


@dataclass
class SharedData:
    """The sweep's materialized stores and the GPU fraction each trial reserves."""

    stores: dict[str, StoreData]
    gpus: float


def experiment_path(settings: SweepSettings) -> Path:
    """Where Tune keeps the sweep's experiment state (``tuner.pkl``, trial folders, checkpoints)."""
    return Path(settings.out).resolve() / "ray" / "tune"


def share_data(settings: SweepSettings, stores: dict[str, PreloadResult], console: SweepConsole) -> SharedData:
    """Share every method's store once (materialized, or streamed when too large); decide the GPU fraction."""
    shared = share_stores(stores.values())
    console.data_ready({key: why for key, (_, why) in shared.items()})
    return SharedData({key: data for key, (data, _) in shared.items()}, default_gpus_per_trial(settings))


def build_trainable(settings: SweepSettings, shared: SharedData):
    """``run_trial`` bound to the shared datasets, reserving each trial's CPU and GPU fraction."""
    out = Path(settings.out).resolve()
    return tune.with_resources(
        tune.with_parameters(run_trial, stores=shared.stores, storage_path=str(out / "train")),
        trial_resources(settings, shared.gpus),
    )


def _study_is_empty(storage: JournalStorage) -> bool:
    try:
        study_id = storage.get_study_id_from_name(STUDY_NAME)
    except KeyError:
        return True
    return not storage.get_all_trials(study_id, deepcopy=False)


def build_searcher(
    settings: SweepSettings,
    spec: DatasetSpec,
    stores: dict[str, PreloadResult],
    shared: SharedData,
) -> SweepSearch:
    """Seeded TPE (or random) over the methods' spaces, on the sweep's study file.

    The recommended points are enqueued only into an empty study: OptunaSearch
    enqueues its ``points_to_evaluate`` every time it is built, and a study
    that already holds trials (a sweep interrupted before Tune saved any
    state, started again by ``medsweep resume``) still has the first copies
    waiting in its journal, which ``ask()`` hands out first.
    """
    fixed = {
        method: {
            **fixed_config(settings, spec, method),
            "store_key": stores[method].store.key,
            "gpus_per_trial": shared.gpus,
        }
        for method in settings.methods
    }
    space, points = build_search(settings.methods, fixed, dataset=spec.name)
    storage = study_storage(settings.out)
    return SweepSearch(
        space=space,
        metric=METRIC,
        mode="max",
        points_to_evaluate=points if _study_is_empty(storage) else None,
        sampler=TPESampler(seed=settings.seed) if settings.search == "tpe" else RandomSampler(seed=settings.seed),
        study_name=STUDY_NAME,
        storage=storage,
    )


def build_scheduler(settings: SweepSettings) -> ASHAScheduler | None:
    """ASHA on the loop's own ``epoch`` (Tune's iteration counter restarts when a trial is restored)."""
    if not settings.early_stopping:
        return None
    return ASHAScheduler(
        time_attr="epoch",
        metric=METRIC,
        mode="max",
        max_t=settings.max_epochs,
        grace_period=min(settings.grace_period, settings.max_epochs),
        reduction_factor=2,
    )


def build_callbacks(settings: SweepSettings, spec: DatasetSpec, console: SweepConsole) -> list[Callback]:
    """Console lines per trial event and, unless disabled, one W&B run per trial under ``<out>/wandb``."""
    out = Path(settings.out).resolve()
    callbacks: list[Callback] = [ConsoleCallback(console, settings.trials)]
    mode = wandb_mode(settings.wandb)
    if mode != "disabled":
        callbacks.append(
            SweepWandbCallback(
                dataset=spec.name,
                project=WANDB_PROJECT,
                group=out.name,
                mode=mode,
                dir=str(out),  # W&B writes its runs under <dir>/wandb/
                upload_timeout=60,  # Ray's default waits 30 min at the end for runs that cannot upload
                excludes=["status"],
                resume="allow",  # a trial restored by `medsweep resume` continues its W&B run (same id)
            )
        )
    return callbacks


def run_tuner(
    settings: SweepSettings,
    spec: DatasetSpec,
    stores: dict[str, PreloadResult],
    console: SweepConsole,
) -> tune.ResultGrid:
    """A fresh search: recommended points first, then the sampler; ``num_samples`` trials in all."""
    shared = share_data(settings, stores, console)
    tuner = Tuner(
        build_trainable(settings, shared),
        tune_config=TuneConfig(
            search_alg=build_searcher(settings, spec, stores, shared),
            scheduler=build_scheduler(settings),
            num_samples=settings.trials,
            trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
        ),
        run_config=RunConfig(
            name=experiment_path(settings).name,
            storage_path=str(experiment_path(settings).parent),
            callbacks=build_callbacks(settings, spec, console),
            failure_config=FailureConfig(max_failures=2),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )
    return tuner.fit()


def can_resume(settings: SweepSettings) -> bool:
    """Whether Tune saved the sweep's experiment: its ``tuner.pkl`` (written when the Tuner is built)
    and an experiment snapshot (written once the search runs). Either is missing if the driver died
    before the search started."""
    path = experiment_path(settings)
    return Tuner.can_restore(str(path)) and any(path.glob("experiment_state-*.json"))


def resume_tuner(
    settings: SweepSettings,
    stores: dict[str, PreloadResult],
    console: SweepConsole,
) -> tune.ResultGrid:
    """Continue the saved search: finished trials are kept as they are, unfinished and errored
    ones continue from their last checkpoint, and new trials are suggested until the sweep
    holds ``num_samples`` (the restored searcher keeps its counter)."""
    shared = share_data(settings, stores, console)
    tuner = Tuner.restore(
        str(experiment_path(settings)),
        trainable=build_trainable(settings, shared),
        resume_unfinished=True,
        resume_errored=True,
    )
    return tuner.fit()
