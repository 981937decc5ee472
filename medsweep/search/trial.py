"""One sweep trial: a Ray Tune function that launches the method's loop with Ray Train.

Single-device trials (the common case: a side network on a GPU fraction) run
the loop in Ray Train *local mode* (``ScalingConfig(num_workers=0)``): the
loop runs inside the Tune trial's own process and holds the trial's GPU
fraction, so no worker group is started (measured here: ~20 s per
one-worker ``TorchTrainer`` vs ~0.1 s in local mode). Trials with
``workers > 1`` (full fine-tuning of a large backbone) start a DDP worker
group instead, and ``TuneReportCallback`` forwards their reports to Tune.

Either way the data come from the method's preload store as the sweep shared
it (:class:`medsweep.search.data.StoreData`: pinned object-store blocks, or a
Ray Data stream of the shards), read in the epoch's order of
:mod:`medsweep.datasets.order`: the trial never opens a file itself, and a
DDP worker takes its stride of the same sequence.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.tune
import torch
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model
from ray.tune.integration.ray_train import TuneReportCallback
from torch import nn

from medsweep.search.data import StoreBatches, StoreData
from medsweep.search.space import trial_config
from medsweep.trainables.loop import fit


class _RayIO(StoreBatches):
    """TrialIO over the sweep's shared store; reports through Tune (local) or Train (DDP)."""

    def __init__(self, data: StoreData, distributed: bool, seed: int) -> None:
        if distributed:
            context = ray.train.get_context()
            super().__init__(data, seed, context.get_world_size(), context.get_world_rank())
        else:
            super().__init__(data, seed)
        self.distributed = distributed
        self._restored: tempfile.TemporaryDirectory | None = None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        (ray.train.report if self.distributed else ray.tune.report)(metrics, checkpoint=checkpoint)

    def latest_checkpoint(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint() if self.distributed else ray.tune.get_checkpoint()
        if checkpoint is None:
            return None
        self._restored = tempfile.TemporaryDirectory(prefix="medsweep-restore-")
        return Path(checkpoint.to_directory(self._restored.name))

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return prepare_model(model) if self.distributed and self.world_size > 1 else model


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function (local mode or DDP worker)."""
    data: StoreData = loop_config["data"]
    config = loop_config["config"]
    torch.set_num_threads(max(1, int(config.get("cpus_per_trial", 1))))
    io = _RayIO(data, distributed=loop_config["workers"] > 1, seed=int(config.get("seed", 0)))
    with tempfile.TemporaryDirectory(prefix="medsweep-ckpt-") as scratch:
        fit(config, io, Path(scratch))


def _scaling(workers: int, gpus_per_trial: float) -> ScalingConfig:
    """Local mode for one device; a DDP group of ``workers`` for more (GPUs split evenly)."""
    if workers <= 1:
        return ScalingConfig(num_workers=0)
    per_worker = {"CPU": 1, "GPU": gpus_per_trial / workers} if gpus_per_trial else {"CPU": 1}
    return ScalingConfig(num_workers=workers, use_gpu=gpus_per_trial > 0, resources_per_worker=per_worker)


def run_trial(config: dict[str, Any], *, stores: dict[str, StoreData], storage_path: str) -> None:
    """The Tune trainable: pick the trial's store and run the loop through a TorchTrainer."""
    config = trial_config(config)
    data = stores[config["store_key"]]
    workers = int(config.get("workers", 1))
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config, "data": data, "workers": workers},
        scaling_config=_scaling(workers, float(config.get("gpus_per_trial", 0))),
        run_config=RunConfig(
            name=f"train-{trial_id}",  # deterministic: a restarted trial resumes its own Train run
            storage_path=storage_path,
            # ray.train exports Train v2's FailureConfig and callbacks at runtime (RAY_TRAIN_V2_ENABLED); mypy reads v1's.
            failure_config=FailureConfig(max_failures=0, controller_failure_limit=2) if workers > 1 else None,  # type: ignore[call-arg]
            callbacks=[TuneReportCallback()] if workers > 1 else None,  # type: ignore[list-item]
        ),
    )
    trainer.fit()
