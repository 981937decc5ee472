"""A :class:`~medsweep.trainables.loop.TrialIO` over a preload store with pyarrow alone.

Used by ``medsweep train`` and the tests: the same loop as a sweep trial, with
no cluster. Memory stays bounded by one shard: each epoch visits the shards in
a seeded random order and permutes rows inside each.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from torch import nn

from medsweep.datasets.store import PreloadStore, column_to_numpy


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

    def batches(self, split: str, batch_size: int, epoch: int, shuffle: bool) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch])
        shards = self.store.shard_paths(split)
        order = rng.permutation(len(shards)) if shuffle else range(len(shards))
        for i in order:
            table = pq.read_table(shards[i])
            if shuffle:
                table = table.take(rng.permutation(table.num_rows))
            for start in range(0, table.num_rows, batch_size):
                part = table.slice(start, batch_size)
                yield {name: column_to_numpy(part.column(name).combine_chunks()) for name in part.column_names}

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
