"""Rows reach training in a random order, whichever runner reads them (issue 16).

An ImageFolder lists its images class by class. A real store has many small
shards (6-12 rows per 64 MB shard at 384-512 px), and a stream that follows
the shards' order would hand a trial class-sorted batches. These tests build
real stores from a class-sorted dataset with a handful of rows per shard and
read them as every runner does: the plain pyarrow reader of ``medsweep train``
and ``final``, and a sweep trial's reader over pinned Ray blocks and over a Ray
Data stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from medsweep.datasets import load_imagefolder, make_synthetic
from medsweep.datasets.order import EpochOrder, epoch_order, ordered_batches, written_order
from medsweep.datasets.spec import DatasetSpec
from medsweep.trainables.loop import fit
from medsweep.trainables.methods import build_method
from medsweep.trainables.preload import preload, store_columns
from medsweep.trainables.store_io import StoreIO

ROWS_PER_SHARD = 6
BATCH = 8
TINY_LINEAR = {"method": "linear", "backbone": "vit-tiny", "image_size": 32}


@pytest.fixture(scope="module")
def sorted_spec(tmp_path_factory) -> DatasetSpec:
    """A 3-class ImageFolder (listed class by class, as every ImageFolder is): 90 train, 45 val."""
    root = make_synthetic(tmp_path_factory.mktemp("sorted"), seed=1, image_size=32, n_train=90, n_val=45, n_test=15)
    spec = load_imagefolder(root, name="sorted")
    labels = [sample.label for sample in spec.splits["train"]]
    assert labels == sorted(labels)  # the premise: the dataset itself is class-sorted
    return spec


def linear(spec: DatasetSpec):
    return build_method("linear", {**TINY_LINEAR, "num_classes": spec.num_classes, "task": spec.task})


@pytest.fixture(scope="module")
def many_shards(sorted_spec: DatasetSpec, tmp_path_factory):
    """The store with :data:`ROWS_PER_SHARD` rows per shard (15 train shards)."""
    method = linear(sorted_spec)
    row_bytes = sum(c.nbytes for c in store_columns(method, "float16"))
    return preload(sorted_spec, method, tmp_path_factory.mktemp("many"), shard_target_bytes=ROWS_PER_SHARD * row_bytes).store


@pytest.fixture(scope="module")
def one_shard(sorted_spec: DatasetSpec, tmp_path_factory):
    return preload(sorted_spec, linear(sorted_spec), tmp_path_factory.mktemp("one")).store


# -- the written order ------------------------------------------------------------------------------------


def test_every_shard_of_a_class_sorted_dataset_is_a_random_sample(sorted_spec, many_shards) -> None:
    shards = many_shards.shard_paths("train")
    assert len(shards) == 15 and many_shards.shard_rows("train") == [ROWS_PER_SHARD] * 15
    labels_per_shard = [_column(path, "label") for path in shards]
    assert all(len(set(labels)) >= 2 for labels in labels_per_shard), labels_per_shard
    # The stored row -> sample permutation traces every row back to its image.
    indices = np.concatenate([_column(path, "index") for path in shards])
    assert sorted(indices) == list(range(90)) and indices.tolist() == written_order(90, 0, "train").tolist()
    assert np.concatenate(labels_per_shard).tolist() == [sorted_spec.splits["train"][i].label for i in indices]


def test_the_written_order_is_part_of_the_cache_key(sorted_spec, many_shards, tmp_path: Path) -> None:
    other = preload(sorted_spec, linear(sorted_spec), tmp_path, order_seed=1).store
    assert other.key != many_shards.key
    assert other.meta["row_order_seed"] == 1 and many_shards.meta["row_order_seed"] == 0
    assert many_shards.meta["format"] == 2  # format 1 stores (class-sorted) are never read again


# -- the epoch order ---------------------------------------------------------------------------------------


def test_epoch_order_is_a_function_of_seed_and_epoch_only() -> None:
    rows = [6] * 15
    order = epoch_order(rows, 64, seed=3, epoch=2, shuffle=True)
    assert order == epoch_order(rows, 64, seed=3, epoch=2, shuffle=True)
    assert order.shards != epoch_order(rows, 64, seed=3, epoch=3, shuffle=True).shards
    assert order.shards != epoch_order(rows, 64, seed=4, epoch=2, shuffle=True).shards
    assert sorted(order.shards) == list(range(15)) and order.rows == 90
    assert epoch_order(rows, 64, seed=3, epoch=2, shuffle=False) == EpochOrder.fixed(rows)


def test_windows_hold_as_many_shards_as_fit_their_bytes() -> None:
    rows = [6] * 15
    assert epoch_order(rows, 100, 0, 0, True, window_bytes=6 * 100 * 4).windows == (24, 24, 24, 18)
    assert epoch_order(rows, 100, 0, 0, True, window_bytes=1).windows == (6,) * 15  # never less than a shard
    assert epoch_order(rows, 100, 0, 0, True, window_bytes=1 << 40).windows == (90,)


def test_the_sequence_does_not_depend_on_how_the_reader_chunks_the_shards() -> None:
    rows = [5, 5, 5, 3]
    tables = [pa.table({"index": np.arange(5 * i, 5 * i + n)}) for i, n in enumerate(rows)]
    order = epoch_order(rows, 1, seed=1, epoch=0, shuffle=True, window_bytes=10)
    by_shard = _indices(ordered_batches((tables[i] for i in order.shards), order, 4))
    in_order = pa.concat_tables([tables[i] for i in order.shards])
    by_row = _indices(ordered_batches((in_order.slice(i, 1) for i in range(in_order.num_rows)), order, 4))
    assert by_shard == by_row and sorted(by_shard) == list(range(18))


def test_ddp_workers_take_equal_disjoint_strides_of_the_one_sequence() -> None:
    rows = [5, 5, 5, 4]
    tables = [pa.table({"index": np.arange(5 * i, 5 * i + n)}) for i, n in enumerate(rows)]
    order = epoch_order(rows, 1, seed=2, epoch=1, shuffle=True, window_bytes=10)
    whole = _indices(ordered_batches((tables[i] for i in order.shards), order, 3))
    parts = [_indices(ordered_batches((tables[i] for i in order.shards), order, 3, rank, 3)) for rank in range(3)]
    assert [len(part) for part in parts] == [19 // 3] * 3
    assert [row for triple in zip(*parts, strict=True) for row in triple] == whole[:18]


# -- every runner, the same mixed order --------------------------------------------------------------------


def test_every_runner_reads_the_same_well_mixed_order(ray_session, sorted_spec, many_shards) -> None:
    """The plain reader and a trial's reader (pinned blocks, Ray Data stream) give one sequence per (seed, epoch).

    Mixing is judged against what a uniform shuffle allows and checked to fail
    on the dataset's own (class-sorted) order: single-class batches of 8 from
    3 balanced classes have probability 3 x 3^-8 ~ 0.05% under a uniform shuffle
    (bound: at most 1 in 10), and each third of an epoch holds 30 rows whose
    class counts are ~Binomial(30, 1/3) (10 +- 2.6; bound: 4 to 17 per class).
    """
    from medsweep.search.data import store_data
    from medsweep.search.trial import _RayIO
    from medsweep.trainables.preload import PreloadResult

    result = PreloadResult(many_shards, True, 0.0, 0)
    pinned, _ = store_data(result)
    streamed, _ = store_data(result, fraction=0.0)
    assert pinned.materialized and not streamed.materialized
    readers = {
        "plain": StoreIO(many_shards, seed=5),
        "pinned": _RayIO(pinned, distributed=False, seed=5),
        "streamed": _RayIO(streamed, distributed=False, seed=5),
    }
    label_of = {i: s.label for i, s in enumerate(sorted_spec.splits["train"])}
    epochs = {name: [_batches(io, epoch) for epoch in range(2)] for name, io in readers.items()}
    assert epochs["plain"] == epochs["pinned"] == epochs["streamed"]
    first, second = epochs["plain"]
    assert first != second  # a fresh order every epoch
    assert _batches(StoreIO(many_shards, seed=6), 0) != first  # and per trial seed
    for batches in (first, second):
        assert sorted(i for batch in batches for i in batch) == list(range(90))
        assert _mixed(batches, label_of), batches

    as_listed = [list(range(start, min(start + BATCH, 90))) for start in range(0, 90, BATCH)]
    assert not _mixed(as_listed, label_of)  # the bound catches a class-sorted stream
    val = [int(i) for batch in readers["pinned"].batches("val", BATCH, 0, shuffle=False) for i in batch["index"]]
    assert val == written_order(45, 0, "val").tolist()  # validation: store order, every epoch


def _mixed(batches: list[list[int]], label_of: dict[int, int]) -> bool:
    labels = [[label_of[i] for i in batch] for batch in batches]
    single = sum(len(set(batch)) == 1 for batch in labels if len(batch) == BATCH)
    stream = [label for batch in labels for label in batch]
    thirds = [stream[k * 30 : (k + 1) * 30] for k in range(3)]
    balanced = all(4 <= third.count(c) <= 17 for third in thirds for c in range(3))
    return single <= len(batches) // 10 and balanced


# -- what training sees ------------------------------------------------------------------------------------


def test_a_class_sorted_many_shard_store_trains_like_a_one_shard_store(sorted_spec, many_shards, one_shard, tmp_path) -> None:
    """Same data, same seed, 4 epochs of a linear probe: best val AUC within 0.05 of each other, both above 0.75.

    (Before rows were written shuffled, the many-shard store's epochs walked
    class 0, then 1, then 2, and its batches were nearly single-class.)
    """
    config = {**TINY_LINEAR, "num_classes": sorted_spec.num_classes, "task": sorted_spec.task, "epochs": 4, "lr": 3e-3, "batch_size": BATCH}
    best = {}
    for name, store in (("many", many_shards), ("one", one_shard)):
        io = StoreIO(store, seed=0)
        fit(config, io, tmp_path / name)
        best[name] = io.reports[-1]["best_val_auc"]
    assert min(best.values()) > 0.75, best
    assert abs(best["many"] - best["one"]) <= 0.05, best


def _batches(io: Any, epoch: int) -> list[list[int]]:
    return [[int(i) for i in batch["index"]] for batch in io.batches("train", BATCH, epoch, shuffle=True)]


def _indices(batches) -> list[int]:
    return [int(i) for batch in batches for i in batch.column("index").to_pylist()]


def _column(path: Path, name: str) -> np.ndarray:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=[name]).column(name).to_numpy()
