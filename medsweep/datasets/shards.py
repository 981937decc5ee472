"""One shard of a preload store as images and labels: what a decode task does, without torch.

The frozen pass decodes each shard in a Ray Data CPU task
(:mod:`medsweep.search.frozen_decode`) and runs the backbone in separate
actors. Keeping decoding and labels here, beside the other dataset code and
away from torch, lets a decode worker start by importing PIL and numpy only,
not torch and the model code (seconds of start-up and hundreds of MB per worker).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from medsweep.datasets.images import load_image, resize_square
from medsweep.datasets.spec import Sample
from medsweep.errors import DatasetError


@dataclass
class ShardUnit:
    """One shard still to write: its split, number, and the samples of its rows in the written order."""

    split: str
    shard: int
    positions: np.ndarray
    samples: list[Sample]


def decode_shard(samples: list[Sample], sizes: dict[str, int], skip_bad_images: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Decode one shard's images and resize each to every size in ``sizes``: ``{name: uint8 [n, 3, s, s]}``.

    Returns the positions in ``samples`` of the images kept (all, unless some
    were unreadable and ``skip_bad_images``); an unreadable image stops with
    :class:`DatasetError` otherwise.
    """
    kept, pictures = read_images(samples, range(len(samples)), skip_bad_images)
    images = {
        name: np.stack([resize_square(p, size).transpose(2, 0, 1) for p in pictures]) if pictures else np.empty((0, 3, size, size), np.uint8)
        for name, size in sizes.items()
    }
    return np.array(kept, dtype=np.int64), images


def shard_labels(unit: ShardUnit, kept: np.ndarray, task: str, num_classes: int) -> np.ndarray:
    """Labels of the kept rows of ``unit``: ``[n]`` class indices, or ``[n, C]`` multi-label vectors."""
    samples = [unit.samples[i] for i in kept]
    if task == "multilabel":
        return np.array([s.label for s in samples], dtype=np.float32).reshape(len(samples), num_classes)
    return np.array([s.label for s in samples], dtype=np.int64)


def read_images(samples: list[Sample], positions: range, skip_bad_images: bool) -> tuple[list[int], list[Image.Image]]:
    """Decode ``samples[positions]``; an unreadable one stops the preload, or is left out with ``skip_bad_images``."""
    kept: list[int] = []
    pictures: list[Image.Image] = []
    for position in positions:
        try:
            pictures.append(load_image(samples[position].path))
        except DatasetError:
            if not skip_bad_images:
                raise
            continue
        kept.append(position)
    return kept, pictures
