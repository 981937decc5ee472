"""From stored uint8 images and features to the float tensors a method's forward takes.

Every image is stored once as uint8 ``[3, S, S]`` at the size its method asks
for; here it is augmented (training only, for inputs that allow it), scaled to
[0, 1] and normalised with the backbone's mean/std. Augmentation follows the
official FPT setup for the side input: horizontal flip, random resized crop
with scale 0.8-1.0, mild brightness/contrast jitter; done on whole batches
with one ``affine_grid`` so it costs little next to a training step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from medsweep.trainables.methods.base import ImageInput


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` to normalised float32."""
    return normalise_float(images.float().div_(255.0), mean, std)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flip, resized crop (area 0.8-1.0) and brightness/contrast jitter on ``[B, 3, S, S]`` in [0, 1]."""
    batch = images.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    scale = torch.sqrt(0.8 + 0.2 * rand(batch))  # side length fraction of the crop
    flip = torch.where(rand(batch) < 0.5, -1.0, 1.0)
    shift_x = (1 - scale) * (2 * rand(batch) - 1)
    shift_y = (1 - scale) * (2 * rand(batch) - 1)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, 0, 2] = shift_x
    theta[:, 1, 2] = shift_y
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    brightness = (1 + 0.1 * (2 * rand(batch, 1, 1, 1) - 1)).to(images.device)
    contrast = (1 + 0.1 * (2 * rand(batch, 1, 1, 1) - 1)).to(images.device)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean * brightness).clamp_(0, 1)


def model_inputs(
    arrays: dict[str, np.ndarray],
    images: dict[str, ImageInput],
    feature_keys: tuple[str, ...],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """Decoded store columns to a method batch; ``generator`` set means training (augment)."""
    batch: dict[str, torch.Tensor] = {}
    for name, spec in images.items():
        x = torch.from_numpy(np.ascontiguousarray(arrays[name])).to(device)
        if generator is not None and spec.augment:
            x = augment(x.float().div_(255.0), generator)
            batch[name] = normalise_float(x, mean, std)
        else:
            batch[name] = normalise(x, mean, std)
    for key in feature_keys:
        if key in arrays:
            batch[key] = torch.from_numpy(np.ascontiguousarray(arrays[key])).to(device=device, dtype=torch.float32)
    return batch


def normalise_float(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Float ``[B, 3, S, S]`` in [0, 1] to normalised."""
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def steps_per_epoch(rows: int, batch_size: int, world_size: int = 1) -> int:
    return max(1, math.ceil(rows / world_size / batch_size))
