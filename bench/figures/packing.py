"""GPU packing: how many FPT+ trials (ViT-B/16-384 at 384 px, batch 16) fit on one GPU at once.

Needs CUDA. One FPT+ training step runs in this process; the device memory
it then holds (``total - free`` from ``torch.cuda.mem_get_info``: CUDA
context + the caching allocator's reserve, on an otherwise idle GPU) is one
trial's footprint, and ``total // footprint`` trials fit side by side. On a
machine without a GPU the figure is recorded as pending, with the command.
"""

from __future__ import annotations

from typing import Any

import torch

from medsweep.trainables.probe import probe_memory

from bench.figures.memory import BACKBONE, BATCH, IMAGE_SIZE, config

NAME = "packing"
TITLE = "4b. GPU packing: concurrent FPT+ trials per GPU"
COMMAND = "python -m bench.run --only memory,packing"


def run(ctx) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"status": "PENDING", "data": {"reason": "no CUDA device on this machine", "command": COMMAND}}
    # Blocks the allocator keeps cached from the figures before this one (figure 8's batch-256 forward) are not
    # this trial's; the probe's own stay cached (reserved) and count, as in a trial's process.
    torch.cuda.empty_cache()
    report = probe_memory(config("fpt_plus"), BATCH, torch.device("cuda"))
    free, total = torch.cuda.mem_get_info()
    footprint = total - free
    return {
        "status": "INFO",
        "data": {
            "gpu": torch.cuda.get_device_name(0),
            "total_bytes": total,
            "peak_allocated_bytes": report["peak_bytes"],
            "footprint_bytes": footprint,
            "trials_per_gpu": total // footprint,
        },
    }


def render(result: dict[str, Any]) -> str:
    d = result["data"]
    if result["status"] == "PENDING":
        return (
            f"Pending a GPU machine ({d['reason']}). There, run `{d['command']}`: figure 4 then reads "
            f"`torch.cuda.max_memory_allocated` over one step at batch {BATCH} for both methods (no scaling), "
            f"and this figure measures one FPT+ trial's device footprint (`{BACKBONE}`, {IMAGE_SIZE} px, "
            f"batch {BATCH}) and how many fit on the GPU at once."
        )
    gib = 2**30
    return (
        f"{d['gpu']}: one FPT+ trial holds {d['footprint_bytes'] / gib:.2f} GiB "
        f"(peak allocated {d['peak_allocated_bytes'] / gib:.2f} GiB + CUDA context and allocator reserve) of "
        f"{d['total_bytes'] / gib:.1f} GiB: **{d['trials_per_gpu']} trials** fit side by side."
    )


def summary(result: dict[str, Any]) -> tuple[str, str]:
    d = result["data"]
    if result["status"] == "PENDING":
        return "trials per GPU (no target)", f"pending a GPU: `{d['command']}`"
    return "trials per GPU (no target)", f"{d['trials_per_gpu']} on {d['gpu']}"
