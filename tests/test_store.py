"""The preload store without Ray: round trips, resume, corruption repair, cache keys, fp16, shard size, bad images.

Every preload here runs for real (a random ``vit-tiny`` on a 32 px synthetic
set); the only monkeypatch is on the image loader, to inject an interruption
or count decodes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

import medsweep.datasets.shards as shards_module
import medsweep.trainables.preload as preload_module
from medsweep.datasets import load_image, load_imagefolder, make_synthetic
from medsweep.datasets.order import written_order
from medsweep.datasets.spec import DatasetSpec
from medsweep.datasets.store import (
    ColumnSpec,
    PreloadStore,
    StoreWriter,
    _binary_rows,
    column_to_numpy,
    decode_columns,
    iter_parquet_batches,
    read_shard_batch,
    store_key,
)
from medsweep.errors import DatasetError
from medsweep.trainables.loop import fit
from medsweep.trainables.methods import Method, build_method
from medsweep.trainables.preload import SHARD_TARGET_BYTES, preload, store_key_parts
from medsweep.trainables.store_io import StoreIO

ROWS = {"train": 20, "val": 10, "test": 6}
TINY = {"backbone": "vit-tiny", "image_size": 32}


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    sizes = {f"n_{split}": n for split, n in ROWS.items()}
    return make_synthetic(tmp_path_factory.mktemp("syn"), seed=3, image_size=32, **sizes)


def load_spec(root: Path) -> DatasetSpec:
    return load_imagefolder(root, name="syn")


def tiny_method(spec: DatasetSpec, name: str = "linear", **values: Any) -> Method:
    return build_method(name, {**TINY, "num_classes": spec.num_classes, "task": spec.task, **values})


def rows_target(method: Method, rows: int) -> int:
    """A shard_target_bytes giving ``rows`` rows per shard."""
    return rows * sum(c.nbytes for c in preload_module.store_columns(method, "float16"))


def mtimes(store: PreloadStore) -> dict[str, int]:
    return {str(p.relative_to(store.root)): p.stat().st_mtime_ns for p in store.root.rglob("*.parquet")}


def checksums(store: PreloadStore) -> dict[str, str]:
    return {str(p.relative_to(store.root)): p.read_text() for p in store.root.rglob("*.sha256")}


def counting_loader(monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None) -> list[Path]:
    """Wrap the real image loader: record every decode, raise ``Interrupted`` after ``fail_after`` of them."""
    calls: list[Path] = []

    def load(path: Path):
        if fail_after is not None and len(calls) >= fail_after:
            raise Interrupted(f"interrupted after {fail_after} images")
        calls.append(Path(path))
        return load_image(path)

    monkeypatch.setattr(shards_module, "load_image", load)
    return calls


class Interrupted(Exception):
    """Stands for Ctrl-C or a killed job in the middle of a preload."""


# -- round trip ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_every_column_dtype_round_trips_exactly(tmp_path: Path, task: str) -> None:
    columns = [
        ColumnSpec("image", (3, 5, 5), "uint8"),
        ColumnSpec("keys", (2, 3, 4), "float16"),
        ColumnSpec("pooled", (7,), "float32"),
    ]
    rng = np.random.default_rng(0)
    n = 9
    tensors = {
        "image": rng.integers(0, 256, (n, 3, 5, 5)).astype(np.uint8),
        "keys": rng.standard_normal((n, 2, 3, 4)).astype(np.float16),
        "pooled": rng.standard_normal((n, 7)).astype(np.float32),
    }
    tensors["image"][0] = 255  # extremes survive
    tensors["keys"][0].flat[:4] = [65504, -0.0, 6e-8, -65504]
    tensors["pooled"][0].flat[:2] = [np.finfo(np.float32).max, np.finfo(np.float32).tiny]
    labels = rng.integers(0, 4, n) if task == "multiclass" else rng.integers(0, 2, (n, 4)).astype(np.float32)
    writer = StoreWriter(tmp_path / "s", columns, task, {"k": 1})
    index = np.arange(100, 100 + n)
    writer.write_shard("train", 0, index[:5], labels[:5], {k: v[:5] for k, v in tensors.items()})
    writer.write_shard("train", 1, index[5:], labels[5:], {k: v[5:] for k, v in tensors.items()})
    store = writer.finish({"train": n}, {"train": 2}, {})

    assert store.columns == columns and store.multilabel == (task == "multilabel")
    assert store.bytes_per_image() == 75 + 24 * 2 + 7 * 4
    batches = list(iter_parquet_batches(store.shard_paths("train"), batch_size=4))
    read = {key: np.concatenate([b[key] for b in batches]) for key in ("index", "label")}
    decoded = [decode_columns(b, columns) for b in batches]
    np.testing.assert_array_equal(read["index"], index)
    assert read["index"].dtype == np.int64
    np.testing.assert_array_equal(read["label"], labels)
    assert read["label"].dtype == (np.int64 if task == "multiclass" else np.float32)
    for spec in columns:
        values = np.concatenate([d[spec.name] for d in decoded])
        assert values.dtype == np.dtype(spec.dtype) and values.shape == (n, *spec.shape)
        assert values.tobytes() == tensors[spec.name].tobytes()  # bit-exact, -0.0 and subnormals included

    # What Ray Data reads: the same table, multi-label vectors as a fixed-shape tensor of the same values.
    table = read_shard_batch(pa.table({"path": [str(p) for p in store.shard_paths("train")]}))
    label = table.column("label").combine_chunks()
    if task == "multilabel":
        assert isinstance(label.type, pa.FixedShapeTensorType)
        np.testing.assert_array_equal(label.to_numpy_ndarray(), labels)
    else:
        np.testing.assert_array_equal(column_to_numpy(label), labels)


# -- resume, repair -----------------------------------------------------------------------------------


def test_interrupted_preload_resumes_with_only_the_missing_shards(
    dataset_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_spec(dataset_root)
    method = tiny_method(spec)
    target = rows_target(method, 4)  # train 5 shards, val 3, test 2
    counting_loader(monkeypatch, fail_after=10)
    with pytest.raises(Interrupted):
        preload(spec, method, tmp_path / "cache", shard_target_bytes=target)
    store = PreloadStore(next((tmp_path / "cache" / "stores").iterdir()))
    assert not store.is_complete()
    kept = mtimes(store)
    assert sorted(kept) == ["train/part-00000.parquet", "train/part-00001.parquet"]  # 8 images; the 3rd shard died

    calls = counting_loader(monkeypatch)
    # Asked for the default shard size this time: the store keeps the 4 rows per shard it started with.
    result = preload(spec, method, tmp_path / "cache")
    assert not result.reused and result.store.root == store.root
    assert result.shards_written == 10 - 2 and result.images_processed == sum(ROWS.values()) - 8
    assert len(calls) == result.images_processed
    assert {spec.splits["train"][i].path for i in written_order(ROWS["train"], 0, "train")[:8]}.isdisjoint(calls)
    assert {k: v for k, v in mtimes(store).items() if k in kept} == kept  # finished shards untouched
    assert store.verify() == [] and store.meta["rows_per_shard"] == 4
    assert {s: store.num_rows(s) for s in ROWS} == ROWS

    # Byte for byte what one uninterrupted run writes.
    fresh = preload(spec, method, tmp_path / "fresh", shard_target_bytes=target)
    assert checksums(fresh.store) == checksums(store)
    again = preload(spec, method, tmp_path / "cache")
    assert again.reused and again.images_processed == 0 and again.shards_written == 0


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "lose-checksum"])
def test_corrupt_shard_is_detected_and_only_it_rebuilt(
    dataset_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    spec = load_spec(dataset_root)
    method = tiny_method(spec, "fpt_plus", side_reduction=2)
    store = preload(spec, method, tmp_path, shard_target_bytes=rows_target(method, 4)).store
    original = checksums(store)
    before = mtimes(store)
    meta_before = store.meta_path.stat().st_mtime_ns
    victim = store.shard_paths("train")[1]
    if damage == "flip-byte":
        with victim.open("r+b") as handle:
            handle.seek(victim.stat().st_size // 2)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0x01]))
    elif damage == "truncate":
        os.truncate(victim, victim.stat().st_size - 100)
    else:
        victim.with_suffix(".sha256").unlink()
    assert store.verify() == [victim]

    calls = counting_loader(monkeypatch)
    result = preload(spec, method, tmp_path)
    assert not result.reused and result.shards_written == 1 and result.images_processed == 4
    assert calls == [spec.splits["train"][i].path for i in written_order(ROWS["train"], 0, "train")[4:8]]
    name = str(victim.relative_to(store.root))
    assert {k: v for k, v in mtimes(store).items() if k != name} == {k: v for k, v in before.items() if k != name}
    assert checksums(store) == original  # rebuilt to the same bytes
    assert store.meta_path.stat().st_mtime_ns != meta_before and store.verify() == []


# -- cache key ------------------------------------------------------------------------------------------


def test_store_key_changes_with_every_part_and_nothing_else(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "syn", seed=3, image_size=32, n_train=6, n_val=3, n_test=3)
    spec = load_spec(root)

    def key(method: Method, dtype: str = "float16", data: DatasetSpec = spec) -> str:
        return store_key(store_key_parts(data, method, dtype))

    fpt = {"keep_ratio": 0.2, "preload_keep_ratio": 0.5}
    base = key(tiny_method(spec, "fpt_plus", **fpt))
    same = {
        "dataset read again": key(tiny_method(spec, "fpt_plus", **fpt), data=load_spec(root)),
        "trial keep_ratio": key(tiny_method(spec, "fpt_plus", **{**fpt, "keep_ratio": 0.4})),
        "side network width": key(tiny_method(spec, "fpt_plus", **fpt, side_reduction=2)),
        "learning rate": key(tiny_method(spec, "fpt_plus", **fpt, lr=0.5)),
    }
    assert all(value == base for value in same.values()), same

    os.utime(spec.splits["train"][0].path, ns=(0, 10**18))  # the same file, rewritten later
    changed = {
        "dataset manifest": key(tiny_method(spec, "fpt_plus", **fpt), data=load_spec(root)),
        "backbone": key(tiny_method(spec, "fpt_plus", **{**fpt, "backbone": "vit-small-demo"})),
        "backbone resolution": key(tiny_method(spec, "fpt_plus", **{**fpt, "image_size": 64})),
        "frozen path": key(tiny_method(spec, "fpt_plus", **{**fpt, "preload_keep_ratio": 1.0})),
        "stored image size": key(tiny_method(spec, "fpt_plus", **fpt, side_image_size=16)),
        "feature dtype": key(tiny_method(spec, "fpt_plus", **fpt), "float32"),
        "method": key(tiny_method(spec, "fpt")),
    }
    assert base not in changed.values(), changed
    assert len(set(changed.values())) == len(changed), changed


# -- float16 storage ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "values"), [("linear", {}), ("fpt_plus", {"side_reduction": 2})])
def test_float16_store_trains_like_float32(tmp_path: Path, name: str, values: dict[str, Any]) -> None:
    """The same seeded run on fp16 and fp32 features: val AUC within 0.02; fp16 features take half the bytes."""
    root = make_synthetic(tmp_path / "syn", seed=1, image_size=32, n_train=60, n_val=30, n_test=3)
    spec = load_spec(root)
    config = {
        "method": name,
        **TINY,
        **values,
        "num_classes": spec.num_classes,
        "task": spec.task,
        "epochs": 3,
        "batch_size": 16,
        "seed": 0,
    }
    runs = {}
    for dtype in ("float16", "float32"):
        store = preload(spec, build_method(name, config), tmp_path / "cache", feature_dtype=dtype).store
        io = StoreIO(store)
        fit(config, io, tmp_path / dtype)
        features = sum(c.nbytes for c in store.columns if c.dtype == dtype)
        auc = [report["val_auc"] for report in io.reports]
        runs[dtype] = {"auc": auc, "bytes": store.bytes_per_image(), "features": features}
    print(json.dumps({name: runs}))
    assert runs["float16"]["features"] * 2 == runs["float32"]["features"]
    assert runs["float32"]["bytes"] - runs["float16"]["bytes"] == runs["float16"]["features"]
    np.testing.assert_allclose(runs["float16"]["auc"], runs["float32"]["auc"], atol=0.02)


# -- shard size -----------------------------------------------------------------------------------------


def test_small_shard_target_splits_the_store_and_reads_back_in_order(dataset_root: Path, tmp_path: Path) -> None:
    spec = load_spec(dataset_root)
    method = tiny_method(spec, "fpt_plus", side_reduction=2)
    target = rows_target(method, 3)
    small = preload(spec, method, tmp_path / "small", shard_target_bytes=target).store
    whole = preload(spec, method, tmp_path / "whole").store
    assert whole.size_bytes() < SHARD_TARGET_BYTES  # one shard per split by default here
    for split, n in ROWS.items():
        paths = small.shard_paths(split)
        assert len(paths) == math.ceil(n / 3) and len(whole.shard_paths(split)) == 1
        per_shard = [len(b["index"]) for b in iter_parquet_batches(paths, batch_size=1000)]
        assert per_shard == [min(3, n - 3 * i) for i in range(len(paths))]
        assert max(per_shard) * small.bytes_per_image() <= target
        got, want = (list(_rows(s.shard_paths(split))) for s in (small, whole))
        assert [row["index"] for row in got] == written_order(n, 0, split).tolist()  # in the written order across shards
        assert got == want


def _rows(paths: list[Path]) -> Iterator[dict[str, Any]]:
    for batch in iter_parquet_batches(paths, batch_size=2):
        for i in range(len(batch["index"])):
            yield {key: _plain(value[i]) for key, value in batch.items()}


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


# -- unreadable images ----------------------------------------------------------------------------------


def test_skip_bad_images_leaves_them_out_and_reports_them(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "syn", seed=3, image_size=32, n_train=8, n_val=4, n_test=3)
    spec = load_spec(root)
    bad = spec.splits["train"][5].path
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    method = tiny_method(spec)
    with pytest.raises(DatasetError, match="--skip-bad-images"):
        preload(spec, method, tmp_path / "cache")

    target = rows_target(method, 4)
    result = preload(spec, method, tmp_path / "cache", skip_bad_images=True, shard_target_bytes=target)
    store = result.store
    assert result.skipped_images == 1 and store.meta["skipped"] == {"train": [str(bad)], "val": [], "test": []}
    assert store.num_rows("train") == 7 and store.verify() == []
    indices = [int(i) for b in iter_parquet_batches(store.shard_paths("train"), 100) for i in b["index"]]
    assert indices == [i for i in written_order(8, 0, "train") if i != 5]
    labels = [int(x) for b in iter_parquet_batches(store.shard_paths("train"), 100) for x in b["label"]]
    assert labels == [spec.splits["train"][i].label for i in indices]
    assert sorted(int(i) for b in StoreIO(store).batches("train", 3, 0, shuffle=True) for i in b["index"]) == sorted(indices)
    assert preload(spec, method, tmp_path / "cache", skip_bad_images=True).skipped_images == 1  # reported on reuse

    for sample in spec.splits["val"]:
        sample.path.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="no image of the val split"):
        preload(load_spec(root), method, tmp_path / "cache", skip_bad_images=True)


@pytest.mark.parametrize(("rows", "dtype"), [(5, np.float16), (1, np.uint8), (0, np.float16)])
def test_a_shards_binary_rows_are_each_rows_bytes(rows, dtype):
    """The writer's binary column over the array's own memory is the array of each row's bytes (so the
    shard file, and its checksum, are what they were when every row was copied to Python bytes first)."""
    values = (np.random.default_rng(0).standard_normal((rows, 3, 4)) * 50).astype(dtype)
    built = _binary_rows(values)
    assert built.equals(pa.array([row.tobytes() for row in values], type=pa.binary()))
    assert [np.frombuffer(value.as_py(), dtype=dtype).reshape(3, 4).tolist() for value in built] == values.tolist()
