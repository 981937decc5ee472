"""Hand a preload store's train and val splits to the sweep's trials through Ray.

One decision per store, taken once per sweep (:func:`store_data`):

* **materialize** when train + val fit in half of the cluster's object store
  (counting stores already pinned by this sweep): the driver reads the shards
  once with pyarrow and puts each in the object store as one Arrow block
  (a read task would first start a worker process and import its reader, 6 s
  of a 6.1 s materialize measured here on a small store, 0.02 s this way).
  The blocks stay pinned, and every trial (and every epoch, and every DDP
  worker, on any node) reads those same blocks by reference, so no file is
  opened again whatever the number of trials. Half, not all: the rest holds
  trial results, checkpoints and streaming blocks, and past capacity Ray
  spills objects to disk, which would turn "in memory" back into disk reads.
* **stream** otherwise: every epoch a Ray Data pipeline reads the Parquet
  shards again, at most :data:`STREAM_READS` in flight, so a store larger
  than memory trains with bounded memory.

Either way a trial reads the shards in its epoch's order
(:mod:`medsweep.datasets.order`), the same order ``medsweep train`` and
``final`` read from the files: a fresh seeded permutation of the shards per
epoch, rows permuted within windows of shards. That is why trials do not
take Ray Train's ``get_dataset_shard`` iterators: their order comes from Ray
Data's local shuffle buffer over a fixed block order (a class-sorted stream
when shards are small, issue 16) and cannot be reproduced at a given epoch
after a restore, nor by a plain reader.

Why streamed shards are read by our own tasks (``from_items(paths).map_batches``) and
not by ``ray.data.read_parquet``: a streaming read runs while trials hold the
CPUs. Measured on Ray 2.60 (2 CPUs, two actors of 1 CPU each iterating a lazy
dataset): ``read_parquet`` plans a ``ListFiles`` operator whose task asks for
1 CPU whatever the read's ``num_cpus`` (with ``num_cpus=0``, and with
``use_datasource_v2=False``, it still waited forever), the deadlock DESIGN.md
records. Here the only tasks are the shard reads, which reserve no CPU
(``num_cpus=0``): they run beside the trials that hold every CPU. A shard
read is a memory copy of an uncompressed file, so not reserving a core for it
costs little. Materializing uses the same reader function, so both modes give
trials identical Arrow tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray

from medsweep.datasets.order import epoch_order, ordered_batches
from medsweep.datasets.store import ColumnSpec, PreloadStore, read_shard_batch, table_to_numpy

if TYPE_CHECKING:  # trials unpickle StoreData: a fused member must not import the model code for a type
    from medsweep.trainables.preload import PreloadResult

MATERIALIZE_FRACTION = 0.5
STREAM_READS = 2
TRIAL_SPLITS = ("train", "val")  # the search never sees test


@dataclass
class StoreData:
    """A preload store's trial splits as trials read them: pinned blocks, or shard files to stream.

    It travels to every trial (and DDP worker) by value; the block references
    inside it keep the driver's blocks pinned while any trial holds it.
    """

    key: str
    columns: list[ColumnSpec]
    shard_rows: dict[str, list[int]]
    # Label counts of each trial split, counted once by the driver (class-balanced losses read them).
    class_counts: dict[str, list[int]] = field(default_factory=dict)
    blocks: dict[str, list[ray.ObjectRef]] = field(default_factory=dict)  # materialized: one per shard
    paths: dict[str, list[str]] = field(default_factory=dict)  # streamed: shard files

    @property
    def materialized(self) -> bool:
        return bool(self.blocks)

    @property
    def row_bytes(self) -> int:
        return sum(column.nbytes for column in self.columns)

    def num_rows(self, split: str) -> int:
        return sum(self.shard_rows[split])

    def label_counts(self, split: str) -> list[int]:
        return self.class_counts[split]

    def tables(self, split: str, shards: Sequence[int]) -> Iterator[pa.Table]:
        """The shards of ``split`` numbered ``shards``, in that order (one table per shard)."""
        if self.materialized:
            for shard in shards:
                yield ray.get(self.blocks[split][shard])
            return
        stream = read_split([self.paths[split][shard] for shard in shards])
        yield from stream.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)


def store_data(
    result: PreloadResult,
    *,
    fraction: float = MATERIALIZE_FRACTION,
    pinned_bytes: int = 0,
) -> tuple[StoreData, str]:
    """The store's train and val splits as trials read them, and one line saying how and why.

    Materialized when ``pinned_bytes`` (other stores of this sweep already
    materialized) plus this store's train + val bytes are at most ``fraction``
    of the cluster's object store; streamed from Parquet each epoch otherwise
    (``fraction=0`` always streams).
    """
    store = result.store
    size = store.size_bytes(TRIAL_SPLITS)
    capacity = object_store_bytes()
    name = f"store {store.key} (train+val {_size(size)})"
    shard_rows = {split: store.shard_rows(split) for split in TRIAL_SPLITS}
    counts = {split: store.label_counts(split) for split in TRIAL_SPLITS}
    if fits_object_store(store, fraction, pinned_bytes):
        data = StoreData(store.key, store.columns, shard_rows, counts, blocks={s: materialize_split(store, s) for s in TRIAL_SPLITS})
        why = (
            f"{name} materialized once, shared by every trial: it fits in {fraction:.0%} of the "
            f"{_size(capacity)} object store{_pinned(pinned_bytes)}"
        )
    else:
        paths = {split: [str(path) for path in store.shard_paths(split)] for split in TRIAL_SPLITS}
        data = StoreData(store.key, store.columns, shard_rows, counts, paths=paths)
        why = (
            f"{name} streams from Parquet every epoch, at most {STREAM_READS} shards in flight per reader: "
            f"it does not fit in {fraction:.0%} of the {_size(capacity)} object store{_pinned(pinned_bytes)}"
        )
    return data, why


def share_stores(
    results: Iterable[PreloadResult],
    *,
    fraction: float = MATERIALIZE_FRACTION,
) -> dict[str, tuple[StoreData, str]]:
    """:func:`store_data` for each distinct store of a sweep, in order, counting what earlier ones pinned."""
    shared: dict[str, tuple[StoreData, str]] = {}
    pinned = 0
    for result in results:
        store = result.store
        if store.key in shared:
            continue
        materialized = fits_object_store(store, fraction, pinned)
        shared[store.key] = store_data(result, fraction=fraction, pinned_bytes=pinned)
        pinned += store.size_bytes(TRIAL_SPLITS) if materialized else 0
    return shared


def fits_object_store(store: PreloadStore, fraction: float, pinned_bytes: int = 0) -> bool:
    """The decision rule: train + val plus ``pinned_bytes`` at most ``fraction`` of the object store."""
    return pinned_bytes + store.size_bytes(TRIAL_SPLITS) <= fraction * object_store_bytes()


def read_split(paths: Sequence[str]) -> ray.data.Dataset:
    """A lazy dataset of shard files, in the given order: one zero-CPU read task per shard, :data:`STREAM_READS` at a time."""
    items = ray.data.from_items([{"path": str(path)} for path in paths], override_num_blocks=max(1, len(paths)))
    stream = items.map_batches(
        read_shard_batch,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=STREAM_READS),
    )
    stream.context.execution_options.preserve_order = True  # the epoch order is the order of ``paths``
    stream.context.enable_progress_bars = False
    return stream


def materialize_split(store: PreloadStore, split: str) -> list[ray.ObjectRef]:
    """One split read by the driver, one Arrow block per shard, pinned in the object store."""
    return [ray.put(read_shard_batch(pa.table({"path": [str(path)]}))) for path in store.shard_paths(split)]


def object_store_bytes() -> int:
    """The cluster's object store capacity (Ray reports it as a resource that objects do not consume)."""
    return int(ray.available_resources().get("object_store_memory", 0))


def _size(size: int) -> str:
    """Bytes for a person: KB below one MB (a demo store), MB below one GB, GB above."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 2**10:.1f} KB"


def _pinned(pinned_bytes: int) -> str:
    return f" beside {_size(pinned_bytes)} of stores already pinned" if pinned_bytes else ""


class StoreBatches:
    """The data side of a trial's IO: one worker's batches of the sweep's shared store in the epoch's order.

    Shared by a trial's IO (:mod:`medsweep.search.trial`) and a cohort server's IO (:mod:`medsweep.search.cohorts`), so a
    fused member reads exactly the batches its standalone trial would."""

    def __init__(self, data: StoreData, seed: int, world_size: int = 1, rank: int = 0) -> None:
        self.data = data
        self.columns = data.columns
        self.seed = seed
        self.world_size, self.rank = world_size, rank

    def num_rows(self, split: str) -> int:
        return self.data.num_rows(split)

    def label_counts(self, split: str) -> list[int]:
        return self.data.label_counts(split)

    def batches(self, split: str, batch_size: int, epoch: int, shuffle: bool) -> Iterator[dict[str, np.ndarray]]:
        """Training: this worker's stride of the epoch's order; validation: every row, in store order, on every worker."""
        order = epoch_order(self.data.shard_rows[split], self.data.row_bytes, self.seed, epoch, shuffle)
        rank, world = (self.rank, self.world_size) if shuffle else (0, 1)
        for batch in ordered_batches(self.data.tables(split, order.shards), order, batch_size, rank, world):
            yield table_to_numpy(batch)
