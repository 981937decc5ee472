"""Figure 9: one training step of every method in fp32 vs bf16 (``--precision``): peak memory and step time.

Each method's step is the one a trial runs (``medsweep.trainables.probe.probe_memory``
for the memory, preloaded features for preloadable methods), at the method's
recommended values on a small backbone, once under fp32 and once under bf16
autocast. On CPU the memory is the package's proxy (parameters, gradients,
optimizer state and saved activations): bf16 halves what autocast saves in
bf16, while CPUs without bf16 matrix units gain no speed (``auto`` picks fp32
there for that reason). The GPU reading of the same figure is
``python -m bench.run --only precision`` on a CUDA machine.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch

from medsweep.spaces import recommended
from medsweep.trainables.backbones import frozen_weights_unused
from medsweep.trainables.config import TrainConfig
from medsweep.trainables.loop import make_optimizer, precise_loss
from medsweep.trainables.methods import build_method, get_method, list_methods
from medsweep.trainables.precision import allow_tf32
from medsweep.trainables.probe import probe_memory

from bench.common import table

NAME = "precision"
TITLE = "9. Precision: each method's training step in fp32 vs bf16"
PRECISIONS = ("fp32", "bf16")
EXTRA = {"truncated": {"backbone": "resnet-tiny-test"}, "staged": {"stage1_epochs": 1, "stage1": "linear"}, "cdtm": {"num_centers": 8}}


def setting(quick: bool) -> dict[str, Any]:
    if torch.cuda.is_available():
        return {"backbone": "vit-small-demo", "image_size": 224, "batch": 64, "steps": 20, "device": torch.cuda.get_device_name(0)}
    if quick:
        return {"backbone": "vit-tiny", "image_size": 64, "batch": 8, "steps": 15, "device": "cpu"}
    return {"backbone": "vit-small-demo", "image_size": 128, "batch": 16, "steps": 10, "device": "cpu"}


def config(method: str, s: dict[str, Any], precision: str) -> dict[str, Any]:
    values = {**recommended(method), "backbone": s["backbone"], "image_size": s["image_size"], "num_classes": 3, "task": "multiclass"}
    if "side_image_size" in values:
        values["side_image_size"] = 0  # derived from the frozen size, as a sweep does
    return {**values, **EXTRA.get(method, {}), "batch_size": s["batch"], "accumulate_steps": 1, "precision": precision}


def step_seconds(cfg: dict[str, Any], steps: int) -> float:
    """The fastest of ``steps`` training steps (forward under autocast, backward, AdamW) after one warm-up step:
    on a machine shared with other jobs the minimum is the step's own cost, a median still carries their load."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    preloadable = get_method(cfg["method"]).model_cls.preloadable
    with frozen_weights_unused() if preloadable else nullcontext():
        method = build_method(cfg["method"], cfg)
    batch = {name: torch.randn(cfg["batch_size"], 3, spec.size, spec.size) for name, spec in method.image_inputs().items()}
    if preloadable:
        shapes = method.frozen_features(batch.pop(method.frozen_input).to("meta"))
        batch.update({k: torch.randn(v.shape, dtype=v.dtype) for k, v in shapes.items()})
    method.to_device(device).train()
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = (torch.arange(cfg["batch_size"]) % 3).to(device)
    optimizer = make_optimizer(method, TrainConfig.from_dict(cfg), 1e-4)
    times = []
    for _ in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        precise_loss(method, batch, labels, "multiclass", cfg["precision"]).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def run(ctx) -> dict[str, Any]:
    s = setting(ctx.plan.name == "quick")
    if torch.cuda.is_available():
        allow_tf32()  # fp32 as a trial runs it (Trainee.start), whichever figures ran before in this process
    rows = []
    for method in list_methods():
        row: dict[str, Any] = {"method": method}
        for precision in PRECISIONS:
            cfg = config(method, s, precision)
            row[f"{precision}_peak_bytes"] = probe_memory(cfg, s["batch"])["peak_bytes"]
            row[f"{precision}_step_s"] = step_seconds(cfg, s["steps"])
        rows.append(row)
    return {"status": "MEASURED", "data": {"setting": s, "rows": rows}}


def render(result: dict[str, Any]) -> str:
    d, mib = result["data"], 2**20
    s = d["setting"]
    what = "`torch.cuda.max_memory_allocated` over one step" if s["device"] != "cpu" else "the CPU proxy of `medsweep probe`"
    rows = [
        (
            r["method"],
            r["fp32_peak_bytes"] / mib,
            r["bf16_peak_bytes"] / mib,
            r["bf16_peak_bytes"] / r["fp32_peak_bytes"],
            1000 * r["fp32_step_s"],
            1000 * r["bf16_step_s"],
            r["bf16_step_s"] / r["fp32_step_s"],
        )
        for r in d["rows"]
    ]
    return "\n\n".join(
        [
            f"`{s['backbone']}` at {s['image_size']} px, batch {s['batch']}, each method's recommended values, on {s['device']}; "
            f"memory by {what}, step time the fastest of {s['steps']} AdamW steps after one warm-up.",
            table(("method", "fp32 MiB", "bf16 MiB", "bf16/fp32 memory", "fp32 ms/step", "bf16 ms/step", "bf16/fp32 time"), rows),
            "The GPU figure: `python -m bench.run --only precision` on a CUDA machine (vit-small-demo at 224 px, batch 64).",
        ]
    )


def summary(result: dict[str, Any]) -> tuple[str, str]:
    rows = result["data"]["rows"]
    memory = statistics.median(r["bf16_peak_bytes"] / r["fp32_peak_bytes"] for r in rows)
    speed = statistics.median(r["bf16_step_s"] / r["fp32_step_s"] for r in rows)
    return ("bf16 vs fp32 per method", f"median memory x{memory:.2f}, step time x{speed:.2f} ({result['data']['setting']['device']})")
