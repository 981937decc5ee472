"""Run a method's frozen path once over a dataset and write its preload store.

The store holds what the method's trials consume (see
:mod:`medsweep.datasets.store`): each image input as uint8 at its size and,
for preloadable methods, the frozen features. Trials then never decode an
image or run the frozen backbone.

A preload is four steps, each a plain function here so that every runner
shares them: :func:`plan_store` (under the store's lock: reuse, repair, the
layout and the shards still to write), :func:`~medsweep.datasets.shards.decode_shard`
(images to resized uint8 arrays, CPU only, no torch), :func:`shard_features` (the frozen forward
over one shard, in mini-batches) and :func:`finish_store`. :func:`preload`
runs them in this process (``medsweep train``, tests, benchmarks);
:mod:`medsweep.search.frozen_pass` runs the middle two as a Ray Data
pipeline across the cluster (``medsweep preload``, ``medsweep sweep``). One
shard is one unit of work for both, so a store is the same tensor for tensor
whoever computed it.
"""

from __future__ import annotations

import errno
import math
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medsweep.datasets.order import written_order
from medsweep.datasets.shards import ShardUnit, decode_shard, shard_labels
from medsweep.datasets.spec import SPLITS, DatasetSpec
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
    write_atomically,
)
from medsweep.errors import DatasetError, StoreError
from medsweep.trainables.backbones import backbone_identity, backbone_normalisation
from medsweep.trainables.inputs import normalise
from medsweep.trainables.memory import FROZEN_BATCH_CAP, device_of, frozen_batch_size
from medsweep.trainables.methods.base import Method
from medsweep.trainables.precision import PRECISIONS, autocast, resolve_precision

SHARD_TARGET_BYTES = 64 << 20
DECODED_SHARD_BYTES = 256 << 20
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
        ColumnSpec(name, (3, spec.stored_size, spec.stored_size), "uint8")
        for name, spec in sorted(method.stored_inputs(preloaded=with_features).items())
    ]
    if with_features:
        size = method.image_inputs()[method.frozen_input].size
        # A frozen model built without weights (a planner that never runs it) answers on meta inputs.
        device = "meta" if any(p.is_meta for p in method.parameters()) else "cpu"
        probe = method.frozen_features(torch.zeros(1, 3, size, size, device=device))
        columns += [ColumnSpec(k, tuple(v.shape[1:]), feature_dtype) for k, v in sorted(probe.items())]
    return columns


def store_key_parts(
    spec: DatasetSpec,
    method: Method,
    feature_dtype: str,
    with_features: bool = True,
    order_seed: int = 0,
    precision: str = "fp32",
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
        "images": {k: v.stored_size for k, v in method.stored_inputs(preloaded=with_features).items()},
        "normalisation": [list(mean), list(std)],
        "feature_dtype": feature_dtype if with_features else None,
        "frozen_precision": precision if with_features else None,
        "resize": "square-bicubic",
        "row_order_seed": order_seed,
    }


def preload(
    spec: DatasetSpec,
    method: Method,
    cache_dir: Path,
    *,
    feature_dtype: str = "float16",
    batch_size: int | None = None,
    splits: tuple[str, ...] = SPLITS,
    progress: Callable[[str, int], Progress] | None = None,
    with_features: bool = True,
    shard_target_bytes: int = SHARD_TARGET_BYTES,
    skip_bad_images: bool = False,
    order_seed: int = 0,
    precision: str = "auto",
    on_wait: Callable[[str], None] | None = None,
) -> PreloadResult:
    """Write (or reuse) the store of ``method`` over ``spec`` in this process; resumes an interrupted run, repairs a damaged one.

    A complete store whose checksums all match is reused. A complete store
    with corrupt or missing shards loses its ``store.json`` and those shards
    (so nothing reads it half-repaired), then only they are rewritten. An
    interrupted store keeps its finished shards and only the missing ones are
    written.

    Args:
        batch_size: images per frozen forward; None probes the device's memory
            (:func:`frozen_batch_size_for`).
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
        precision: the frozen forward's compute precision (:func:`resolve_precision`
            on the method's device); part of the cache key. The stored dtype is
            ``feature_dtype`` whatever it is.
        on_wait: called with one line if another process is building the same
            store; this one then waits for it and reuses what it built.

    Raises:
        StoreError: the cache folder cannot be written (read-only, full,
            not a folder); the store is left unfinished, never marked complete,
            and the next run resumes it.
    """
    started = time.perf_counter()
    precision = resolve_precision(precision, device_of(method))
    request = PreloadRequest(spec, feature_dtype, splits, with_features, shard_target_bytes, skip_bad_images, order_seed, precision)
    parts, root = request.locate(method, cache_dir)
    with building(root, cache_dir, on_wait):
        plan = plan_store(request, method, parts, root)
        if plan.reused is not None:
            return plan.reused
        assert plan.writer is not None  # a store not reused is written
        advance = progress(f"preload {method.name} -> {plan.root.name}", plan.images) if progress else (lambda n: None)
        method.eval()
        mean, std = backbone_normalisation(method.config.backbone)
        if with_features and not batch_size:
            batch_size = frozen_batch_size_for(method, plan.decode_sizes, plan.rows_per_shard, precision)
        for unit in plan.units:
            kept, images = decode_shard(unit.samples, plan.decode_sizes, skip_bad_images)
            tensors = shard_features(method, images, plan.columns, mean, std, batch_size, precision)
            plan.writer.write_shard(unit.split, unit.shard, unit.positions[kept], shard_labels(unit, kept, spec.task, spec.num_classes), tensors)
            advance(len(unit.samples))
        seconds = time.perf_counter() - started
        here = {"images": plan.images, "seconds": seconds, "device": str(device_of(method)), "batch_size": batch_size}
        nodes = {f"this process ({socket.gethostname()})": here}
        return finish_store(plan, request, method.name, seconds, nodes)


@dataclass(frozen=True)
class PreloadRequest:
    """What a preload was asked for, besides the method: everything :func:`plan_store` needs."""

    spec: DatasetSpec
    feature_dtype: str = "float16"
    splits: tuple[str, ...] = SPLITS
    with_features: bool = True
    shard_target_bytes: int = SHARD_TARGET_BYTES
    skip_bad_images: bool = False
    order_seed: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be resolved to one of {', '.join(PRECISIONS)} (see resolve_precision), got {self.precision!r}")
        if self.shard_target_bytes < 1:
            raise ValueError(f"shard_target_bytes must be positive, got {self.shard_target_bytes}")

    def locate(self, method: Method, cache_dir: Path) -> tuple[dict, Path]:
        """The store's key parts and folder, computed once (the key may hash a backbone's weight files)."""
        parts = store_key_parts(self.spec, method, self.feature_dtype, self.with_features, self.order_seed, self.precision)
        return parts, Path(cache_dir) / "stores" / store_key(parts)


@dataclass
class StorePlan:
    """What a preload must do, decided under the store's lock by :func:`plan_store`.

    ``reused``: the store was complete and sound (nothing to do). Otherwise
    ``units`` are the shards to write, ``images`` how many images they hold,
    ``decode_sizes`` the square sizes each image is decoded to.
    """

    root: Path
    reused: PreloadResult | None = None
    writer: StoreWriter | None = None
    columns: list[ColumnSpec] = field(default_factory=list)
    rows_per_shard: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    units: list[ShardUnit] = field(default_factory=list)
    decode_sizes: dict[str, int] = field(default_factory=dict)
    repairs: list[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(len(unit.samples) for unit in self.units)


def plan_store(request: PreloadRequest, method: Method, parts: dict, root: Path) -> StorePlan:
    """Reuse a sound store, or repair what is damaged and list the shards still to write (call under the lock)."""
    started = time.perf_counter()
    store = PreloadStore(root)
    repairs = _drop_unreadable_metadata(store)
    if store.is_complete():
        bad = store.verify()
        if not bad:
            return StorePlan(root, reused=PreloadResult(store, True, time.perf_counter() - started, 0, 0, _skipped_count(store)))
        for bad_shard in bad:
            discard_shard(bad_shard)
        repairs.append(f"repaired {len(bad)} corrupt shard{'s' if len(bad) > 1 else ''}")
    columns = store_columns(method, request.feature_dtype, request.with_features)
    decode_sizes = _decode_sizes(method, columns)
    writer = StoreWriter(root, columns, request.spec.task, parts)
    rows = writer.claim_layout(_rows_per_shard(columns, request.shard_target_bytes, decode_sizes))
    counts = {split: math.ceil(len(request.spec.splits[split]) / rows) for split in request.splits}
    units = []
    for split in request.splits:
        samples = request.spec.splits[split]
        order = written_order(len(samples), request.order_seed, split)
        for shard in writer.pending_shards(split, counts[split]):
            positions = order[shard * rows : (shard + 1) * rows]
            units.append(ShardUnit(split, shard, positions, [samples[i] for i in positions]))
    return StorePlan(root, None, writer, columns, rows, counts, units, decode_sizes, repairs)


def finish_store(plan: StorePlan, request: PreloadRequest, method_name: str, seconds: float, nodes: dict) -> PreloadResult:
    """Write ``store.json`` once every shard is there; ``nodes`` records where the frozen pass ran and how long."""
    spec = request.spec
    assert plan.writer is not None  # a store not reused is written
    skipped = {split: _skipped_paths(plan.writer.store, spec, split, plan.counts[split]) for split in request.splits}
    store = plan.writer.finish(
        {s: len(spec.splits[s]) - len(skipped[s]) for s in request.splits},
        plan.counts,
        {
            "dataset": spec.name,
            "classes": spec.classes,
            "method": method_name,
            "rows_per_shard": plan.rows_per_shard,
            "row_order_seed": request.order_seed,
            "skipped": skipped,
            "frozen_pass": nodes,
        },
    )
    return PreloadResult(store, False, seconds, plan.images, len(plan.units), _skipped_count(store), plan.repairs)


@torch.no_grad()
def shard_features(
    method: Method,
    images: dict[str, np.ndarray],
    columns: list[ColumnSpec],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int | None,
    precision: str = "fp32",
) -> dict[str, np.ndarray]:
    """Every column of one decoded shard: stored images as they are, frozen features in mini-batches of ``batch_size``.

    The frozen forward runs on the device the method is on, under autocast to
    ``precision`` unless fp32; features come back as the column's dtype.
    """
    out = {c.name: images[c.name] for c in columns if c.name in images and c.dtype == "uint8"}
    feature_cols = [c for c in columns if c.name not in out]
    if not feature_cols:
        return out
    assert batch_size, "frozen features need a batch size"
    frozen = images[method.frozen_input]
    device = device_of(method)
    # Filled in place, each batch cast to the column's dtype as it is copied in: a shard of FPT+ features is
    # ~64 MB, and a list of per-batch casts joined at the end copied it twice more.
    features_out = {c.name: np.empty((len(frozen), *c.shape), c.dtype) for c in feature_cols}
    for start in range(0, len(frozen), batch_size):
        pixels = normalise(torch.from_numpy(frozen[start : start + batch_size]).to(device), mean, std)
        with autocast(precision, device):
            features = method.frozen_features(pixels)
        for col in feature_cols:
            features_out[col.name][start : start + len(pixels)] = features[col.name].float().cpu().numpy()
    return {**out, **features_out}


def frozen_batch_size_for(method: Method, decode_sizes: dict[str, int], rows_per_shard: int, precision: str) -> int:
    """The frozen forward's batch size on the method's device: a memory probe on a GPU
    (:func:`medsweep.trainables.memory.frozen_batch_size`), never more than a shard's rows."""
    size = decode_sizes.get(method.frozen_input, method.config.image_size)
    dtype = None if precision == "fp32" else PRECISIONS[precision]
    return frozen_batch_size(method, size, dtype, cap=max(1, min(FROZEN_BATCH_CAP, rows_per_shard)))


def _decode_sizes(method: Method, columns: list[ColumnSpec]) -> dict[str, int]:
    """The sizes each image is decoded to: every stored image input, and the frozen input if features are stored."""
    sizes = {name: spec.stored_size for name, spec in method.image_inputs().items()}
    stored = {c.name for c in columns if c.dtype == "uint8" and c.name in sizes}
    features = any(c.name not in stored for c in columns)
    return {name: size for name, size in sizes.items() if name in stored or (features and name == method.frozen_input)}


@contextmanager
def building(root: Path, cache_dir: Path, on_wait: Callable[[str], None] | None) -> Iterator[None]:
    """Hold the store's build lock; an OS error under the cache folder becomes one :class:`StoreError` line."""
    try:
        with store_lock(root, on_wait=on_wait):
            yield
    except OSError as error:
        raise StoreError(cache_write_error(error, cache_dir)) from error


def check_cache_dir(cache_dir: Path) -> None:
    """Make sure ``cache_dir`` can take a store (created if missing, a file written and removed there).

    Called before Ray starts, so a read-only, full or misnamed cache is one line at once,
    not after the cluster's start-up. Raises :class:`StoreError` naming the fix.
    """
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        write_atomically(Path(cache_dir) / ".medsweep-write-check", "")
        (Path(cache_dir) / ".medsweep-write-check").unlink()
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


def rows_per_shard(method: Method, feature_dtype: str = "float16", with_features: bool = True) -> int:
    """Rows of each shard of a fresh store of ``method``: one shard is one call of the frozen pass, so its
    forward never takes more images than this (at 512 px FPT+ stores ~9 MB per image: 7 rows)."""
    columns = store_columns(method, feature_dtype, with_features)
    return _rows_per_shard(columns, SHARD_TARGET_BYTES, _decode_sizes(method, columns))


def _rows_per_shard(columns: list[ColumnSpec], target_bytes: int, decode_sizes: dict[str, int]) -> int:
    """Rows that keep a shard near ``target_bytes`` stored and ~:data:`DECODED_SHARD_BYTES` decoded, capped so tiny rows still make a few shards.

    The decoded bound matters for stores of small rows at a large frozen
    input (a linear probe at 512 px stores 3 KiB per image but decodes 768
    KiB): one shard is one unit of the frozen pass, decoded whole.
    """
    decoded = sum(3 * size * size for size in decode_sizes.values())
    by_store = target_bytes // max(1, sum(c.nbytes for c in columns))
    return max(1, min(MAX_ROWS_PER_SHARD, by_store, DECODED_SHARD_BYTES // max(1, decoded)))


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
