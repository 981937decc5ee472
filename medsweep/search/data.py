"""Hand a preload store's train and val splits to the sweep's trials as Ray datasets.

One decision per store, taken once per sweep (:func:`store_data`):

* **materialize** when train + val fit in half of the cluster's object store
  (counting stores already pinned by this sweep): the driver reads the shards
  once with pyarrow and puts them in the object store as blocks
  (``ray.data.from_arrow``; a materializing read task would first start a
  worker process and import its reader, 6 s of a 6.1 s materialize measured
  here on a small store, 0.02 s this way), the blocks stay pinned, and every trial (and every epoch, and every DDP
  worker's ``streaming_split``) reads those same blocks, so no file is opened
  again whatever the number of trials. Half, not all: the rest holds trial
  results, checkpoints and streaming blocks, and past capacity Ray spills
  objects to disk, which would turn "in memory" back into disk reads.
* **stream** otherwise: a lazy dataset that reads the Parquet shards again at
  every epoch, at most :data:`STREAM_READS` shards in flight per reader, so a
  store larger than memory trains with bounded memory.

Why shards are read by our own tasks (``from_items(paths).map_batches``) and
not by ``ray.data.read_parquet``: a streaming read runs while trials hold the
CPUs. Measured on Ray 2.60 (2 CPUs, two actors of 1 CPU each iterating a lazy
dataset): ``read_parquet`` plans a ``ListFiles`` operator whose task asks for
1 CPU whatever the read's ``num_cpus`` (with ``num_cpus=0``, and with
``use_datasource_v2=False``, it still waited forever), the deadlock DESIGN.md
records. Here the only tasks are the shard reads, which reserve no CPU
(``num_cpus=0``): they run beside the trials that hold every CPU, and Ray
Data's ``ExecutionOptions`` (which Ray Train overwrites per dataset anyway)
are not needed. A shard read is a memory copy of an uncompressed file, so not
reserving a core for it costs little. Materializing uses the same reader
function, so both modes give trials identical Arrow columns.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import ray

from medsweep.datasets.store import PreloadStore, read_shard_batch
from medsweep.search.trial import StoreData
from medsweep.trainables.preload import PreloadResult

MATERIALIZE_FRACTION = 0.5
STREAM_READS = 2
TRIAL_SPLITS = ("train", "val")  # the search never sees test


def store_data(
    result: PreloadResult,
    *,
    fraction: float = MATERIALIZE_FRACTION,
    pinned_bytes: int = 0,
) -> tuple[StoreData, str]:
    """The store's train and val splits as Ray datasets, and one line saying how and why.

    Materialized when ``pinned_bytes`` (other stores of this sweep already
    materialized) plus this store's train + val bytes are at most ``fraction``
    of the cluster's object store; streamed from Parquet each epoch otherwise
    (``fraction=0`` always streams).
    """
    store = result.store
    size = store.size_bytes(TRIAL_SPLITS)
    capacity = object_store_bytes()
    name = f"store {store.key} (train+val {_size(size)})"
    if fits_object_store(store, fraction, pinned_bytes):
        datasets = {split: materialize_split(store, split) for split in TRIAL_SPLITS}
        why = (
            f"{name} materialized once, shared by every trial: it fits in {fraction:.0%} of the "
            f"{_size(capacity)} object store{_pinned(pinned_bytes)}"
        )
    else:
        datasets = {split: read_split(store, split) for split in TRIAL_SPLITS}
        why = (
            f"{name} streams from Parquet every epoch, at most {STREAM_READS} shards in flight per reader: "
            f"it does not fit in {fraction:.0%} of the {_size(capacity)} object store{_pinned(pinned_bytes)}"
        )
    rows = {split: store.num_rows(split) for split in TRIAL_SPLITS}
    return StoreData(store.key, store.columns, rows, datasets), why


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


def read_split(store: PreloadStore, split: str) -> ray.data.Dataset:
    """A lazy dataset of one split: one zero-CPU read task per shard, :data:`STREAM_READS` at a time."""
    paths = [str(path) for path in store.shard_paths(split)]
    items = ray.data.from_items([{"path": path} for path in paths], override_num_blocks=max(1, len(paths)))
    return items.map_batches(
        read_shard_batch,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=STREAM_READS),
    )


def materialize_split(store: PreloadStore, split: str) -> ray.data.MaterializedDataset:
    """One split read by the driver, one block per shard, pinned in the object store."""
    tables = [read_shard_batch(pa.table({"path": [str(path)]})) for path in store.shard_paths(split)]
    return ray.data.from_arrow(tables)


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
