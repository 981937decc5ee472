"""A preload store through Ray: materialize vs stream, trials holding every CPU, DDP workers across nodes.

The multi-node test runs in a child process (this file run as a script):
``ray.cluster_utils.Cluster`` starts its own head, and a driver can be
connected to one Ray at a time, while the session fixture keeps its local Ray
connected for the whole test session. A child process needs no ordering
between tests, leaves the session Ray untouched and, if it hangs, is killed by
its timeout with the cluster's processes (its own session) instead of
wedging the test run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from medsweep.datasets.store import ColumnSpec, PreloadStore, StoreWriter
from medsweep.search.data import StoreData, share_stores, store_data
from medsweep.search.trial import _RayIO
from medsweep.trainables.preload import PreloadResult

from processes import local_cluster, run_child

COLUMNS = [ColumnSpec("image", (3, 4, 4), "uint8"), ColumnSpec("feat", (6,), "float16")]
EPOCHS = 2
NODE_OBJECT_STORE = 150 * 2**20

# Ray workers cannot import this file by name (pytest puts tests/ on the driver's path only):
# ship its functions and classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def tiny_store(root: Path, rows: dict[str, int], rows_per_shard: int, task: str = "multiclass") -> PreloadResult:
    """A store written with StoreWriter directly (no backbone): features are a function of the row index."""
    writer = StoreWriter(root, COLUMNS, task, {"test": root.name})
    shards = {}
    for split, n in rows.items():
        shards[split] = math.ceil(n / rows_per_shard)
        for shard in range(shards[split]):
            index = np.arange(shard * rows_per_shard, min(n, (shard + 1) * rows_per_shard))
            labels = index % 3 if task == "multiclass" else np.stack([index % 2, index % 3 == 0], 1).astype(np.float32)
            tensors = {
                "image": np.broadcast_to((index % 256).astype(np.uint8)[:, None, None, None], (len(index), 3, 4, 4)),
                "feat": np.outer(index, np.ones(6)) / 7.0,
            }
            writer.write_shard(split, shard, index, labels, tensors)
    return PreloadResult(writer.finish(rows, shards, {}), False, 0.0, sum(rows.values()))


def iter_indices(io: Any, split: str, epoch: int, batch_size: int = 8) -> list[int]:
    """Every ``index`` one pass yields, read as a trial reads it (train shuffled, val in store order)."""
    return [int(i) for batch in io.batches(split, batch_size, epoch, shuffle=split != "val") for i in batch["index"]]


# -- single node ------------------------------------------------------------------------------------


def test_small_store_is_materialized_once_and_later_stores_count_what_is_pinned(ray_session, tmp_path: Path) -> None:
    first = tiny_store(tmp_path / "a", {"train": 40, "val": 20}, rows_per_shard=16)
    second = tiny_store(tmp_path / "b", {"train": 40, "val": 20}, rows_per_shard=16)
    data, why = store_data(first)
    assert "materialized" in why, why
    assert data.materialized and {split: len(blocks) for split, blocks in data.blocks.items()} == {"train": 3, "val": 2}
    assert sorted(iter_indices(_RayIO(data, distributed=False, seed=0), "train", 0)) == list(range(40))
    assert data.shard_rows == {"train": [16, 16, 8], "val": [16, 4]} and data.columns == COLUMNS
    # Label counts, counted once by the driver, reach the trial without a pass over the data (labels: index % 3).
    assert _RayIO(data, distributed=False, seed=0).label_counts("train") == [14, 13, 13] == first.store.label_counts("train")

    # Room for one store but not two: the second streams, the duplicate is shared, not read again.
    size = first.store.size_bytes(("train", "val"))
    capacity = ray_session.available_resources()["object_store_memory"]
    shared = share_stores([first, first, second], fraction=1.5 * size / capacity)
    assert list(shared) == [first.store.key, second.store.key]
    assert "materialized" in shared[first.store.key][1]
    assert "streams" in shared[second.store.key][1] and "already pinned" in shared[second.store.key][1]
    assert not shared[second.store.key][0].materialized


def test_streamed_store_feeds_every_row_each_epoch_while_trials_hold_every_cpu(ray_session, tmp_path: Path) -> None:
    """Two trials (1 CPU each: every CPU of the 2-CPU session) run the Train local-mode loop over a streamed store.

    This is the DESIGN.md deadlock set-up: with ``read_parquet`` the read
    waits forever for a CPU; the store's zero-CPU shard reads must finish.
    Multi-label, so the labels must come out as ``[n, C]`` arrays torch takes.
    """
    result = tiny_store(tmp_path / "s", {"train": 60, "val": 25}, rows_per_shard=16, task="multilabel")
    data, why = store_data(result, fraction=0.0)
    assert "streams" in why, why
    assert not data.materialized

    trials = [_Trial.options(num_cpus=1).remote() for _ in range(2)]
    try:
        ray_session.get([trial.__ray_ready__.remote() for trial in trials], timeout=60)
        assert free_cpus_reach_zero(ray_session, within_s=10)
        runs = [trial.run.remote(data, str(tmp_path / f"train-{i}")) for i, trial in enumerate(trials)]
        outputs = ray_session.get(runs, timeout=120)
    finally:
        for trial in trials:
            ray_session.kill(trial)
    for epochs in outputs:
        assert len(epochs) == EPOCHS
        for epoch in epochs:
            assert sorted(epoch["train"]) == list(range(60))
            assert sorted(epoch["val"]) == list(range(25))
            assert epoch["label_shape"] == [8, 2] and epoch["label_dtype"] == "float32"


def free_cpus_reach_zero(ray_module: Any, within_s: float) -> bool:
    """Whether the trials' CPUs show as taken (the cluster's resource view lags actor start a little)."""
    deadline = time.monotonic() + within_s
    while ray_module.available_resources().get("CPU", 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    return ray_module.available_resources().get("CPU", 0) == 0


def _local_mode_loop(config: dict[str, Any]) -> None:
    """What a single-device trial's loop does with its data: the trial's IO, each epoch."""
    import torch

    io = _RayIO(config["data"], distributed=False, seed=0)
    epochs = []
    for epoch in range(EPOCHS):
        labels = next(iter(io.batches("train", 8, epoch, shuffle=True)))["label"]
        epochs.append(
            {
                "train": iter_indices(io, "train", epoch),
                "val": iter_indices(io, "val", epoch),
                "label_shape": list(torch.tensor(labels).shape),
                "label_dtype": str(labels.dtype),
            }
        )
    Path(config["out"]).write_text(json.dumps(epochs))


@ray.remote
class _Trial:
    """Stands for a Tune trial: holds its CPU and runs a Ray Train local-mode TorchTrainer as trial.py does."""

    def run(self, data: StoreData, storage: str) -> list[dict[str, Any]]:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        out = Path(storage) / "seen.json"
        out.parent.mkdir(parents=True)
        TorchTrainer(
            _local_mode_loop,
            train_loop_config={"out": str(out), "data": data},
            scaling_config=ScalingConfig(num_workers=0),
            run_config=RunConfig(name="local", storage_path=storage),
        ).fit()
        return json.loads(out.read_text())


# -- several nodes (child process) --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_shards_across_nodes(tmp_path: Path) -> None:
    """Head + 2 worker nodes (1 CPU each). (a) A 2-worker TorchTrainer reading through the trial's IO, as
    trial.py runs DDP trials: the workers, on different nodes, take disjoint strides of the epoch's order
    covering every row in each of 2 epochs, interleaving to exactly the single-worker order, for the
    materialized and for the streamed store, and each sees all of val. (b) Tasks pinned to the two worker
    nodes read the materialized train split after its Parquet files were moved away: the same rows and
    label sum on both, so they read the shared blocks, not files.
    """
    store = tiny_store(tmp_path / "store", {"train": 120, "val": 30}, rows_per_shard=16).store
    out = tmp_path / "cluster.json"
    report = run_child(__file__, str(store.root), str(out), out=out, timeout=240)
    print(json.dumps(report["seconds"]))  # shown with -s: cluster start, DDP fit, pinned reads

    assert "materialized" in report["why"], report["why"]
    ranks = report["ranks"]
    assert len(ranks) == 2 and ranks[0]["node"] != ranks[1]["node"]
    single = report["single"]
    for name in ("train", "stream"):
        for epoch in range(EPOCHS):
            parts = [set(rank[name][epoch]) for rank in ranks]
            assert all(len(part) == len(rank[name][epoch]) == 60 for part, rank in zip(parts, ranks, strict=True))  # no row twice
            assert not parts[0] & parts[1], f"{name} epoch {epoch}: workers share rows"
            assert parts[0] | parts[1] == set(range(120)), f"{name} epoch {epoch}: rows missing"
            interleaved = [row for pair in zip(ranks[0][name][epoch], ranks[1][name][epoch], strict=True) for row in pair]
            assert interleaved == single[epoch], f"{name} epoch {epoch}: not the single-worker order"
        assert ranks[0][name][0] != ranks[0][name][1]  # a fresh order each epoch
    assert all(rank["val"][epoch] == list(range(30)) for rank in ranks for epoch in range(EPOCHS))

    readers = report["readers"]
    assert len({reader["node"] for reader in readers}) == 2
    assert {reader["node"] for reader in readers} == set(report["worker_nodes"])
    features = (np.arange(120)[:, None] * np.ones(6) / 7.0).astype(np.float16).sum(dtype=np.float64)
    for reader in readers:
        assert reader["indices"] == list(range(120))
        assert reader["label_sum"] == sum(i % 3 for i in range(120))
        assert reader["feature_sum"] == pytest.approx(float(features), rel=1e-12)


def _ddp_loop(config: dict[str, Any]) -> None:
    """Each DDP worker records the rows it reads of each store, per epoch, through the trial's IO."""
    import ray.train

    context = ray.train.get_context()
    seen: dict[str, Any] = {"node": ray.get_runtime_context().get_node_id()}
    materialized = _RayIO(config["data"], distributed=True, seed=7)
    streamed = _RayIO(config["streamed"], distributed=True, seed=7)
    seen["train"] = [iter_indices(materialized, "train", epoch) for epoch in range(EPOCHS)]
    seen["stream"] = [iter_indices(streamed, "train", epoch) for epoch in range(EPOCHS)]
    seen["val"] = [iter_indices(materialized, "val", epoch) for epoch in range(EPOCHS)]
    Path(config["out"], f"rank-{context.get_world_rank()}.json").write_text(json.dumps(seen))


def _read_on_node(data: StoreData) -> dict[str, Any]:
    indices: list[int] = []
    label_sum = 0
    feature_sum = 0.0
    for batch in _RayIO(data, distributed=False, seed=0).batches("train", 16, 0, shuffle=False):
        indices += batch["index"].tolist()
        label_sum += int(batch["label"].sum())
        feature_sum += float(sum(np.frombuffer(raw, dtype=np.float16).sum(dtype=np.float64) for raw in batch["feat"]))
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "indices": sorted(indices),
        "label_sum": label_sum,
        "feature_sum": feature_sum,
    }


def _cluster_main(store_root: Path, out: Path) -> None:
    """The child process: start a 3-node cluster, run (a) and (b), write what was seen to ``out``."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    with local_cluster(1, [1, 1], NODE_OBJECT_STORE) as (_, workers):
        seconds["cluster_up"] = time.perf_counter() - started
        result = PreloadResult(PreloadStore(store_root), True, 0.0, 0)
        data, why = store_data(result)
        streamed, _ = store_data(result, fraction=0.0)
        scratch = out.parent / "ddp"
        scratch.mkdir()
        TorchTrainer(
            _ddp_loop,
            train_loop_config={"out": str(scratch), "data": data, "streamed": streamed},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="ddp", storage_path=str(out.parent / "ray")),
        ).fit()
        ranks = [json.loads((scratch / f"rank-{rank}.json").read_text()) for rank in range(2)]
        single = [iter_indices(_RayIO(data, distributed=False, seed=7), "train", epoch) for epoch in range(EPOCHS)]
        seconds["ddp_fit"] = time.perf_counter() - started - sum(seconds.values())

        store_root.rename(store_root.with_name("moved-away"))  # (b) must read blocks, not files
        read = ray.remote(num_cpus=1)(_read_on_node)
        worker_nodes = [node.node_id for node in workers]
        on_node = [read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)) for n in worker_nodes]
        readers = ray.get([task.remote(data) for task in on_node], timeout=120)
        seconds["node_reads"] = time.perf_counter() - started - sum(seconds.values())
        report = {
            "why": why,
            "ranks": ranks,
            "single": single,
            "readers": readers,
            "worker_nodes": worker_nodes,
            "seconds": seconds,
        }
        out.write_text(json.dumps(report))


if __name__ == "__main__":
    _cluster_main(Path(sys.argv[1]), Path(sys.argv[2]))
