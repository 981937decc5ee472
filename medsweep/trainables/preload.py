"""Run a method's frozen path once over a dataset and write its preload store.

The store holds what the method's trials consume (see
:mod:`medsweep.datasets.store`): each image input as uint8 at its size and,
for preloadable methods, the frozen features. Trials then never decode an
image or run the frozen backbone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsweep.datasets.images import load_image, resize_square
from medsweep.datasets.spec import SPLITS, DatasetSpec, Sample
from medsweep.datasets.store import ColumnSpec, PreloadStore, StoreWriter, store_key
from medsweep.trainables.backbones import backbone_identity, backbone_normalisation
from medsweep.trainables.inputs import normalise
from medsweep.trainables.methods.base import Method

SHARD_TARGET_BYTES = 64 << 20
MAX_ROWS_PER_SHARD = 2048
FEATURE_DTYPES = ("float16", "float32")

Progress = Callable[[int], None]


@dataclass
class PreloadResult:
    store: PreloadStore
    reused: bool
    seconds: float
    images_processed: int


def store_columns(method: Method, feature_dtype: str, with_features: bool = True) -> list[ColumnSpec]:
    """The columns a method's store needs: stored images, then frozen features (shapes by a dry run).

    ``with_features=False`` stores the frozen input image instead, so every
    trial runs the frozen backbone itself (the baseline preloading is measured against).
    """
    with_features = with_features and method.preloadable
    columns = [
        ColumnSpec(name, (3, spec.size, spec.size), "uint8")
        for name, spec in sorted(method.stored_inputs(preloaded=with_features).items())
    ]
    if with_features:
        size = method.image_inputs()[method.frozen_input].size
        probe = method.frozen_features(torch.zeros(1, 3, size, size))
        columns += [ColumnSpec(k, tuple(v.shape[1:]), feature_dtype) for k, v in sorted(probe.items())]
    return columns


def store_key_parts(spec: DatasetSpec, method: Method, feature_dtype: str, with_features: bool = True) -> dict:
    """Everything that changes the stored tensors (the cache key's inputs)."""
    config = method.config
    mean, std = backbone_normalisation(config.backbone)
    with_features = with_features and method.preloadable
    return {
        "dataset": spec.manifest_hash(),
        "task": spec.task,
        "backbone": backbone_identity(config.backbone, config.image_size) if with_features else None,
        "method_frozen_path": method.preload_key() if with_features else {},
        "images": {k: v.size for k, v in method.stored_inputs(preloaded=with_features).items()},
        "normalisation": [list(mean), list(std)],
        "feature_dtype": feature_dtype if with_features else None,
        "resize": "square-bicubic",
    }


def preload(
    spec: DatasetSpec,
    method: Method,
    cache_dir: Path,
    *,
    feature_dtype: str = "float16",
    batch_size: int = 16,
    splits: tuple[str, ...] = SPLITS,
    progress: Callable[[str, int], Progress] | None = None,
    with_features: bool = True,
) -> PreloadResult:
    """Write (or reuse) the store of ``method`` over ``spec``; resumes an interrupted run.

    Args:
        progress: ``progress(description, total)`` returns a callback advanced by
            the number of images done (the CLI passes a rich progress bar).
        with_features: False stores the frozen input image instead of the
            frozen features (trials then run the frozen backbone themselves).
    """
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}")
    started = time.perf_counter()
    parts = store_key_parts(spec, method, feature_dtype, with_features)
    root = Path(cache_dir) / "stores" / store_key(parts)
    store = PreloadStore(root)
    if store.is_complete() and not store.verify():
        return PreloadResult(store, True, time.perf_counter() - started, 0)

    method.eval()
    columns = store_columns(method, feature_dtype, with_features)
    writer = StoreWriter(root, columns, spec.task, parts)
    rows_per_shard = max(1, min(MAX_ROWS_PER_SHARD, SHARD_TARGET_BYTES // max(1, sum(c.nbytes for c in columns))))
    mean, std = backbone_normalisation(method.config.backbone)
    todo = {
        split: writer.pending_shards(split, math.ceil(len(spec.splits[split]) / rows_per_shard))
        for split in splits
    }
    total = sum(min(rows_per_shard, len(spec.splits[s]) - i * rows_per_shard) for s in splits for i in todo[s])
    advance = progress(f"preload {method.name} -> {root.name}", total) if progress else (lambda n: None)
    for split in splits:
        samples = spec.splits[split]
        for shard in todo[split]:
            chunk = samples[shard * rows_per_shard : (shard + 1) * rows_per_shard]
            indices = np.arange(shard * rows_per_shard, shard * rows_per_shard + len(chunk))
            tensors = _shard_tensors(method, chunk, columns, mean, std, batch_size, advance)
            writer.write_shard(split, shard, indices, _labels(chunk, spec), tensors)
    shards = {s: math.ceil(len(spec.splits[s]) / rows_per_shard) for s in splits}
    store = writer.finish(
        {s: len(spec.splits[s]) for s in splits},
        shards,
        {"dataset": spec.name, "classes": spec.classes, "method": method.name, "rows_per_shard": rows_per_shard},
    )
    return PreloadResult(store, False, time.perf_counter() - started, total)


def _labels(samples: list[Sample], spec: DatasetSpec) -> np.ndarray:
    if spec.task == "multilabel":
        return np.array([s.label for s in samples], dtype=np.float32).reshape(len(samples), spec.num_classes)
    return np.array([s.label for s in samples], dtype=np.int64)


@torch.no_grad()
def _shard_tensors(
    method: Method,
    samples: list[Sample],
    columns: list[ColumnSpec],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int,
    advance: Progress,
) -> dict[str, np.ndarray]:
    """Decode, resize and (for preloadable methods) run the frozen path, in mini-batches."""
    image_sizes = {name: spec.size for name, spec in method.image_inputs().items()}
    stored_images = [c.name for c in columns if c.dtype == "uint8" and c.name in image_sizes]
    feature_cols = [c for c in columns if c.name not in stored_images]
    out: dict[str, list[np.ndarray]] = {c.name: [] for c in columns}
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        pictures = [load_image(s.path) for s in batch]
        needed = set(stored_images) | ({method.frozen_input} if feature_cols else set())
        resized = {
            name: np.stack([resize_square(p, image_sizes[name]).transpose(2, 0, 1) for p in pictures])
            for name in needed
        }
        for name in stored_images:
            out[name].append(resized[name])
        if feature_cols:
            features = method.frozen_features(normalise(torch.from_numpy(resized[method.frozen_input]), mean, std))
            for col in feature_cols:
                out[col.name].append(features[col.name].numpy().astype(col.dtype))
        advance(len(batch))
    return {name: np.concatenate(parts) for name, parts in out.items()}
