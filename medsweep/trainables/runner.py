"""One training run outside a sweep (``medsweep train``): preload, then the trial loop over the store.

The same :func:`~medsweep.trainables.loop.fit` a sweep trial runs, fed by
:class:`~medsweep.trainables.store_io.StoreIO` instead of Ray, so a single
configuration can be checked (or reproduced) without a cluster.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medsweep.datasets.spec import DatasetSpec
from medsweep.trainables.config import TrainConfig
from medsweep.trainables.loop import device_for_trial, fit
from medsweep.trainables.methods import build_method
from medsweep.trainables.preload import PreloadResult, preload
from medsweep.trainables.store_io import StoreIO


class _EchoIO(StoreIO):
    """StoreIO that also hands each epoch's metrics to a callback (the CLI prints them)."""

    def __init__(self, *args: Any, on_epoch: Callable[[dict[str, Any]], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_epoch = on_epoch

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        super().report(metrics, checkpoint_dir)
        self.on_epoch(metrics)


def train_once(
    spec: DatasetSpec,
    config: dict[str, Any],
    cache_dir: Path,
    out: Path,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    on_store: Callable[[PreloadResult], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] = lambda metrics: None,
    skip_bad_images: bool = False,
) -> list[dict[str, Any]]:
    """Train ``config`` on ``spec``; writes ``config.json``, ``metrics.jsonl`` and checkpoints under ``out``."""
    config = {**config, "num_classes": spec.num_classes, "task": spec.task}
    TrainConfig.from_dict(config)  # a bad training value is refused before the preload, not after it
    # The frozen pass on the device the trial trains on (a GPU when there is one), at the trial's precision;
    # the backbone built for it is dropped before training builds the trial's own model.
    frozen = build_method(config["method"], config).to_device(device_for_trial())
    precision = config.get("precision", "auto")
    result = preload(spec, frozen, cache_dir, progress=progress, skip_bad_images=skip_bad_images, precision=precision)
    del frozen
    if on_store:
        on_store(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    (out / "metrics.jsonl").unlink(missing_ok=True)
    io = _EchoIO(result.store, log_path=out / "metrics.jsonl", seed=int(config.get("seed", 0)), on_epoch=on_epoch)
    fit(config, io, out / "checkpoints")
    return io.reports
