"""Peak training-step memory: measured on a GPU, a repeatable proxy on CPU.

On CUDA the figure is ``torch.cuda.max_memory_allocated`` over one full
training step (forward, backward, optimizer step), as the FPT paper reports.
The measuring step runs forward and backward only (it must leave no trace), so
an optimizer whose state is not allocated yet (a fresh trial's first step) is
counted from its parameters, as on CPU.

On CPU there is no allocator high-water mark worth trusting, so the proxy
counts the bytes a step must hold at its peak: every parameter, plus
gradients and optimizer state (2 tensors for Adam/AdamW, 1 for SGD with
momentum) of the learnable ones, plus every tensor autograd saves for the
backward pass (counted with ``saved_tensors_hooks``, each storage once). It
ignores allocator slack and transient buffers, so it sits below a GPU
reading, but it ranks methods the same way and is identical run to run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from medsweep.trainables.optimizers import OPTIMIZER_KINDS

if TYPE_CHECKING:
    from medsweep.trainables.methods.base import Method


def parameter_bytes(model: nn.Module, optimizer: str) -> int:
    """Parameters, plus gradient and optimizer state of the learnable ones (a frozen model built without weights holds none)."""
    return _bytes(model.parameters()) + _learnable_bytes(model) + optimizer_state_bytes(model, optimizer)


def optimizer_state_bytes(model: nn.Module, optimizer: str) -> int:
    """What ``optimizer`` allocates at its first step: its state tensors for every learnable parameter."""
    return _learnable_bytes(model) * OPTIMIZER_KINDS[optimizer].states


def _learnable_bytes(model: nn.Module) -> int:
    return _bytes(p for p in model.parameters() if p.requires_grad)


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``' elements (a view counts its own; a tensor without storage, on ``meta``, none)."""
    return sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)


def resident_bytes(model: nn.Module, tensors: list[torch.Tensor]) -> int:
    """What a model holds on its device before a step when it is alone there: its parameters (views count
    their own elements) and buffers, and the step's input ``tensors``."""
    return _bytes([*model.parameters(), *model.buffers(), *tensors])


def saved_activation_bytes(model: nn.Module, step: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd keeps for backward while running ``step`` (returns the loss).

    Storages of the model's parameters (and views of them, such as a
    transposed weight) are already counted by :func:`parameter_bytes`.
    """
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return total


def step_memory_bytes(
    model: nn.Module,
    step: Callable[[], torch.Tensor],
    optimizer: str,
    device: torch.device,
    optimizer_state_allocated: bool = False,
    resident: int | None = None,
) -> int:
    """Peak memory of one training step; ``step`` runs forward and returns the loss (backward is done here).
    ``optimizer_state_allocated``: on CUDA, whether the optimizer's state already lies on the device (a
    restored trial's), and so is in the allocator's reading; else it is added.
    ``resident``: on CUDA, for a model that shares its process's device memory with others (a cohort member
    beside its cohort's stacked tensors): what it would hold before its step alone (:func:`resident_bytes`).
    The reading is then the step's growth over what is allocated now, plus that and its optimizer state,
    rather than everything the process holds.

    The measuring step leaves no trace: the model's buffers (BatchNorm running
    statistics) and the random state (dropout) are as they were, so a trial
    resumed from a checkpoint, which measures again in its first epoch, goes on
    exactly as an uninterrupted one. Gradients are left for the caller to zero.
    """
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers() if not buffer.is_meta}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        measured = _measure(model, step, optimizer, device, optimizer_state_allocated, resident)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name])
    return measured


def _measure(
    model: nn.Module, step: Callable[[], torch.Tensor], optimizer: str, device: torch.device, state_allocated: bool, resident: int | None
) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step().backward()
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device))
        if resident is not None:
            return peak - before + resident + optimizer_state_bytes(model, optimizer)
        return peak + (0 if state_allocated else optimizer_state_bytes(model, optimizer))
    return parameter_bytes(model, optimizer) + saved_activation_bytes(model, step)


# The frozen pass (no gradients) on one device: how many images per forward.
CPU_FROZEN_BATCH = 16  # on CPU memory is no limit and larger batches gain nothing (figure 8's setting)
FROZEN_BATCH_CAP = 256  # beyond this a GPU is saturated and a shard rarely holds more rows
FROZEN_MEMORY_SHARE = 0.8  # of the memory free on the device: room for the allocator's slack and the outputs


def frozen_batch_size(method: Method, image_size: int, precision: torch.dtype | None, cap: int = FROZEN_BATCH_CAP) -> int:
    """The frozen forward's batch size on the device ``method`` is on, from a probe of its memory.

    On CUDA: the peak memory of ``method.frozen_features`` on batches of 1 and 4
    images (zeros, under autocast to ``precision`` unless None) gives a fixed
    part and a part per image; the answer is the largest power of two whose
    predicted peak fits :data:`FROZEN_MEMORY_SHARE` of the memory free now,
    at most ``cap``. On CPU: :data:`CPU_FROZEN_BATCH`, at most ``cap``.
    """
    device = device_of(method)
    if device.type != "cuda":
        return max(1, min(CPU_FROZEN_BATCH, cap))
    one, four = (_frozen_peak(method, images, image_size, precision, device) for images in (1, 4))
    per_image = max((four - one) / 3, 1.0)
    free, _ = torch.cuda.mem_get_info(device)
    return batch_within(FROZEN_MEMORY_SHARE * free - (one - per_image), per_image, cap)


def device_of(model: nn.Module) -> torch.device:
    """The device a model's real (not meta) parameters are on; CPU for a model built without weights."""
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def batch_within(budget_bytes: float, per_image_bytes: float, cap: int) -> int:
    """The largest power of two ``n <= cap`` with ``n * per_image_bytes <= budget_bytes`` (at least 1)."""
    fits = int(budget_bytes // per_image_bytes) if budget_bytes > 0 else 0
    size = 1
    while size * 2 <= min(fits, cap):
        size *= 2
    return size


@torch.no_grad()
def _frozen_peak(method: Method, images: int, image_size: int, precision: torch.dtype | None, device: torch.device) -> int:
    """Bytes the frozen forward of ``images`` images allocates at its peak, above what was allocated before."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    pixels = torch.zeros(images, 3, image_size, image_size, device=device)
    with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
        features = method.frozen_features(pixels)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del features, pixels
    return int(peak)
