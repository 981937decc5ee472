"""Figure 4: peak training-step memory of FPT+ vs full fine-tuning, same backbone, resolution, batch.

``medsweep.trainables.probe.probe_memory`` runs one training step of each
method: on a GPU its peak is ``torch.cuda.max_memory_allocated``; on CPU the
package's documented proxy (parameters + gradients + AdamW state of the
learnable ones + every tensor autograd saves). FPT+'s step is the one a trial
runs, on preloaded features, with the frozen LPM built without weights
(``backbones.frozen_weights_unused``): a trial on a preload store never runs it.

The proxy splits in two: parameter bytes (fixed) and saved activations
(linear in the batch). Where a batch of 16 is too slow on CPU, the step runs
at smaller batches and the activation part is scaled to 16: from one batch
as ``activations / batch``, from two or more by the least-squares slope.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch

from medsweep.trainables.backbones import frozen_weights_unused
from medsweep.trainables.memory import parameter_bytes
from medsweep.trainables.methods import build_method, get_method
from medsweep.trainables.probe import probe_memory

from bench.common import table

NAME = "memory"
TITLE = "4. Memory: FPT+ vs full fine-tuning, one training step"
TARGET_PCT = 5.0
PAPER = {"fpt_plus_mb": 736, "full_mb": 23128}
BACKBONE = "vit-base-patch16-384"
IMAGE_SIZE = 384
BATCH = 16
NUM_CLASSES = 5  # as `medsweep probe` defaults (a 5-grade task)


def config(method: str) -> dict[str, Any]:
    return {"method": method, "backbone": BACKBONE, "image_size": IMAGE_SIZE, "num_classes": NUM_CLASSES}


def measure(method: str, batches: tuple[int, ...]) -> dict[str, Any]:
    """Probe ``method`` at each batch; split peak bytes into parameter and activation parts."""
    preloadable = get_method(method).model_cls.preloadable
    with frozen_weights_unused() if preloadable else nullcontext():  # as the probe and a trial build it
        model = build_method(method, config(method))
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    released = frozen if preloadable else 0
    fixed = parameter_bytes(model, "adamw")
    del model
    points = []
    for batch in batches:
        start = time.perf_counter()
        report = probe_memory(config(method), batch)
        points.append(
            {
                "batch": batch,
                "peak_bytes": report["peak_bytes"],
                "activation_bytes": report["peak_bytes"] - fixed,
                "seconds": time.perf_counter() - start,
                "device": report["device"],
            }
        )
    per_sample = _slope([p["batch"] for p in points], [p["activation_bytes"] for p in points])
    measured = next((p for p in points if p["batch"] == BATCH), None)
    at_batch = measured["peak_bytes"] if measured else fixed + per_sample * BATCH
    return {
        "parameter_bytes": fixed,
        "frozen_parameter_bytes": frozen,
        "released_bytes": released,
        "points": points,
        "activation_bytes_per_sample": per_sample,
        "at_batch_bytes": at_batch,
        "at_batch_measured": measured is not None,
    }


def _slope(batches: list[int], values: list[float]) -> float:
    """Activation bytes per sample: through the origin for one point, least squares for more."""
    if len(batches) == 1:
        return values[0] / batches[0]
    mean_b, mean_v = sum(batches) / len(batches), sum(values) / len(values)
    return sum((b - mean_b) * (v - mean_v) for b, v in zip(batches, values, strict=True)) / sum((b - mean_b) ** 2 for b in batches)


def run(ctx) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    fpt_batches = (BATCH,) if cuda else ctx.plan.fpt_memory_batches
    full_batches = (BATCH,) if cuda else ctx.plan.full_memory_batches
    fpt = measure("fpt_plus", fpt_batches)
    full = measure("full", full_batches)
    pct = 100 * fpt["at_batch_bytes"] / full["at_batch_bytes"]
    return {
        "status": "PASS" if pct <= TARGET_PCT else "SHORT",
        "data": {
            "device": "cuda" if cuda else "cpu",
            "fpt_plus": fpt,
            "full": full,
            "pct": pct,
        },
    }


def render(result: dict[str, Any]) -> str:
    d = result["data"]
    mib = 2**20
    rows = []
    for label, m in (("FPT+ (preloaded features)", d["fpt_plus"]), ("full fine-tuning", d["full"])):
        for p in m["points"]:
            rows.append((label, p["batch"], m["parameter_bytes"] / mib, p["activation_bytes"] / mib, p["peak_bytes"] / mib, p["seconds"]))
    scaled = [
        (
            label,
            m["parameter_bytes"] / mib,
            m["activation_bytes_per_sample"] / mib,
            m["at_batch_bytes"] / mib,
            "measured" if m["at_batch_measured"] else "scaled from the rows above",
        )
        for label, m in (("FPT+", d["fpt_plus"]), ("full fine-tuning", d["full"]))
    ]
    what = (
        "`torch.cuda.max_memory_allocated` over one step"
        if d["device"] == "cuda"
        else "the CPU proxy (parameters + grads + AdamW state + saved activations); the GPU reading is pending, see Packing"
    )
    return "\n\n".join(
        [
            f"`{BACKBONE}` at {IMAGE_SIZE} px, {NUM_CLASSES} classes, AdamW, measured with {what}.",
            table(("method", "batch", "parameter part, MiB", "activations, MiB", "peak, MiB", "probe s"), rows),
            table(("at batch 16", "parameter part, MiB", "activations per sample, MiB", "peak, MiB", "how"), scaled),
            f"FPT+ / full = **{d['pct']:.1f}%** (target <= {TARGET_PCT:.0f}%; the paper's GPU figures "
            f"{PAPER['fpt_plus_mb']} MB vs {PAPER['full_mb']:,} MB = "
            f"{100 * PAPER['fpt_plus_mb'] / PAPER['full_mb']:.1f}%, at 512 px).",
            _released(d["fpt_plus"]),
        ]
    )


def _released(fpt: dict[str, Any]) -> str:
    mib = 2**20
    return (
        f"Not in FPT+'s figure: the frozen ViT-B's {fpt['released_bytes'] / mib:,.0f} MiB of weights, which a trial "
        "on preloaded features never holds: it builds the frozen model without weights "
        "(`backbones.frozen_weights_unused`; the frozen path runs only in the preload)."
    )


def summary(result: dict[str, Any]) -> tuple[str, str]:
    d = result["data"]
    mib = 2**20
    how = "GPU" if d["device"] == "cuda" else "CPU proxy"
    return (
        f"FPT+ / full <= {TARGET_PCT:.0f}%",
        f"{d['pct']:.1f}% ({d['fpt_plus']['at_batch_bytes'] / mib:,.0f} vs {d['full']['at_batch_bytes'] / mib:,.0f} MiB, {how})",
    )
