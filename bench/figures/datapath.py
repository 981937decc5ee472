"""Figure 6: samples/s through Ray Data over a preload store vs pyarrow alone, same files, same decode.

The store is the CPU benchmark's FPT+ store (train split). Each round times
one pass of every reader, interleaved so load changes hit all of them alike:

* pyarrow: ``iter_parquet_batches`` + ``decode_columns`` (no Ray);
* Ray Data: the materialized ``read_parquet`` dataset, ``iter_batches`` + ``decode_columns``;
* pyarrow decoded straight from the Arrow buffers (one ``np.frombuffer`` per
  column and batch, no Python ``bytes`` per row): what the pyarrow baseline
  could do, to show what ``column_to_numpy`` + ``decode_columns`` cost it;
* the readers training really uses, each in its epoch's shuffled order
  (:mod:`medsweep.datasets.order`): a sweep trial's reader over the store's
  pinned object-store blocks and over its Ray Data stream (what a store too
  large for the object store gets), and ``medsweep train``'s pyarrow reader.

Read + materialize is paid once per sweep and reported apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from medsweep.datasets.store import ColumnSpec, decode_columns, iter_parquet_batches
from medsweep.search.data import store_data
from medsweep.search.trial import _RayIO
from medsweep.trainables.preload import PreloadResult, preload
from medsweep.trainables.store_io import StoreIO

from bench.common import demo_spec, median, table, trial_method

NAME = "datapath"
TITLE = "6. Data path: Ray Data vs pyarrow over the preload store"
TARGET = 0.5
BATCH = 16
EPOCHS_PER_PASS = 10  # one epoch of the train split takes tens of ms: too short to time alone


def _drain(epoch: Callable[[int], Iterable[dict[str, np.ndarray]]], columns: list[ColumnSpec]) -> int:
    """Decode every batch of ``EPOCHS_PER_PASS`` epochs (``epoch(i)`` gives epoch i's batches); returns rows."""
    rows = 0
    for i in range(EPOCHS_PER_PASS):
        for batch in epoch(i):
            rows += len(decode_columns(batch, columns)[columns[0].name])
    return rows


def _arrow_rows(paths: list, columns: list[ColumnSpec]) -> int:
    """Decode every tensor column of each record batch from its Arrow data buffer (rows are fixed-size)."""
    rows = 0
    for path in [p for _ in range(EPOCHS_PER_PASS) for p in paths]:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH):
            for spec in columns:
                column = batch.column(spec.name)
                offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset : column.offset + len(column) + 1]
                data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
                data.view(spec.dtype).reshape(len(column), *spec.shape)
            rows += batch.num_rows
    return rows


def _timed(read: Callable[[], int]) -> dict[str, float]:
    start = time.perf_counter()
    rows = read()
    return {"rows": rows, "seconds": time.perf_counter() - start}


def run(ctx) -> dict[str, Any]:
    import ray

    ctx.ray()
    spec = demo_spec(ctx.cache_dir)
    store = preload(spec, trial_method(spec, {}), ctx.cache_dir).store
    paths, columns = store.shard_paths("train"), store.columns
    start = time.perf_counter()
    ds = ray.data.read_parquet([str(p) for p in paths]).materialize()
    materialize_s = time.perf_counter() - start
    shared = PreloadResult(store, True, 0.0, 0)
    pinned = _RayIO(store_data(shared)[0], distributed=False, seed=0)
    streamed = _RayIO(store_data(shared, fraction=0.0)[0], distributed=False, seed=0)
    plain = StoreIO(store, seed=0)
    epochs: dict[str, Callable[[int], Iterable[dict[str, np.ndarray]]]] = {
        "pyarrow": lambda i: iter_parquet_batches(paths, BATCH),
        "ray_data": lambda i: ds.iter_batches(batch_size=BATCH, batch_format="numpy"),
        "trial_pinned": lambda i: pinned.batches("train", BATCH, i, shuffle=True),
        "trial_streamed": lambda i: streamed.batches("train", BATCH, i, shuffle=True),
        "train_plain": lambda i: plain.batches("train", BATCH, i, shuffle=True),
    }
    readers: dict[str, Callable[[], dict[str, float]]] = {
        name: (lambda epoch=epoch: _timed(lambda: _drain(epoch, columns))) for name, epoch in epochs.items()
    }
    readers["pyarrow_buffers"] = lambda: _timed(lambda: _arrow_rows(paths, columns))
    passes: dict[str, list[dict[str, float]]] = {name: [] for name in readers}
    for _ in range(ctx.plan.datapath_passes):
        for name, read in readers.items():
            passes[name].append(read())
    rates = {name: median(p["rows"] / p["seconds"] for p in runs) for name, runs in passes.items()}
    ratio = rates["ray_data"] / rates["pyarrow"]
    return {
        "status": "PASS" if ratio >= TARGET else "SHORT",
        "data": {
            "rows": store.num_rows("train"),
            "bytes_per_row": store.bytes_per_image(),
            "materialize_s": materialize_s,
            "passes": passes,
            "rates": rates,
            "ratio": ratio,
        },
    }


LABELS = {
    "pyarrow": "pyarrow `iter_parquet_batches` (baseline)",
    "pyarrow_buffers": "pyarrow, decoded from the Arrow buffers (bench-only reader)",
    "ray_data": "Ray Data `iter_batches`",
    "trial_pinned": "sweep trial's reader, pinned blocks, epoch order",
    "trial_streamed": "sweep trial's reader, Ray Data stream, epoch order",
    "train_plain": "`medsweep train`'s pyarrow reader, epoch order",
}


def render(result: dict[str, Any]) -> str:
    d = result["data"]
    base = d["rates"]["pyarrow"]
    rates = d["rates"]
    rows = [(label, rates[name], f"{100 * rates[name] / base:.0f}%", len(d["passes"][name])) for name, label in LABELS.items()]
    return "\n\n".join(
        [
            f"Train split of the FPT+ store: {d['rows']} rows of {d['bytes_per_row'] / 1024:.0f} KiB, batch {BATCH}, "
            f"every batch decoded with `decode_columns`; median samples/s over interleaved passes of "
            f"{EPOCHS_PER_PASS} epochs each. Read + "
            f"materialize once: {d['materialize_s']:.2f} s.",
            table(("reader", "samples/s", "vs pyarrow", "passes"), rows),
            f"Ray Data runs at **{100 * d['ratio']:.0f}%** of pyarrow (target >= {100 * TARGET:.0f}%); a trial's "
            f"shuffled epoch at {100 * rates['trial_pinned'] / base:.0f}% over pinned blocks, "
            f"{100 * rates['trial_streamed'] / base:.0f}% streamed.",
        ]
    )


def summary(result: dict[str, Any]) -> tuple[str, str]:
    d = result["data"]
    return f"Ray Data >= {100 * TARGET:.0f}% of pyarrow", f"{100 * d['ratio']:.0f}% ({d['rates']['ray_data']:,.0f} vs {d['rates']['pyarrow']:,.0f} samples/s)"
