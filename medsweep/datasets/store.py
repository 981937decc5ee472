"""The preload store: per-split Parquet shards of everything a method's trials read.

A store holds, for every image of a dataset, the tensors one method consumes:
uint8 images at the sizes the method asks for and the frozen backbone's
features (float16 by default). It is written once by the preload step and
only read afterwards (by Ray Data in a sweep, by pyarrow in benchmarks).

Layout under ``<cache_dir>/stores/<key>/`` (its build lock is ``<cache_dir>/locks/<key>.lock``)::

    layout.json                  rows per shard (written first: a resumed run keeps the same rows per shard)
    store.json                   key inputs, column specs, per-split rows, shards and rows per shard (written last)
    train/part-00000.parquet     shards of at most ``rows_per_shard`` rows
    train/part-00000.sha256      checksum of the finished shard (written after it)
    val/...  test/...

Rows are written in a seeded random order (see :mod:`medsweep.datasets.order`):
every shard is a random sample of its split, and each row's ``index`` column
names the sample it holds.

Tensor columns are Arrow ``binary`` values holding the raw little-endian bytes
of one sample's tensor; shapes and dtypes live in ``store.json``. Fixed-shape
bytes decode with one ``np.frombuffer`` per batch, and the files stay readable
by pyarrow alone.

Why the pieces exist: the key covers everything that changes the tensors, so a
stale store can never be read; a shard without a matching checksum is redone,
so an interrupted preload resumes where it stopped and a corrupted shard is
rebuilt instead of silently training on garbage. An unreadable ``store.json``
is dropped (the shards are checked against their checksums instead); an
unreadable ``layout.json`` loses the shards too, since nothing else says
which rows they hold. Every file is written under a name of its own
(``.<name>.<pid>-<random>.tmp``) and renamed into place, and one preload at a
time builds a store (:func:`store_lock`), so two users of a shared cache
never interleave a shard.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medsweep.errors import StoreError

# 2: rows in a seeded random order, rows per shard in store.json (format 1 stores were class-sorted).
STORE_FORMAT = 2
LABEL = "label"
INDEX = "index"
LAYOUT_FILE = "layout.json"
META_FILE = "store.json"


@dataclass(frozen=True)
class ColumnSpec:
    """One tensor column: per-sample shape and numpy dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def store_key(parts: dict[str, Any]) -> str:
    """Content address of a store: a hash of every input that changes its tensors."""
    blob = json.dumps({"format": STORE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _binary_rows(values: np.ndarray) -> pa.Array:
    """One binary value per row of ``values`` (C-contiguous), over its own memory: the same array as
    ``pa.array([row.tobytes() for row in values])`` (the same file once written) without copying each row
    into a Python bytes object first (~0.1-0.3 s per 64 MB shard of features on 2 cores)."""
    row_bytes = values[0].nbytes if len(values) else 0
    if len(values) * row_bytes >= 2**31:  # beyond binary's 32-bit offsets: let pyarrow say so
        return pa.array([row.tobytes() for row in values], type=pa.binary())
    offsets = np.arange(len(values) + 1, dtype=np.int32) * row_bytes
    return pa.Array.from_buffers(pa.binary(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(values.reshape(-1).view(np.uint8))])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class PreloadStore:
    """A store folder; see the module docstring for its layout."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def key(self) -> str:
        return self.root.name

    @property
    def meta_path(self) -> Path:
        return self.root / META_FILE

    def is_complete(self) -> bool:
        return self.meta_path.is_file()

    def is_damaged(self) -> bool:
        """``store.json`` or ``layout.json`` is there but cannot be read (truncated by a full disk, edited by hand)."""
        return any(path.is_file() and read_json(path) is None for path in (self.meta_path, self.root / LAYOUT_FILE))

    @property
    def meta(self) -> dict[str, Any]:
        if not self.is_complete():
            raise StoreError(f"preload store {self.root} is incomplete; run `medsweep preload` again to finish it")
        meta = read_json(self.meta_path)
        if meta is None:
            raise StoreError(f"preload store {self.root} has an unreadable store.json; run `medsweep preload` again to repair it")
        return meta

    @property
    def columns(self) -> list[ColumnSpec]:
        return [ColumnSpec(c["name"], tuple(c["shape"]), c["dtype"]) for c in self.meta["columns"]]

    @property
    def multilabel(self) -> bool:
        return self.meta["task"] == "multilabel"

    def shard_paths(self, split: str) -> list[Path]:
        return [self.root / split / name for name in self.meta["splits"][split]["shards"]]

    def num_rows(self, split: str) -> int:
        return int(self.meta["splits"][split]["rows"])

    def shard_rows(self, split: str) -> list[int]:
        """Rows of each shard of ``split``, in shard order (what an epoch order is planned from)."""
        return [int(n) for n in self.meta["splits"][split]["shard_rows"]]

    def row_indices(self, split: str) -> np.ndarray:
        """The dataset position (in ``spec.splits[split]``) of each row, in store order.

        Store order is the order an unshuffled pass reads (validation, test), so
        row ``i`` of a prediction over ``split`` is the image at position
        ``row_indices(split)[i]``. Only the ``index`` column is read.
        """
        parts = [shard_indices(path) for path in self.shard_paths(split)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def label_counts(self, split: str) -> list[int]:
        """Per-class counts of ``split`` (multi-class), or per-label positive counts (multi-label).

        What class-balanced losses are weighted from. Only the label column is
        read, so this costs one small column read per shard. A multi-class list
        ends at the largest label present: classes above it have count 0.
        """
        labels = [pq.read_table(path, columns=[LABEL]).column(LABEL) for path in self.shard_paths(split)]
        if self.multilabel:
            width = labels[0].type.list_size if labels else 0
            positives = sum((_label_matrix(column) > 0.5).sum(axis=0) for column in labels)
            return [int(n) for n in np.broadcast_to(positives, (width,))]
        values = np.concatenate([column.to_numpy() for column in labels]) if labels else np.zeros(0, np.int64)
        return [int(n) for n in np.bincount(values)]

    def size_bytes(self, splits: Iterable[str] | None = None) -> int:
        """Bytes of Parquet on disk (``splits`` only, if given): uncompressed shards, so about their Arrow size."""
        if splits is None:
            return sum(p.stat().st_size for p in self.root.rglob("*.parquet"))
        return sum(p.stat().st_size for split in splits for p in self.shard_paths(split))

    def bytes_per_image(self) -> int:
        return sum(c.nbytes for c in self.columns)

    # -- integrity --------------------------------------------------------------
    def verify(self, split: str | None = None) -> list[Path]:
        """Shards whose checksum does not match (corrupted, truncated, missing)."""
        splits = [split] if split else list(self.meta["splits"])
        bad = []
        for name in splits:
            for shard in self.shard_paths(name):
                if not _shard_ok(shard):
                    bad.append(shard)
        return bad


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None if it is not one (truncated, empty, edited)."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def write_atomically(path: Path, data: bytes | str | Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file of this process's own, renamed into place.

    ``data`` is the content, or a function that writes a given path. Two
    writers never share a temporary name, and a reader sees the old file or
    the whole new one. A failed write leaves no temporary file behind.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def store_lock(root: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the build lock of the store at ``root`` (an advisory POSIX lock, which NFS/EFS honour too).

    A second preload of the same store (another user on a shared cache, a
    sweep and a ``medsweep preload`` started together) waits here, calling
    ``on_wait`` once with who holds the lock, then finds the store complete
    and reuses it instead of writing the same shards again.
    """
    locks = root.parent.parent / "locks"  # beside stores/, so that folder holds stores only
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{root.name}.lock", "a+") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if on_wait:
                on_wait(f"store {root.name} is being built by {holder}; waiting for it")
            fcntl.lockf(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def _checksum_path(shard: Path) -> Path:
    return shard.with_suffix(".sha256")


def _shard_ok(shard: Path) -> bool:
    check = _checksum_path(shard)
    return shard.is_file() and check.is_file() and check.read_text().strip() == _sha256(shard)


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class StoreWriter:
    """Writes a store shard by shard; finished shards survive an interruption.

    Usage: for each split, :meth:`pending_shards` says which shard indices still
    need writing; :meth:`write_shard` writes one atomically with its checksum;
    :meth:`finish` writes ``store.json`` once every shard is there.
    """

    def __init__(self, root: Path, columns: list[ColumnSpec], task: str, key_parts: dict[str, Any]) -> None:
        self.store = PreloadStore(root)
        self.columns = columns
        self.task = task
        self.key_parts = key_parts
        root.mkdir(parents=True, exist_ok=True)

    def claim_layout(self, rows_per_shard: int) -> int:
        """The store's rows per shard: the one an earlier (interrupted) run recorded, else ``rows_per_shard``.

        Why: a kept shard covers rows ``[i * n, (i + 1) * n)``; a resumed or
        repaired run that cut shards differently would duplicate some rows and
        drop others. The first run records ``n``; later runs reuse it even if
        the shard size they were asked for differs.
        """
        path = self.store.root / LAYOUT_FILE
        if path.is_file():
            return int(json.loads(path.read_text())["rows_per_shard"])
        write_atomically(path, json.dumps({"rows_per_shard": rows_per_shard}))
        return rows_per_shard

    def pending_shards(self, split: str, num_shards: int) -> list[int]:
        return [i for i in range(num_shards) if not _shard_ok(self.store.root / split / shard_name(i))]

    def write_shard(
        self,
        split: str,
        index: int,
        indices: np.ndarray,
        labels: np.ndarray,
        tensors: dict[str, np.ndarray],
    ) -> Path:
        """Write one shard: ``indices`` [n], ``labels`` [n] or [n, C], ``tensors[col]`` [n, *shape]."""
        arrays: dict[str, pa.Array] = {INDEX: pa.array(indices.astype(np.int64))}
        if labels.ndim == 1:
            arrays[LABEL] = pa.array(labels.astype(np.int64))
        else:
            arrays[LABEL] = pa.FixedSizeListArray.from_arrays(pa.array(labels.astype(np.float32).ravel()), labels.shape[1])
        for spec in self.columns:
            values = np.ascontiguousarray(tensors[spec.name], dtype=spec.dtype)
            if values.shape[1:] != spec.shape:
                raise ValueError(f"column {spec.name}: expected per-sample shape {spec.shape}, got {values.shape[1:]}")
            arrays[spec.name] = _binary_rows(values)
        folder = self.store.root / split
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / shard_name(index)
        table = pa.table(arrays)
        write_atomically(final, lambda tmp: pq.write_table(table, tmp, compression="none", row_group_size=max(1, len(indices))))
        write_atomically(_checksum_path(final), _sha256(final))
        return final

    def finish(self, split_rows: dict[str, int], split_shards: dict[str, int], extra: dict[str, Any]) -> PreloadStore:
        folders = {split: self.store.root / split for split in split_rows}
        meta = {
            "format": STORE_FORMAT,
            "key": self.store.key,
            "key_parts": self.key_parts,
            "task": self.task,
            "columns": [asdict(c) for c in self.columns],
            "splits": {
                split: {
                    "rows": split_rows[split],
                    "shards": [shard_name(i) for i in range(split_shards[split])],
                    "shard_rows": [pq.read_metadata(folders[split] / shard_name(i)).num_rows for i in range(split_shards[split])],
                }
                for split in split_rows
            },
            **extra,
        }
        write_atomically(self.store.meta_path, json.dumps(meta, indent=2, sort_keys=True, default=str))
        return self.store


def shard_indices(shard: Path) -> np.ndarray:
    """The dataset positions a shard holds (its ``index`` column alone, without reading the tensors)."""
    return pq.read_table(shard, columns=[INDEX]).column(INDEX).to_numpy()


def discard_shard(shard: Path) -> None:
    """Remove a bad shard so the next preload rewrites it (and the store is marked incomplete)."""
    shard.unlink(missing_ok=True)
    _checksum_path(shard).unlink(missing_ok=True)
    meta = shard.parent.parent / "store.json"
    meta.unlink(missing_ok=True)


def list_stores(cache_dir: Path) -> list[PreloadStore]:
    folder = Path(cache_dir) / "stores"
    return sorted((PreloadStore(p) for p in folder.iterdir() if p.is_dir()), key=lambda s: s.key) if folder.is_dir() else []


def decode_columns(batch: dict[str, np.ndarray], columns: Iterable[ColumnSpec]) -> dict[str, np.ndarray]:
    """Binary tensor columns of a numpy batch (object arrays of bytes) to ``[n, *shape]`` arrays."""
    out: dict[str, np.ndarray] = {}
    for spec in columns:
        raw = batch[spec.name]
        out[spec.name] = np.frombuffer(bytearray().join(raw), dtype=spec.dtype).reshape(len(raw), *spec.shape)
    return out


def iter_parquet_batches(paths: list[Path], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Read shards with pyarrow alone (no Ray): used by ``medsweep train`` tests and benchmarks."""
    for path in paths:
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
            yield {name: column_to_numpy(record_batch.column(name)) for name in record_batch.schema.names}


def _label_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A stored multi-label column (fixed-size lists) as a ``[n, C]`` float array."""
    width = column.type.list_size
    flat = np.concatenate([chunk.flatten().to_numpy(zero_copy_only=False) for chunk in column.chunks]) if column.num_chunks else np.zeros(0)
    return flat.reshape(-1, width)


def read_shard_batch(batch: pa.Table) -> pa.Table:
    """The shards named in ``batch``'s ``path`` column, as one table: Ray Data's per-shard read function.

    It lives here, not next to the Ray code that uses it, because Ray imports
    a map function's module in every read worker: this one needs only pyarrow
    (~0.5 s), the search package pulls in torch and Ray Train (~10 s here).
    """
    return pa.concat_tables([_tensor_labels(pq.read_table(path)) for path in batch.column("path").to_pylist()])


def _tensor_labels(table: pa.Table) -> pa.Table:
    """Multi-label vectors as Arrow's canonical fixed-shape tensor, a zero-copy view of the stored list.

    Why: Ray Data turns a fixed-shape tensor column into one ``[n, C]`` array
    per batch, but a fixed-size list into an object array of rows, which
    ``torch.tensor`` rejects.
    """
    label = table.column(LABEL)
    if not pa.types.is_fixed_size_list(label.type):
        return table
    tensor_type = pa.fixed_shape_tensor(label.type.value_type, [label.type.list_size])
    chunks = [pa.ExtensionArray.from_storage(tensor_type, chunk) for chunk in label.chunks]
    return table.set_column(table.schema.get_field_index(LABEL), LABEL, pa.chunked_array(chunks, type=tensor_type))


def table_to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """A batch as numpy columns: binary tensor columns as object arrays of bytes, labels as ``[n]`` or ``[n, C]``."""
    return {name: column_to_numpy(table.column(name).combine_chunks()) for name in table.column_names}


def column_to_numpy(column: pa.Array) -> np.ndarray:
    if isinstance(column.type, pa.FixedShapeTensorType):
        return column.to_numpy_ndarray()
    if pa.types.is_fixed_size_list(column.type):
        return column.flatten().to_numpy().reshape(len(column), column.type.list_size)
    if pa.types.is_binary(column.type):
        return np.array(column.to_pylist(), dtype=object)
    return column.to_numpy()
