"""A :class:`~medsweep.trainables.loop.TrialIO` over a preload store with pyarrow alone.

Used by ``medsweep train``, ``final`` and the tests: the same loop as a sweep
trial, with no cluster, and the same epoch order (:mod:`medsweep.datasets.order`):
shards in a seeded permutation per epoch, rows permuted within windows of
shards, so memory stays bounded by one window.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from torch import nn

from medsweep.datasets.order import epoch_order, ordered_batches
from medsweep.datasets.store import PreloadStore, table_to_numpy


class StoreIO:
    """Single-process IO: reads the store directly, keeps reports in memory and a JSONL log."""

    world_size = 1
    rank = 0

    def __init__(self, store: PreloadStore, log_path: Path | None = None, seed: int = 0) -> None:
        self.store = store
        self.columns = store.columns
        self.log_path = log_path
        self.seed = seed
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []

    def num_rows(self, split: str) -> int:
        return self.store.num_rows(split)

    def label_counts(self, split: str) -> list[int]:
        return self.store.label_counts(split)

    def batches(self, split: str, batch_size: int, epoch: int, shuffle: bool) -> Iterator[dict[str, np.ndarray]]:
        paths = self.store.shard_paths(split)
        order = epoch_order(self.store.shard_rows(split), self.store.bytes_per_image(), self.seed, epoch, shuffle)
        tables = (pq.read_table(paths[i]) for i in order.shards)
        for batch in ordered_batches(tables, order, batch_size):
            yield table_to_numpy(batch)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            self.checkpoints.append(checkpoint_dir)
        if self.log_path is not None:
            with self.log_path.open("a") as handle:
                handle.write(json.dumps(metrics, default=float) + "\n")

    def latest_checkpoint(self) -> Path | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model
