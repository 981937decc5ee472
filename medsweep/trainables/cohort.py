"""Fused trial cohorts: K member configs trained together (placeholder, replaced by the engine branch).

This placeholder has the engine's interface and runs the members one after
another with :func:`medsweep.trainables.loop.fit`, so the search side can be
built and tested against it; the engine fuses their steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import nn

from medsweep.datasets.store import ColumnSpec
from medsweep.trainables.backbones import frozen_weights_unused
from medsweep.trainables.loop import fit
from medsweep.trainables.methods import build_method, get_method


class CohortIO(Protocol):
    """TrialIO's data side (world size 1, rank 0, one seed for the cohort) with per-member reports."""

    columns: list[ColumnSpec]

    def num_rows(self, split: str) -> int: ...

    def label_counts(self, split: str) -> list[int]: ...

    def batches(self, split: str, batch_size: int, epoch: int, shuffle: bool) -> Iterable[dict[str, np.ndarray]]: ...

    def report(self, member: int, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...

    def wanted(self, member: int) -> bool: ...

    def latest_checkpoint(self, member: int) -> Path | None: ...


def fusable(config: dict[str, Any], columns: list[ColumnSpec]) -> bool:
    """A preloadable method whose frozen features the store holds."""
    if not get_method(config["method"]).model_cls.preloadable:
        return False
    with frozen_weights_unused():
        keys = build_method(config["method"], config).feature_keys()
    stored = {column.name for column in columns}
    return bool(keys) and all(key in stored for key in keys)


def cohort_key(config: dict[str, Any]) -> tuple:
    """Members with equal keys share one stream of batches."""
    return (config["method"], config.get("store_key"), config.get("seed", 0), config.get("batch_size"), config.get("epochs"))


class _MemberIO:
    """A TrialIO that forwards one member's reports and checkpoint to the cohort's IO."""

    world_size = 1
    rank = 0

    def __init__(self, io: CohortIO, member: int) -> None:
        self.io, self.member, self.columns = io, member, io.columns

    def num_rows(self, split: str) -> int:
        return self.io.num_rows(split)

    def label_counts(self, split: str) -> list[int]:
        return self.io.label_counts(split)

    def batches(self, split: str, batch_size: int, epoch: int, shuffle: bool) -> Iterable[dict[str, np.ndarray]]:
        return self.io.batches(split, batch_size, epoch, shuffle)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.io.report(self.member, metrics, checkpoint_dir)

    def latest_checkpoint(self) -> Path | None:
        return self.io.latest_checkpoint(self.member)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model


def fit_cohort(configs: list[dict[str, Any]], io: CohortIO, checkpoint_root: Path) -> list[dict[str, Any]]:
    """Each member's ``fit``, one after another; the last metrics of each."""
    return [fit(config, _MemberIO(io, k), checkpoint_root / f"member-{k}") for k, config in enumerate(configs)]
