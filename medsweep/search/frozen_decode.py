"""The frozen pass's decode step as a Ray Data task, in a module that imports no torch.

Ray imports the module of a task's function in every worker that runs it: the
decode tasks of :mod:`medsweep.search.frozen_pass` are defined here, over
:mod:`medsweep.datasets.shards`, so a decode worker starts with PIL and numpy
only; the backbone's module tree (torch, transformers) is loaded by the
frozen-forward actors alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsweep.datasets.shards import ShardUnit, decode_shard
from medsweep.datasets.store import ColumnSpec
from medsweep.errors import DatasetError


@dataclass(frozen=True)
class ShardPlan:
    """What the pipeline's tasks and actors need of the driver's store plan (shipped once to each, without its locks)."""

    units: list[ShardUnit]
    sizes: dict[str, int]  # each stored image input's decoded square size
    root: Path
    columns: list[ColumnSpec]
    key_parts: dict[str, Any]
    rows_per_shard: int


def decode_task(batch: dict[str, np.ndarray], plan: ShardPlan, skip_bad_images: bool) -> dict[str, np.ndarray]:
    """Decode task: one shard's images, resized, as raw bytes (shapes follow from the plan and the kept count).

    An unreadable image (without ``skip_bad_images``) travels on as the row's
    ``error``, for the driver to raise as one line: an exception raised here
    would reach the driver as Ray's multi-line traceback, its type lost.
    """
    unit = int(batch["unit"][0])
    try:
        kept, images = decode_shard(plan.units[unit].samples, plan.sizes, skip_bad_images)
    except DatasetError as error:
        return {"unit": np.array([unit]), "error": np.array([str(error)], dtype=object)}
    return {
        "unit": np.array([unit]),
        "error": np.array([""], dtype=object),
        "kept": np.array([kept.tobytes()], dtype=object),
        **{f"image:{name}": np.array([values.tobytes()], dtype=object) for name, values in images.items()},
    }
