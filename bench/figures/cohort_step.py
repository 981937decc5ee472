"""Figure 10: a fused cohort's training step vs the same members' standalone steps (issue 14).

Figure 1's task and trial (FPT+ on ``vit-small-demo`` at 128 px, the synthetic
set's preload store, the recommended point) with K members that differ in lr
and keep ratio, as a searcher's trials would. One *standalone* step is what
``fit`` does per batch: make the batch (decode, augment the side images),
forward, backward, optimizer step; K members standalone take K such steps. One
*cohort* step (``medsweep.trainables.cohort``) makes the batch once and runs all
K members in one vmapped forward/backward, then one stacked optimizer update. The
two are interleaved on the same batch (one of each per repetition) and each is
the median of its repetitions, in member-samples per second (K x batch / step).

On a GPU (the issue's command, ``python -m bench.run --only cohort_step``) the
members are K = 16, 32 and 64 FPT+ trials on ViT-B/16-384 features at 384 px (a
small synthetic set preloaded on the GPU), and the figure also sets the device
memory of one cohort against packing the same K trials one per GPU fraction:
each such trial holds its own parameters, optimizer state, step and CUDA
context (the sweep's sizing estimate, ``tuning.CUDA_CONTEXT_BYTES``), where the
cohort holds one context, the stacked members and one fused step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from medsweep.search.tuning import CUDA_CONTEXT_BYTES
from medsweep.trainables.cohort import FusedMembers, Member, fused_model
from medsweep.trainables.loop import Accumulation, Trainee, batch_maker, device_for_trial
from medsweep.trainables.memory import optimizer_state_bytes, resident_bytes
from medsweep.trainables.preload import preload
from medsweep.trainables.store_io import StoreIO

from bench.common import HEAVY_BACKBONE, demo_spec, recommended_point, small_synthetic, sweep_config, table, trial_method, trial_threads

NAME = "cohort_step"
TITLE = "10. Fused cohorts: one vmapped step for K trials vs K standalone steps"
MEMBERS = (1, 4, 8, 16)
GPU_MEMBERS = (1, 16, 32, 64)  # the GPU setting: K = 16, 32, 64 on ViT-B/16-384 features
GPU_SIZE = 384
GPU_SPLIT = (64, 16, 16)  # images of the GPU setting's synthetic set (one training batch is all a step needs)
KEEP_RATIOS = (0.1, 0.2, 0.3, 0.4)


def member_configs(base: dict[str, Any], k: int) -> list[dict[str, Any]]:
    """K members of one cohort: lr spread over a decade, keep ratios cycled (they fuse by masking)."""
    return [{**base, "lr": base["lr"] * 10 ** (i / max(1, k - 1) - 0.5), "keep_ratio": KEEP_RATIOS[i % len(KEEP_RATIOS)]} for i in range(k)]


def measure(configs: list[dict[str, Any]], io: StoreIO, arrays: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds of one cohort step and of K standalone steps on the batch ``arrays``, interleaved;
    on CUDA also the device bytes of the cohort and of the K trials packed one per fraction (:func:`device_bytes`)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    alone = [Trainee.start(config, io, 1, device, None) for config in configs]
    members = [Member.start(i, config, io, device, None) for i, config in enumerate(configs)]
    model, dropouts = fused_model(members[0].trainee.method)
    fused = FusedMembers(model, dropouts, members, device)
    generator = torch.Generator().manual_seed(0)
    batch_of = batch_maker(members[0].trainee.method, io.columns, device, generator)
    precision = members[0].trainee.precision

    def standalone() -> None:
        for trainee in alone:
            inputs, labels = batch_of(arrays, train=True)
            trainee.backward(trainee.method.train(), inputs, labels, Accumulation(len(labels), 1))
            trainee.step(1.0)

    def cohort() -> None:
        inputs, labels = batch_of(arrays, train=True)
        fused.backward(inputs, labels, precision, Accumulation(len(labels), 1))
        fused.step(1.0)

    times: dict[str, list[float]] = {"standalone": [], "cohort": []}
    for repeat in range(repeats + 1):  # the first of each warms up
        for name, step in (("standalone", standalone), ("cohort", cohort)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat:
                times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    if device.type != "cuda":
        return seconds
    single = alone[0]

    def one_standalone() -> None:
        inputs, labels = batch_of(arrays, train=True)
        single.backward(single.method.train(), inputs, labels, Accumulation(len(labels), 1))
        single.step(1.0)

    return {**seconds, **device_bytes(members, cohort, one_standalone)}


def device_bytes(members: list[Member], cohort: Callable[[], None], one_standalone: Callable[[], None]) -> dict[str, float]:
    """Device memory of the cohort and of its K members as K trials packed on one GPU (after warm-up steps).

    The cohort: one CUDA context, the members' stacked parameters and optimizer states, and the growth of
    one fused step (activations and the stacked gradients). Packed: K times one trial's context, parameters,
    optimizer state and step growth. Contexts are the sweep's sizing estimate, not measured."""
    import torch.cuda as cuda

    def growth(step: Callable[[], None]) -> int:
        cuda.synchronize()
        before = cuda.memory_allocated()
        cuda.reset_peak_memory_stats()
        step()
        cuda.synchronize()
        return cuda.max_memory_allocated() - before

    own = [resident_bytes(m.trainee.method, []) + optimizer_state_bytes(m.trainee.method, m.trainee.cfg.optimizer) for m in members]
    cohort_bytes = CUDA_CONTEXT_BYTES + sum(own) + growth(cohort)
    packed_bytes = len(members) * (CUDA_CONTEXT_BYTES + own[0] + growth(one_standalone))
    return {"cohort_bytes": cohort_bytes, "packed_bytes": packed_bytes}


def run(ctx) -> dict[str, Any]:
    quick = ctx.plan.name == "quick"
    gpu = torch.cuda.is_available()
    if gpu:  # the GPU setting
        spec = small_synthetic(ctx.cache_dir, "cohort-step-set", GPU_SIZE, GPU_SPLIT)
        method = trial_method(spec, {}, backbone=HEAVY_BACKBONE, size=GPU_SIZE).to(device_for_trial())  # preload on the GPU
        base = sweep_config(spec, recommended_point(spec), epochs=1, backbone=HEAVY_BACKBONE, size=GPU_SIZE)
    else:
        spec = demo_spec(ctx.cache_dir)
        method = trial_method(spec, {})
        base = sweep_config(spec, recommended_point(spec), epochs=1)
    store = preload(spec, method, ctx.cache_dir).store
    io = StoreIO(store, seed=0)
    arrays = next(iter(io.batches("train", base["batch_size"], 0, shuffle=True)))
    repeats = 5 if quick else 20
    rows = []
    with trial_threads():
        for k in GPU_MEMBERS if gpu else MEMBERS:
            seconds = measure(member_configs(base, k), io, arrays, repeats)
            samples = k * base["batch_size"]
            rows.append(
                {"members": k, **{f"{name}_s" if name in ("standalone", "cohort") else name: v for name, v in seconds.items()}, "member_samples": samples}
            )
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    setting = {"backbone": base["backbone"], "image_size": base["image_size"], "batch": base["batch_size"], "repeats": repeats, "device": device}
    return {"status": "MEASURED", "data": {"setting": setting, "rows": rows, "threads": torch.get_num_threads()}}


def render(result: dict[str, Any]) -> str:
    d = result["data"]
    s = d["setting"]
    memory = all("cohort_bytes" in r for r in d["rows"])
    rows = [
        (
            r["members"],
            r["member_samples"] / r["standalone_s"],
            r["member_samples"] / r["cohort_s"],
            r["standalone_s"] / r["cohort_s"],
            *((r["cohort_bytes"] / 2**20, r["packed_bytes"] / 2**20) if memory else ()),
        )
        for r in d["rows"]
    ]
    headers = ("members K", "standalone member-samples/s", "cohort member-samples/s", "cohort speed-up")
    if memory:
        headers += ("cohort device MiB", f"packed one per fraction MiB (incl. {CUDA_CONTEXT_BYTES // 2**20} MiB context each)")
    trial = "figure 1's trial" if s["backbone"] != HEAVY_BACKBONE else "the paper's features"
    return "\n\n".join(
        [
            f"FPT+ on `{s['backbone']}` at {s['image_size']} px ({trial}), batch {s['batch']}, members differing in lr and "
            f"keep ratio, on {s['device']} with a trial's torch threads; median of {s['repeats']} interleaved repetitions.",
            table(headers, rows),
            "On a CPU the fused step saves the batch making (one decode and augmentation for K members) and the "
            "per-tensor overhead of K optimizer steps (one stacked update for all members, "
            "`medsweep/trainables/stacked_step.py`), and little else: vmap runs the same FLOPs as K separate "
            "forwards, and CPU matmuls are already efficient at these sizes. On a GPU, where a tiny network's step is "
            "bound by kernel launches, K members cost one launch sequence; `python -m bench.run --only cohort_step` "
            "on a CUDA machine measures that.",
        ]
    )


def summary(result: dict[str, Any]) -> tuple[str, str]:
    rows = result["data"]["rows"]
    best = max(rows, key=lambda r: r["standalone_s"] / r["cohort_s"])
    return ("cohort vs standalone steps", f"x{best['standalone_s'] / best['cohort_s']:.1f} at K = {best['members']} ({result['data']['setting']['device']})")
