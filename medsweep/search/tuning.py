"""The Ray half of a sweep: start Ray, share the stores, build the searcher, run the Tuner."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray
from optuna.samplers import RandomSampler, TPESampler
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray import tune
from ray.tune import Callback, CheckpointConfig, FailureConfig, PlacementGroupFactory, RunConfig, TuneConfig, Tuner
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from medsweep.datasets.spec import DatasetSpec
from medsweep.search.console import SweepConsole
from medsweep.search.space import build_search
from medsweep.search.sweep import STUDY_FILE, STUDY_NAME, SweepSettings, fixed_config, wandb_mode
from medsweep.search.trial import StoreData, run_trial
from medsweep.trainables.preload import PreloadResult

METRIC = "val_auc"
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
        ray.init(include_dashboard=False, **kwargs)
    quiet_ray_data()


def quiet_ray_data() -> None:
    """Ray Data logs every execution plan at INFO; the console reports reads in one line instead."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)


def materialize(result: PreloadResult) -> StoreData:
    """Read a store's train and val splits once with Ray Data and pin them in the object store.

    The test split is not read here: the search never sees it.
    """
    store = result.store
    datasets = {
        split: ray.data.read_parquet([str(p) for p in store.shard_paths(split)]).materialize()
        for split in ("train", "val")
    }
    return StoreData(store.key, store.columns, {s: store.num_rows(s) for s in ("train", "val")}, datasets)


def default_gpus_per_trial(settings: SweepSettings) -> float:
    """The user's value, else 0 without GPUs in the cluster, else a quarter of one."""
    if settings.gpus_per_trial is not None:
        return settings.gpus_per_trial
    return 0.25 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def trial_resources(settings: SweepSettings, gpus: float):
    """What a trial reserves: its CPU and GPU fraction, or only a driver slot for DDP trials."""

    def resources(config: dict[str, Any]) -> PlacementGroupFactory:
        if int(config.get("workers", 1)) > 1:  # the Train worker group reserves its own
            return PlacementGroupFactory([{"CPU": 0.01}])
        bundle = {"CPU": settings.cpus_per_trial}
        if gpus:
            bundle["GPU"] = gpus
        return PlacementGroupFactory([bundle])

    return resources


class ConsoleCallback(Callback):
    """Forwards trial events to the console (progress lines the user can follow)."""

    def __init__(self, console: SweepConsole, total: int) -> None:
        self.console = console
        self.total = total
        self.finished = 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.console.trial_result(trial.trial_id, trial.config, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        self.console.trial_done(trial.trial_id, trial.config, trial.last_result, self.finished, self.total)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.console.trial_error(trial.trial_id, trial.config, str(trial.error_file))


def run_tuner(
    settings: SweepSettings,
    spec: DatasetSpec,
    stores: dict[str, PreloadResult],
    console: SweepConsole,
) -> tune.ResultGrid:
    out = Path(settings.out).resolve()
    data = {result.store.key: materialize(result) for result in stores.values()}
    console.data_ready(data)
    gpus = default_gpus_per_trial(settings)
    fixed = {
        method: {
            **fixed_config(settings, spec, method),
            "store_key": stores[method].store.key,
            "gpus_per_trial": gpus,
        }
        for method in settings.methods
    }
    space, points = build_search(settings.methods, fixed, dataset=spec.name)
    searcher = OptunaSearch(
        space=space,
        metric=METRIC,
        mode="max",
        points_to_evaluate=points,
        sampler=TPESampler(seed=settings.seed) if settings.search == "tpe" else RandomSampler(seed=settings.seed),
        study_name=STUDY_NAME,
        storage=JournalStorage(JournalFileBackend(str(out / STUDY_FILE))),
    )
    scheduler = None if not settings.early_stopping else ASHAScheduler(
        time_attr="epoch",
        metric=METRIC,
        mode="max",
        max_t=settings.max_epochs,
        grace_period=min(settings.grace_period, settings.max_epochs),
        reduction_factor=2,
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, stores=data, storage_path=str(out / "train")),
        trial_resources(settings, gpus),
    )
    callbacks: list[Callback] = [ConsoleCallback(console, settings.trials)]
    mode = wandb_mode(settings.wandb)
    if mode != "disabled":
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(
            WandbLoggerCallback(
                project=WANDB_PROJECT,
                group=out.name,
                mode=mode,
                dir=str(out),  # W&B writes its runs under <dir>/wandb/
                tags=[spec.name, *settings.methods],
                upload_timeout=60,
                excludes=["status"],
            )
        )
    tuner = Tuner(
        trainable,
        tune_config=TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=settings.trials,
            trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
        ),
        run_config=RunConfig(
            name="tune",
            storage_path=str(out / "ray"),
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=2),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )
    return tuner.fit()
