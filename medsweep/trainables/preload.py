"""Run a method's frozen path once over a dataset and write its preload store.

The store holds what the method's trials consume (see
:mod:`medsweep.datasets.store`): each image input as uint8 at its size and,
for preloadable methods, the frozen features. Trials then never decode an
image or run the frozen backbone.
"""

from __future__ import annotations

import errno
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medsweep.datasets.images import load_image, resize_square
from medsweep.datasets.order import written_order
from medsweep.datasets.spec import SPLITS, DatasetSpec, Sample
from medsweep.datasets.store import (
    LAYOUT_FILE,
    ColumnSpec,
    PreloadStore,
    StoreWriter,
    discard_shard,
    read_json,
    shard_indices,
    shard_name,
    store_key,
    store_lock,
)
from medsweep.errors import DatasetError, StoreError
from medsweep.trainables.backbones import backbone_identity, backbone_normalisation
from medsweep.trainables.inputs import normalise
from medsweep.trainables.methods.base import Method

SHARD_TARGET_BYTES = 64 << 20
MAX_ROWS_PER_SHARD = 2048
FEATURE_DTYPES = ("float16", "float32")

Progress = Callable[[int], None]


@dataclass
class PreloadResult:
    """What :func:`preload` did.

    ``reused``: the store was complete and every checksum matched, nothing was
    written. Otherwise ``shards_written`` shards (all of a new store, the
    missing ones of an interrupted one, the corrupt ones of a damaged one)
    holding ``images_processed`` images were written. ``skipped_images``: images
    left out as unreadable (``skip_bad_images``), also reported on reuse.
    ``repairs``: what was found damaged and rebuilt, one phrase each.
    """

    store: PreloadStore
    reused: bool
    seconds: float
    images_processed: int
    shards_written: int = 0
    skipped_images: int = 0
    repairs: list[str] = field(default_factory=list)


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


def store_key_parts(
    spec: DatasetSpec,
    method: Method,
    feature_dtype: str,
    with_features: bool = True,
    order_seed: int = 0,
) -> dict:
    """Everything that changes the stored tensors or their order (the cache key's inputs)."""
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
        "row_order_seed": order_seed,
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
    shard_target_bytes: int = SHARD_TARGET_BYTES,
    skip_bad_images: bool = False,
    order_seed: int = 0,
    on_wait: Callable[[str], None] | None = None,
) -> PreloadResult:
    """Write (or reuse) the store of ``method`` over ``spec``; resumes an interrupted run, repairs a damaged one.

    A complete store whose checksums all match is reused. A complete store
    with corrupt or missing shards loses its ``store.json`` and those shards
    (so nothing reads it half-repaired), then only they are rewritten. An
    interrupted store keeps its finished shards and only the missing ones are
    written.

    Args:
        progress: ``progress(description, total)`` returns a callback advanced by
            the number of images done (the CLI passes a rich progress bar).
        with_features: False stores the frozen input image instead of the
            frozen features (trials then run the frozen backbone themselves).
        shard_target_bytes: about how many bytes one shard holds (a new store
            only: an existing one keeps the rows per shard it was started with).
        skip_bad_images: leave unreadable images out of the store (counted in
            the result and listed in ``store.json``) instead of stopping at the first.
        order_seed: seeds the random order the rows of each split are written in
            (:func:`medsweep.datasets.order.written_order`); part of the cache key.
            Not the sweep's seed: trials of any seed share one store and draw
            their own epoch orders from it.
        on_wait: called with one line if another process is building the same
            store; this one then waits for it and reuses what it built.

    Raises:
        StoreError: the cache folder cannot be written (read-only, full,
            not a folder); the store is left unfinished, never marked complete,
            and the next run resumes it.
    """
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}")
    if shard_target_bytes < 1:
        raise ValueError(f"shard_target_bytes must be positive, got {shard_target_bytes}")
    started = time.perf_counter()
    parts = store_key_parts(spec, method, feature_dtype, with_features, order_seed)
    root = Path(cache_dir) / "stores" / store_key(parts)
    with _building(root, cache_dir, on_wait):
        store = PreloadStore(root)
        repairs = _drop_unreadable_metadata(store)
        if store.is_complete():
            bad = store.verify()
            if not bad:
                return PreloadResult(store, True, time.perf_counter() - started, 0, 0, _skipped_count(store))
            for shard in bad:
                discard_shard(shard)
            repairs.append(f"repaired {len(bad)} corrupt shard{'s' if len(bad) > 1 else ''}")

        method.eval()
        columns = store_columns(method, feature_dtype, with_features)
        writer = StoreWriter(root, columns, spec.task, parts)
        rows = writer.claim_layout(_rows_per_shard(columns, shard_target_bytes))
        counts = {split: math.ceil(len(spec.splits[split]) / rows) for split in splits}
        todo = {split: writer.pending_shards(split, counts[split]) for split in splits}
        total = sum(min(rows, len(spec.splits[s]) - i * rows) for s in splits for i in todo[s])
        advance = progress(f"preload {method.name} -> {root.name}", total) if progress else (lambda n: None)
        mean, std = backbone_normalisation(method.config.backbone)
        for split in splits:
            samples = spec.splits[split]
            order = written_order(len(samples), order_seed, split)
            for shard in todo[split]:
                positions = order[shard * rows : (shard + 1) * rows]
                chunk = [samples[i] for i in positions]
                kept, tensors = _shard_tensors(method, chunk, columns, mean, std, batch_size, advance, skip_bad_images)
                writer.write_shard(split, shard, positions[kept], _labels([chunk[i] for i in kept], spec), tensors)
        skipped = {split: _skipped_paths(writer.store, spec, split, counts[split]) for split in splits}
        store = writer.finish(
            {s: len(spec.splits[s]) - len(skipped[s]) for s in splits},
            counts,
            {
                "dataset": spec.name,
                "classes": spec.classes,
                "method": method.name,
                "rows_per_shard": rows,
                "row_order_seed": order_seed,
                "skipped": skipped,
            },
        )
        written = sum(len(shards) for shards in todo.values())
        return PreloadResult(store, False, time.perf_counter() - started, total, written, _skipped_count(store), repairs)


@contextmanager
def _building(root: Path, cache_dir: Path, on_wait: Callable[[str], None] | None) -> Iterator[None]:
    """Hold the store's build lock; an OS error under the cache folder becomes one :class:`StoreError` line."""
    try:
        with store_lock(root, on_wait=on_wait):
            yield
    except OSError as error:
        raise StoreError(cache_write_error(error, cache_dir)) from error


def cache_write_error(error: OSError, cache_dir: Path) -> str:
    """One line for an OS error under the cache folder: what failed, where, and the fix (finished shards are kept)."""
    where = error.filename or cache_dir
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space there or pass --cache-dir on a larger disk, then run again (finished shards are kept)"
    elif error.errno in (errno.ENOTDIR, errno.EEXIST):
        fix = f"--cache-dir must be a folder ({cache_dir})"
    else:
        fix = "pass a --cache-dir you can write to"
    return f"cannot write the preload store at {where}: {error.strerror or error}; {fix}"


def _drop_unreadable_metadata(store: PreloadStore) -> list[str]:
    """Remove an unreadable ``store.json`` (shards are then checked one by one) or ``layout.json`` (and every shard).

    Returns what was done, for the console. Why the shards go with the
    layout: only it says which rows a shard holds, so a shard kept without it
    could duplicate some rows and drop others.
    """
    repairs = []
    layout = store.root / LAYOUT_FILE
    if layout.is_file() and read_json(layout) is None:
        shutil.rmtree(store.root)
        return ["layout.json was unreadable: rebuilt every shard"]
    if store.is_complete() and read_json(store.meta_path) is None:
        store.meta_path.unlink()
        repairs.append("store.json was unreadable: checked every shard against its checksum")
    return repairs


def _rows_per_shard(columns: list[ColumnSpec], target_bytes: int) -> int:
    """Rows that keep a shard near ``target_bytes``, capped so tiny rows still make a few shards."""
    return max(1, min(MAX_ROWS_PER_SHARD, target_bytes // max(1, sum(c.nbytes for c in columns))))


def _skipped_paths(store: PreloadStore, spec: DatasetSpec, split: str, num_shards: int) -> list[str]:
    """Images of ``split`` no shard holds (left out as unreadable), read back from the shards themselves.

    Why from the shards: shards written by an earlier, interrupted run skipped
    their own images, and this run has no other record of them.
    """
    present = np.zeros(len(spec.splits[split]), dtype=bool)
    for i in range(num_shards):
        present[shard_indices(store.root / split / shard_name(i))] = True
    if len(present) and not present.any():
        raise DatasetError(
            f"no image of the {split} split of {spec.name} could be read (first: {spec.splits[split][0].path}); "
            "fix the files (or the paths the dataset lists) and preload again"
        )
    return [str(spec.splits[split][i].path) for i in np.flatnonzero(~present)]


def _skipped_count(store: PreloadStore) -> int:
    return sum(len(paths) for paths in store.meta.get("skipped", {}).values())


def _labels(samples: list[Sample], spec: DatasetSpec) -> np.ndarray:
    if spec.task == "multilabel":
        return np.array([s.label for s in samples], dtype=np.float32).reshape(len(samples), spec.num_classes)
    return np.array([s.label for s in samples], dtype=np.int64)


def _shard_tensors(
    method: Method,
    samples: list[Sample],
    columns: list[ColumnSpec],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int,
    advance: Progress,
    skip_bad_images: bool,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Decode, resize and (for preloadable methods) run the frozen path, in mini-batches.

    Returns the positions in ``samples`` of the images kept (all, unless some
    were unreadable and ``skip_bad_images``) and their tensors.
    """
    out: dict[str, list[np.ndarray]] = {c.name: [np.empty((0, *c.shape), c.dtype)] for c in columns}
    kept: list[int] = []
    for start in range(0, len(samples), batch_size):
        batch = range(start, min(start + batch_size, len(samples)))
        positions, pictures = _read_images(samples, batch, skip_bad_images)
        if pictures:
            kept += positions
            for name, values in _batch_tensors(method, pictures, columns, mean, std).items():
                out[name].append(values)
        advance(len(batch))
    return np.array(kept, dtype=np.int64), {name: np.concatenate(parts) for name, parts in out.items()}


@torch.no_grad()
def _batch_tensors(
    method: Method,
    pictures: list[Image.Image],
    columns: list[ColumnSpec],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, np.ndarray]:
    """One mini-batch of decoded images to every column: stored images resized, features by the frozen path."""
    image_sizes = {name: spec.size for name, spec in method.image_inputs().items()}
    stored_images = [c.name for c in columns if c.dtype == "uint8" and c.name in image_sizes]
    feature_cols = [c for c in columns if c.name not in stored_images]
    needed = set(stored_images) | ({method.frozen_input} if feature_cols else set())
    resized = {
        name: np.stack([resize_square(p, image_sizes[name]).transpose(2, 0, 1) for p in pictures]) for name in needed
    }
    out = {name: resized[name] for name in stored_images}
    if feature_cols:
        features = method.frozen_features(normalise(torch.from_numpy(resized[method.frozen_input]), mean, std))
        out.update({col.name: features[col.name].numpy().astype(col.dtype) for col in feature_cols})
    return out


def _read_images(samples: list[Sample], positions: range, skip_bad_images: bool) -> tuple[list[int], list[Image.Image]]:
    """Decode ``samples[positions]``; an unreadable one stops the preload, or is left out with ``skip_bad_images``."""
    kept: list[int] = []
    pictures: list[Image.Image] = []
    for position in positions:
        try:
            pictures.append(load_image(samples[position].path))
        except DatasetError:
            if not skip_bad_images:
                raise
            continue
        kept.append(position)
    return kept, pictures
