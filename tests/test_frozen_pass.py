"""The frozen pass as a Ray Data pipeline (issue 17): same store as one process, never in the driver, on worker nodes.

The multi-node test runs in a child process (this file run as a script), as
in ``test_ray_data.py``: ``ray.cluster_utils.Cluster`` starts its own head,
whose Ray offers no CPU, as the head of ``cluster.yaml`` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import medsweep.datasets.shards as shards_module
from medsweep.datasets import load_imagefolder, make_synthetic
from medsweep.datasets.store import PreloadStore
from medsweep.errors import DatasetError
from medsweep.search.console import SweepConsole
from medsweep.search.frozen_pass import preload_on_cluster
from medsweep.trainables.memory import batch_within, frozen_batch_size
from medsweep.trainables.methods import build_method
from medsweep.trainables.preload import preload, store_columns

from processes import kill_process_group, local_cluster, run_child

CONFIG = {"method": "fpt_plus", "backbone": "vit-tiny", "image_size": 32, "side_reduction": 2}
ROWS_PER_SHARD = 5


def config_for(spec) -> dict:
    return {**CONFIG, "num_classes": spec.num_classes, "task": spec.task}


def shard_target(spec) -> int:
    method = build_method("fpt_plus", config_for(spec))
    return ROWS_PER_SHARD * sum(c.nbytes for c in store_columns(method, "float16"))


def checksums(store: PreloadStore) -> dict[str, str]:
    return {str(p.relative_to(store.root)): p.read_text() for p in store.root.rglob("*.sha256")}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn"), seed=5, image_size=32, n_train=20, n_val=10, n_test=5)


@pytest.fixture(scope="module")
def single_process(root, tmp_path_factory) -> PreloadStore:
    """The store one process builds: every pipeline-built store must equal it byte for byte.

    Built with the frozen-pass actor's thread count (all the node's cores): fp32 sums depend on
    how many threads split them, and an fp16 feature can round either way (the legacy position
    embeddings of FPT/FPT+ made one value of this data do so at 1 thread against 2).
    """
    spec = load_imagefolder(root, name="syn")
    method = build_method("fpt_plus", config_for(spec))
    previous = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        return preload(spec, method, tmp_path_factory.mktemp("single"), shard_target_bytes=shard_target(spec)).store
    finally:
        torch.set_num_threads(previous)


def test_the_pipeline_writes_the_single_process_store_without_decoding_in_the_driver(
    ray_session, root, single_process, tmp_path, monkeypatch
) -> None:
    spec = load_imagefolder(root, name="syn")

    def not_here(path):
        raise AssertionError(f"the driver decoded {path}")

    monkeypatch.setattr(shards_module, "load_image", not_here)  # the driver's copy; tasks import their own
    seen: list[int] = []
    result = preload_on_cluster(
        spec, config_for(spec), tmp_path, shard_target_bytes=shard_target(spec), progress=lambda d, n: seen.append
    )
    store = result.store
    assert not result.reused and result.shards_written == 4 + 2 + 1 and result.images_processed == 35
    assert store.key == single_process.key and checksums(store) == checksums(single_process)
    nodes = store.meta["frozen_pass"]
    assert sum(node["images"] for node in nodes.values()) == 35
    assert {node["device"] for node in nodes.values()} == {"cpu"}
    assert {node["batch_size"] for node in nodes.values()} == {ROWS_PER_SHARD}  # CPU batch 16, cut to a shard's rows
    ray_nodes = {node["NodeID"]: node["NodeManagerAddress"] for node in ray_session.nodes()}
    assert set(nodes) <= set(ray_nodes) and all(done["ip"] == ray_nodes[node] for node, done in nodes.items())
    console = SweepConsole(record=True)
    console.store_ready("fpt_plus", result)  # where it ran, as a user knows the node: its address and short id
    assert all(f"frozen pass on {ray_nodes[node]} (node {node[:8]}): " in console.text() for node in nodes)
    again = preload_on_cluster(spec, config_for(spec), tmp_path)
    assert again.reused and again.images_processed == 0
    for _ in range(3):  # as final retrains three candidates of one method: one line says the store is reused
        console.store_ready("fpt_plus", again)
    assert console.text().count(f"store {store.key} reused") == 1


@pytest.mark.parametrize(
    ("budget", "per_image", "cap", "expected"),
    [(1000, 10, 256, 64), (1000, 10, 32, 32), (5, 10, 256, 1), (-1, 10, 256, 1), (640, 10, 256, 64), (639, 10, 256, 32)],
)
def test_the_probed_frozen_batch_is_the_largest_power_of_two_that_fits(budget, per_image, cap, expected) -> None:
    assert batch_within(budget, per_image, cap) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_probed_frozen_batch_runs_within_the_gpus_free_memory() -> None:
    method = build_method("fpt_plus", {**CONFIG, "image_size": 224, "num_classes": 3, "task": "multiclass"}).eval()
    method.to_device(torch.device("cuda"))
    batch = frozen_batch_size(method, 224, torch.bfloat16)
    free, _ = torch.cuda.mem_get_info()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        method.frozen_features(torch.zeros(batch, 3, 224, 224, device="cuda"))
    assert 1 <= batch <= 256 and torch.cuda.max_memory_allocated() - before <= free


def test_a_bad_image_stops_the_pipeline_with_one_line_or_is_skipped(ray_session, tmp_path) -> None:
    root = make_synthetic(tmp_path / "syn", seed=5, image_size=32, n_train=6, n_val=3, n_test=3)
    spec = load_imagefolder(root, name="syn")
    bad = spec.splits["train"][2].path
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="--skip-bad-images") as error:
        preload_on_cluster(spec, config_for(spec), tmp_path / "cache")
    assert "\n" not in str(error.value) and str(bad) in str(error.value)
    result = preload_on_cluster(spec, config_for(spec), tmp_path / "cache", skip_bad_images=True)
    assert result.skipped_images == 1 and result.store.meta["skipped"]["train"] == [str(bad)]


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """60 images, one per shard: a pass long enough (tens of tasks) to be hit mid-way, and its clean build."""
    root = make_synthetic(tmp_path_factory.mktemp("many"), seed=6, image_size=32, n_train=48, n_val=6, n_test=6)
    spec = load_imagefolder(root, name="many")
    target = shard_target(spec) // ROWS_PER_SHARD
    clean = preload(spec, build_method("fpt_plus", config_for(spec)), tmp_path_factory.mktemp("clean"), shard_target_bytes=target).store
    return root, target, clean


def _shards_done(cache: Path) -> int:
    return len(list(cache.glob("stores/*/*/*.sha256")))


def test_a_preload_actor_killed_mid_pass_is_replaced_and_the_store_completes(ray_session, many_shards, tmp_path) -> None:
    """SIGKILL the frozen-forward actor once a few shards are written: Ray Data restarts it, its shard is
    recomputed, and the store equals the clean build."""
    import threading

    import psutil

    root, target, clean = many_shards
    spec = load_imagefolder(root, name="many")
    outcome: dict = {}

    def build() -> None:
        try:
            outcome["result"] = preload_on_cluster(spec, config_for(spec), tmp_path, shard_target_bytes=target)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = error

    thread = threading.Thread(target=build)
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        actors = [p for p in psutil.process_iter(["cmdline"]) if "_FrozenWriter" in " ".join(p.info["cmdline"] or [])]
        if actors and 3 <= _shards_done(tmp_path) < 40:
            killed = actors[0].pid
            actors[0].kill()
        time.sleep(0.02)
    thread.join(timeout=300)
    assert killed is not None, "the pass ended before an actor could be killed"
    assert "error" not in outcome, outcome.get("error")
    store = outcome["result"].store
    assert store.verify() == [] and store.num_rows("train") == clean.num_rows("train")
    assert_same_tensors(store, clean)


def assert_same_tensors(store: PreloadStore, clean: PreloadStore) -> None:
    """Every shard holds the clean build's rows, images equal and features within one float16 step.

    A shard recomputed by a restarted actor may come out of a CPU matmul whose
    reduction order followed another thread count, which can move a feature by
    one float16 unit in the last place: the same tensors, not always the same bytes.
    """
    import numpy as np
    import pyarrow.parquet as pq

    from medsweep.datasets.store import decode_columns, table_to_numpy

    for split in ("train", "val", "test"):
        for mine, reference in zip(store.shard_paths(split), clean.shard_paths(split), strict=True):
            got, want = table_to_numpy(pq.read_table(mine)), table_to_numpy(pq.read_table(reference))
            assert got["index"].tolist() == want["index"].tolist() and got["label"].tolist() == want["label"].tolist()
            got, want = decode_columns(got, store.columns), decode_columns(want, clean.columns)
            for column in store.columns:
                if column.dtype == "uint8":
                    np.testing.assert_array_equal(got[column.name], want[column.name])
                else:
                    a, b = got[column.name].astype(np.float32), want[column.name].astype(np.float32)
                    np.testing.assert_allclose(a, b, rtol=2**-10, atol=2**-24)


def test_a_killed_preload_command_resumes_to_the_clean_store(ray_session, many_shards, tmp_path, capsys) -> None:
    """SIGKILL a ``medsweep preload`` process (and its local Ray) mid-pass; the same command, run again (in
    this process, on the session's Ray: a second process would cost ~15 s of start-up), writes the missing
    shards and the store equals the clean build."""
    from medsweep.cli import main

    root, _target, clean = many_shards
    rows_cli = ["--method", "fpt_plus", "--backbone", "vit-tiny", "--image-size", "32", "--set", "side_reduction=2"]
    command = ["preload", "--dataset", str(root), *rows_cli, "--cache-dir", str(tmp_path)]
    argv = [sys.executable, "-m", "medsweep.cli", *command]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # The CLI has no shard-size flag: a store started with small shards keeps them (layout.json), so the
    # first run is seeded with the clean build's layout.
    key = clean.root.name
    (tmp_path / "stores" / key).mkdir(parents=True)
    (tmp_path / "stores" / key / "layout.json").write_text((clean.root / "layout.json").read_text())
    driver = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while _shards_done(tmp_path) < 5 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert driver.poll() is None, "the preload ended before it could be killed"
    kill_process_group(driver)
    done = _shards_done(tmp_path)
    store = PreloadStore(tmp_path / "stores" / key)
    assert not store.is_complete() and 5 <= done < 60

    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "written in" in printed, printed
    assert store.verify() == [] and store.meta["rows_per_shard"] == 1
    assert_same_tensors(store, clean)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_a_head_without_cpus_leaves_the_frozen_pass_to_the_worker_nodes(root, single_process, tmp_path) -> None:
    """Head (0 CPUs) + 2 worker nodes (2 CPUs each): the store equals the single-process one, and
    ``store.json`` records the worker nodes, never the head, as where the frozen pass ran."""
    out = tmp_path / "cluster.json"
    report = run_child(__file__, str(root), str(tmp_path / "cache"), str(out), out=out, timeout=360)
    store = PreloadStore(Path(report["store"]))
    assert checksums(store) == checksums(single_process)
    ran = set(store.meta["frozen_pass"])
    assert ran and ran <= set(report["workers"]) and report["head"] not in ran


def _cluster_main(root: Path, cache: Path, out: Path) -> None:
    """The child process: a head without CPUs and two worker nodes build the store."""
    with local_cluster(0, [2, 2], 150 * 2**20) as (cluster, workers):
        spec = load_imagefolder(root, name="syn")
        result = preload_on_cluster(spec, config_for(spec), cache, shard_target_bytes=shard_target(spec))
        report = {
            "store": str(result.store.root),
            "head": cluster.head_node.node_id,
            "workers": [node.node_id for node in workers],
        }
        out.write_text(json.dumps(report))


if __name__ == "__main__":
    _cluster_main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))


def test_bf16_frozen_features_on_cpu_agree_with_fp32(root, single_process, tmp_path) -> None:
    """The linear probe's pooled features under bf16 autocast: another cache key, within 3% of their scale.

    bf16 keeps 8 bits of mantissa (~0.4% per rounding); two ViT layers of
    rounded matmuls and softmaxes stay within a few percent of the fp32 pass.
    (FPT's stored keys and values are not compared element-wise: bf16 may
    reorder near-tied token importances and so keep other tokens, one more
    reason the precision is part of the cache key.)
    """
    import numpy as np
    import pyarrow.parquet as pq

    from medsweep.datasets.store import decode_columns, table_to_numpy

    spec = load_imagefolder(root, name="syn")
    linear = {key: value for key, value in config_for(spec).items() if key != "side_reduction"}
    method = build_method("linear", {**linear, "method": "linear"})
    fp32 = preload(spec, method, tmp_path / "fp32").store
    bf16 = preload(spec, method, tmp_path / "bf16", precision="bf16").store
    assert bf16.key != fp32.key and bf16.meta["key_parts"]["frozen_precision"] == "bf16"
    assert single_process.meta["key_parts"]["frozen_precision"] == "fp32"  # auto on a CPU
    features = [c for c in bf16.columns if c.dtype != "uint8"]
    for mine, reference in zip(bf16.shard_paths("train"), fp32.shard_paths("train"), strict=True):
        got = decode_columns(table_to_numpy(pq.read_table(mine)), features)
        want = decode_columns(table_to_numpy(pq.read_table(reference)), features)
        for column in features:
            scale = np.abs(want[column.name].astype(np.float32)).max()
            error = np.abs(got[column.name].astype(np.float32) - want[column.name].astype(np.float32)).max()
            assert error <= 0.03 * scale, (column.name, error, scale)


def test_an_unknown_precision_is_one_line(root, tmp_path) -> None:
    from medsweep.errors import ConfigError

    spec = load_imagefolder(root, name="syn")
    with pytest.raises(ConfigError, match="--precision must be auto, fp32, bf16, fp16; got 'fp8'"):
        preload(spec, build_method("fpt_plus", config_for(spec)), tmp_path, precision="fp8")
