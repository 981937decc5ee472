"""The frozen pass on the cluster: a Ray Data batch-inference pipeline that writes a preload store.

At real scale the frozen pass is the heaviest step of a sweep (ViT-B/16 at
512 px: ~215 GFLOP per image). :func:`preload_on_cluster` runs it where the
cluster's compute is, never in the driver:

1. the driver plans the store under its lock (:func:`~medsweep.trainables.preload.plan_store`:
   reuse, repair, the shards still to write), from a method built *without
   weights*, so it never decodes an image nor runs the backbone, even on a
   head node that offers Ray no CPU;
2. a CPU task per shard decodes and resizes its images
   (:func:`~medsweep.search.frozen_decode.decode_task`, torch-free);
3. an actor pool, one frozen backbone per actor (one actor per GPU on GPU
   nodes, else about one per node with CPUs: :func:`frozen_pass_pool`), runs the frozen forward over the shard
   (:func:`~medsweep.trainables.preload.shard_features`) and writes it with its
   checksum, as the in-process preload does; only a few numbers come back;
4. the driver writes ``store.json`` once every shard is there.

One shard is one unit of work, so a shard's rows keep the store's written
order whichever actor computed it, and a store built across nodes is, tensor
for tensor, the one a single process builds on the same kind of device and
precision: byte for byte with the same torch thread count, else within one
float16 step (a CPU matmul's reduction order follows its thread count). Ray
Data streams the shards with backpressure, so memory is bounded by a few
decoded shards whatever the dataset's size; an actor lost mid-pass is
restarted by Ray Data and its shard recomputed; a driver killed mid-pass
leaves finished shards that the next run keeps. The store's cache folder must
be visible at the same path on every node (the EFS mount of ``cluster.yaml``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from medsweep.datasets.shards import shard_labels
from medsweep.datasets.spec import SPLITS, DatasetSpec
from medsweep.datasets.store import StoreWriter
from medsweep.errors import ConfigError, DatasetError
from medsweep.search.frozen_decode import ShardPlan, decode_task
from medsweep.trainables.backbones import backbone_normalisation, frozen_weights_unused
from medsweep.trainables.methods import build_method
from medsweep.trainables.precision import resolve_precision
from medsweep.trainables.preload import (
    DECODED_SHARD_BYTES,
    SHARD_TARGET_BYTES,
    PreloadRequest,
    PreloadResult,
    StorePlan,
    building,
    finish_store,
    frozen_batch_size_for,
    plan_store,
    shard_features,
)

Progress = Callable[[int], None]
AUTOSCALED_GPU_ACTORS = 8


def preload_on_cluster(
    spec: DatasetSpec,
    config: dict[str, Any],
    cache_dir: Path,
    *,
    feature_dtype: str = "float16",
    batch_size: int | None = None,
    splits: tuple[str, ...] = SPLITS,
    with_features: bool = True,
    shard_target_bytes: int = SHARD_TARGET_BYTES,
    skip_bad_images: bool = False,
    order_seed: int = 0,
    precision: str = "auto",
    progress: Callable[[str, int], Progress] | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> PreloadResult:
    """Write (or reuse) the preload store of the method ``config`` describes, with the frozen pass on the cluster.

    Same arguments, store and semantics as :func:`medsweep.trainables.preload.preload`
    (which takes a built method instead of its flat config); Ray must be
    initialised. ``batch_size`` None: each actor probes its device's memory
    (:func:`~medsweep.trainables.preload.frozen_batch_size_for`). ``store.json``'s
    ``frozen_pass`` records, per node, the images it ran, its seconds, its
    device and batch size. ``precision="auto"`` resolves on a
    GPU of the cluster when it has one (:func:`cluster_precision`).
    """
    started = time.perf_counter()
    on_gpus, actors = frozen_pass_pool()
    precision = cluster_precision(precision, on_gpus)
    request = PreloadRequest(spec, feature_dtype, splits, with_features, shard_target_bytes, skip_bad_images, order_seed, precision)
    with frozen_weights_unused():  # the driver plans (key, shapes) and never runs the backbone
        planner = build_method(config["method"], config)
    parts, root = request.locate(planner, cache_dir)
    with building(root, cache_dir, on_wait):
        plan = plan_store(request, planner, parts, root)
        if plan.reused is not None:
            return plan.reused
        advance = progress(f"preload {planner.name} -> {plan.root.name}", plan.images) if progress else (lambda n: None)
        nodes = _run_pipeline(plan, request, config, batch_size, advance, on_gpus, actors)
        return finish_store(plan, request, planner.name, time.perf_counter() - started, nodes)


def frozen_pass_pool() -> tuple[bool, int | tuple[int, int]]:
    """Where the actors go: ``(on GPUs, pool size)``.

    One actor per GPU the cluster has. Without GPUs, about one actor per node
    that offers CPUs, each running torch on all of its node's cores (one model
    per node multiplies its matmuls across the cores best), but always one CPU
    of the cluster left for the decode tasks: with every CPU held by an actor
    the decoding would never be scheduled. A cluster with neither yet (a head
    offering Ray nothing, its workers all autoscaled and not up) asks for 1 to
    :data:`AUTOSCALED_GPU_ACTORS` GPU actors, which the autoscaler answers
    with GPU workers.

    A cluster of one CPU and no GPU gets 0 actors (the actor would hold the
    only CPU the decoding needs): only a store that is already complete can be
    used there.
    """
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    cpu_nodes = sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) >= 1)
    if gpus:
        return True, gpus
    if cpus:
        return False, min(cpu_nodes, cpus - 1)
    return True, (1, AUTOSCALED_GPU_ACTORS)


def frozen_pass_precision(requested: str) -> str:
    """``--precision`` as the frozen pass on this cluster will run it (what a sweep records in ``sweep.json``)."""
    return cluster_precision(requested, frozen_pass_pool()[0])


def cluster_precision(requested: str, on_gpus: bool) -> str:
    """``auto`` resolved where the frozen pass runs: on one of the cluster's GPUs (bf16 before any is up), else fp32."""
    if requested != "auto" or not on_gpus:
        return resolve_precision(requested, "cpu")  # a named precision as it is (checked); auto on CPUs: fp32
    if not ray.cluster_resources().get("GPU", 0):
        return "bf16"
    return ray.get(ray.remote(num_gpus=1, num_cpus=0)(resolve_precision).remote(requested, "cuda"))


def _run_pipeline(
    plan: StorePlan,
    request: PreloadRequest,
    config: dict[str, Any],
    batch_size: int | None,
    advance: Progress,
    on_gpus: bool,
    actors: int | tuple[int, int],
) -> dict[str, dict[str, Any]]:
    """Decode tasks, then frozen-forward actors, one shard per row; returns per-node images, seconds, device."""
    if actors == 0:
        raise ConfigError("the frozen pass needs 2 CPUs or a GPU in the Ray cluster (one decodes while the other runs the backbone); `ray status` lists them")
    assert plan.writer is not None  # the pipeline runs only for a store being written
    shipped = ShardPlan(plan.units, plan.decode_sizes, plan.root, plan.columns, plan.writer.key_parts, plan.rows_per_shard)
    items = ray.data.from_items([{"unit": i} for i in range(len(plan.units))], override_num_blocks=max(1, len(plan.units)))
    decoded = items.map_batches(
        decode_task,  # type: ignore[arg-type]  # Ray types fn as one-argument; fn_kwargs gives decode_task the rest
        batch_size=1,
        num_cpus=1,
        # What one decode task holds at its peak (the pictures and their resized arrays). Being a
        # reservation the actors lack, it also keeps Ray Data from fusing decoding into the actors.
        memory=2 * DECODED_SHARD_BYTES,
        fn_kwargs={"plan": shipped, "skip_bad_images": request.skip_bad_images},
    )
    pool = ray.data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1]) if isinstance(actors, tuple) else ray.data.ActorPoolStrategy(size=actors)
    written = decoded.map_batches(
        _FrozenWriter,
        batch_size=1,
        compute=pool,
        num_gpus=1 if on_gpus else None,
        num_cpus=None if on_gpus else 1,
        fn_constructor_kwargs={
            "config": config,
            "plan": shipped,
            "batch_size": batch_size,
            "task": request.spec.task,
            "precision": request.precision,
        },
    )
    written.context.enable_progress_bars = False
    nodes: dict[str, dict[str, Any]] = {}
    for row in written.iter_rows():
        if row["error"]:
            raise DatasetError(str(row["error"]))
        node = nodes.setdefault(
            str(row["node"]),
            {"ip": str(row["ip"]), "images": 0, "seconds": 0.0, "device": str(row["device"]), "batch_size": int(row["batch_size"])},
        )
        node["images"] += int(row["images"])
        node["seconds"] += float(row["seconds"])
        advance(int(row["images"]))
    return nodes


class _FrozenWriter:
    """Actor: holds one frozen backbone; runs the frozen forward over a decoded shard and writes the shard."""

    def __init__(self, config: dict[str, Any], plan: ShardPlan, batch_size: int | None, task: str, precision: str) -> None:
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cpu":  # about one actor per node: all of the node's cores (see frozen_pass_pool)
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        self.method = build_method(config["method"], config)
        self.method.eval()
        self.method.to_device(self.device)
        self.mean, self.std = backbone_normalisation(self.method.config.backbone)
        self.plan = plan
        self.batch_size = batch_size or frozen_batch_size_for(self.method, plan.sizes, plan.rows_per_shard, precision)
        self.task = task
        self.precision = precision
        self.num_classes = int(config["num_classes"])
        self.writer = StoreWriter(plan.root, plan.columns, task, plan.key_parts)
        self.node = ray.get_runtime_context().get_node_id()
        self.ip = ray.util.get_node_ip_address()  # what a user knows a node by (nodes of one machine share it)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if batch["error"][0]:
            return {
                "images": np.array([0]),
                "node": np.array([""]),
                "ip": np.array([""]),
                "device": np.array([""]),
                "seconds": np.array([0.0]),
                "batch_size": np.array([0]),
                "error": batch["error"],
            }
        started = time.perf_counter()
        unit = self.plan.units[int(batch["unit"][0])]
        kept = np.frombuffer(batch["kept"][0], dtype=np.int64)
        images = {
            name: np.frombuffer(batch[f"image:{name}"][0], dtype=np.uint8).reshape(len(kept), 3, size, size)
            for name, size in self.plan.sizes.items()
        }
        tensors = shard_features(self.method, images, self.plan.columns, self.mean, self.std, self.batch_size, self.precision)
        labels = shard_labels(unit, kept, self.task, self.num_classes)
        self.writer.write_shard(unit.split, unit.shard, unit.positions[kept], labels, tensors)
        return {
            "images": np.array([len(unit.samples)]),
            "node": np.array([self.node]),
            "ip": np.array([self.ip]),
            "device": np.array([str(self.device)]),
            "seconds": np.array([time.perf_counter() - started]),
            "batch_size": np.array([self.batch_size]),
            "error": np.array([""], dtype=object),
        }
