"""Peak training-step memory: measured on a GPU, a repeatable proxy on CPU.

On CUDA the figure is ``torch.cuda.max_memory_allocated`` over one full
training step (forward, backward, optimizer step), as the FPT paper reports.

On CPU there is no allocator high-water mark worth trusting, so the proxy
counts the bytes a step must hold at its peak: every parameter, plus
gradients and optimizer state (2 tensors for Adam/AdamW, 1 for SGD with
momentum) of the learnable ones, plus every tensor autograd saves for the
backward pass (counted with ``saved_tensors_hooks``, each storage once). It
ignores allocator slack and transient buffers, so it sits below a GPU
reading, but it ranks methods the same way and is identical run to run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from medsweep.trainables.optimizers import OPTIMIZER_KINDS



def parameter_bytes(model: nn.Module, optimizer: str) -> int:
    """Parameters, plus gradient and optimizer state of the learnable ones (a frozen model built without weights holds none)."""
    total = 0
    for param in model.parameters():
        if param.is_meta:
            continue
        size = param.numel() * param.element_size()
        total += size
        if param.requires_grad:
            total += size * (1 + OPTIMIZER_KINDS[optimizer].states)
    return total


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


def step_memory_bytes(model: nn.Module, step: Callable[[], torch.Tensor], optimizer: str, device: torch.device) -> int:
    """Peak memory of one training step; ``step`` runs forward and returns the loss (backward is done here).

    The measuring step leaves no trace: the model's buffers (BatchNorm running
    statistics) and the random state (dropout) are as they were, so a trial
    resumed from a checkpoint, which measures again in its first epoch, goes on
    exactly as an uninterrupted one. Gradients are left for the caller to zero.
    """
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers() if not buffer.is_meta}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        measured = _measure(model, step, optimizer, device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name])
    return measured


def _measure(model: nn.Module, step: Callable[[], torch.Tensor], optimizer: str, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step().backward()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return parameter_bytes(model, optimizer) + saved_activation_bytes(model, step)
