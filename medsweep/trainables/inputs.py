"""From stored uint8 images and features to the float tensors a method's forward takes.

Every image is stored once as uint8 ``[3, S, S]`` at its input's ``stored_size``;
here it is augmented (training only, for inputs that allow it) or resized to the
input's size (evaluation), scaled to [0, 1] and normalised with the backbone's
mean/std.

Augmentation is the official FPT recipe (github YijinHuang/FPT,
``data/transforms.py`` with ``configs/data_config.yaml``), in its order:
horizontal flip (p 0.5); brightness and contrast jitter of 0.2 each, applied in a
random order (torchvision's ``ColorJitter``); ``RandomResizedCrop`` of area
0.8-1.0 and aspect ratio 0.7-1.3 resized to the input's size (bilinear,
antialiased). The crop comes from the stored image, kept at ``size / 0.8`` so
that it holds more pixels than the training size, as the official crop does from
the source image; evaluation resizes the stored image to the size, as the
official test transform resizes the source. Draws come from the loop's
per-epoch generator, so a seed and an epoch give the same batches.

One augmentation for every method that augments, not only for FPT/FPT+'s side
input: medsweep compares methods, and a shared recipe keeps the data side of
that comparison equal; the recipe is FPT's because FPT/FPT+ are the methods
whose published numbers depend on it (the README lists where the other seeds'
own recipes differ).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from medsweep.trainables.methods.base import CROP_MIN_SCALE, ImageInput

BRIGHTNESS = 0.2  # factor drawn from [1 - 0.2, 1 + 0.2], as ColorJitter(brightness=0.2)
CONTRAST = 0.2
CROP_RATIO = (0.7, 1.3)  # aspect ratio range of the crop (width / height)
CROP_ATTEMPTS = 10  # RandomResizedCrop's tries before it falls back to a centre crop
GREY_WEIGHTS = torch.tensor([0.2989, 0.587, 0.114])  # torchvision's rgb_to_grayscale


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` to normalised float32."""
    return normalise_float(images.float().div_(255.0), mean, std)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float ``[B, 3, S, S]`` to ``size`` as torchvision resizes tensors (bilinear, antialiased)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def augment(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Flip, colour jitter and random resized crop of ``[B, 3, S, S]`` in [0, 1] to ``[B, 3, size, size]``."""
    batch, _, height, width = images.shape
    draws = torch.rand(batch, 4 + 4 * CROP_ATTEMPTS, generator=generator)  # on the CPU: the crop boxes need no sync
    flip = (draws[:, 0] < 0.5).to(images.device).view(-1, 1, 1, 1)
    images = torch.where(flip, images.flip(-1), images)
    images = jitter(images, draws[:, 1:4].to(images.device))
    boxes = crop_boxes(height, width, draws[:, 4:].view(batch, CROP_ATTEMPTS, 4))
    # One resize per image: the crops differ in shape; integer boxes crop exactly as torchvision does.
    crops = [resize(images[i : i + 1, :, top : top + h, left : left + w], size) for i, (top, left, h, w) in enumerate(boxes)]
    return torch.cat(crops) if crops else images.new_empty(0, 3, size, size)


def jitter(images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """``ColorJitter(brightness=0.2, contrast=0.2)`` per image from three uniform ``draws`` ``[B, 3]``:
    the two factors, then which goes first; the result is clamped to [0, 1] after each, as torchvision does."""
    view = (-1, 1, 1, 1)
    brightness = (1 - BRIGHTNESS + 2 * BRIGHTNESS * draws[:, 0]).view(view)
    contrast = (1 - CONTRAST + 2 * CONTRAST * draws[:, 1]).view(view)
    contrast_first = (draws[:, 2] < 0.5).view(view)

    def bright(x: torch.Tensor) -> torch.Tensor:
        return (x * brightness).clamp(0, 1)

    def contrasted(x: torch.Tensor) -> torch.Tensor:
        grey = (x * GREY_WEIGHTS.to(x).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        mean = grey.mean(dim=(1, 2, 3), keepdim=True)  # torchvision's adjust_contrast blends with the grey mean
        return (contrast * x + (1 - contrast) * mean).clamp(0, 1)

    return torch.where(contrast_first, bright(contrasted(images)), contrasted(bright(images)))


def crop_boxes(height: int, width: int, draws: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """``RandomResizedCrop.get_params`` (scale 0.8-1.0, ratio 0.7-1.3) per image: ``(top, left, h, w)``.

    ``draws`` ``[B, attempts, 4]`` uniform: area fraction, log aspect ratio and the
    two offsets of each attempt. The first attempt that fits is taken; if none
    does, the centre crop of the image's aspect ratio clamped to the range.
    """
    scale = CROP_MIN_SCALE + (1 - CROP_MIN_SCALE) * draws[..., 0]
    low, high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(low + (high - low) * draws[..., 1])
    area = height * width * scale
    widths = torch.round(torch.sqrt(area * ratio)).long()
    heights = torch.round(torch.sqrt(area / ratio)).long()
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    boxes = []
    for i in range(draws.shape[0]):
        hits = fits[i].nonzero()
        if len(hits):
            a = int(hits[0, 0])
            h, w = int(heights[i, a]), int(widths[i, a])
            top, left = int(draws[i, a, 2] * (height - h + 1)), int(draws[i, a, 3] * (width - w + 1))
        else:
            h, w = height, width
            if width / height < CROP_RATIO[0]:
                h = round(width / CROP_RATIO[0])
            elif width / height > CROP_RATIO[1]:
                w = round(height * CROP_RATIO[1])
            top, left = (height - h) // 2, (width - w) // 2
        boxes.append((top, left, h, w))
    return boxes


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
            batch[name] = normalise_float(augment(x.float().div_(255.0), spec.size, generator), mean, std)
        else:
            batch[name] = normalise_float(resize(x.float().div_(255.0), spec.size), mean, std)
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
