"""Measure one training step's peak memory for a method configuration (``medsweep probe``).

The step is the one a trial runs: with preloaded features for preloadable
methods (the frozen backbone does not run in training), on random inputs of
the configured sizes. See :mod:`medsweep.trainables.memory` for what is
measured on GPU and the proxy used on CPU. Sweeps use it to size GPU
fractions and to compute the FPT paper's PME against full fine-tuning.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from medsweep.trainables.backbones import frozen_weights_unused
from medsweep.trainables.config import TrainConfig
from medsweep.trainables.loop import device_for_trial, precise_loss
from medsweep.trainables.memory import step_memory_bytes
from medsweep.trainables.methods import build_method, get_method
from medsweep.trainables.precision import resolve_precision


def probe_memory(config: dict[str, Any], batch_size: int, device: torch.device | None = None) -> dict[str, Any]:
    """Peak bytes of one training step of ``config["method"]`` at the effective ``batch_size``.

    The step is the trial's: one micro-batch (``batch_size / accumulate_steps``) under the config's precision.
    """
    device = device or device_for_trial()
    cfg = TrainConfig.from_dict({**config, "batch_size": batch_size})
    precision = resolve_precision(cfg.precision, device)
    effective, batch_size = batch_size, cfg.micro_batch_size(1)
    torch.manual_seed(cfg.seed)
    preloadable = get_method(config["method"]).model_cls.preloadable
    with frozen_weights_unused() if preloadable else nullcontext():  # as a trial on a preload store builds it
        method = build_method(config["method"], config)
    generator = torch.Generator().manual_seed(0)
    batch: dict[str, torch.Tensor] = {
        name: torch.randn(batch_size, 3, spec.size, spec.size, generator=generator)
        for name, spec in method.image_inputs().items()
    }
    if preloadable:
        # The weightless frozen path on meta inputs gives the features' shapes; their values do not
        # change the step's memory.
        shapes = method.frozen_features(batch.pop(method.frozen_input).to("meta"))
        batch.update({k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in shapes.items()})
    method.to_device(device).train()
    batch = {k: v.to(device) for k, v in batch.items()}
    num_classes = method.config.num_classes
    if method.config.task == "multilabel":
        labels = torch.randint(0, 2, (batch_size, num_classes), generator=generator).float()
    else:
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    labels = labels.to(device)
    peak = step_memory_bytes(method, lambda: precise_loss(method, batch, labels, method.config.task, precision), cfg.optimizer, device)
    learnable, total = method.parameter_counts()
    return {
        "method": config["method"],
        "device": "cuda" if device.type == "cuda" else "cpu (proxy: params + grads + optimizer state + saved activations)",
        "batch_size": effective,
        "micro_batch_size": batch_size,
        "precision": precision,
        "peak_bytes": peak,
        "peak_mb": peak / 2**20,
        "learnable_params": learnable,
        "total_params": total,
    }
