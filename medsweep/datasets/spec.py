"""The one description of a dataset every layout is turned into.

A source (ImageFolder, CSV with folds, list files, the synthetic set) is read
once into a :class:`DatasetSpec`: fixed splits of (image path, label) pairs.
Everything downstream (preload, training, the cache key) sees only this.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Task = Literal["multiclass", "multilabel"]
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One image and its label.

    ``label`` is a class index for multi-class tasks and a tuple of 0/1 flags
    (one per class) for multi-label tasks.
    """

    path: Path
    label: int | tuple[int, ...]


@dataclass
class DatasetSpec:
    """A dataset with fixed train/val/test splits.

    Attributes:
        name: short name used in output folders, W&B groups and cache keys.
        root: folder the image paths are relative to (for messages and manifests).
        task: ``multiclass`` (softmax, one label) or ``multilabel`` (sigmoid, 0/1 per class).
        classes: class names, index order.
        splits: ``{"train": [...], "val": [...], "test": [...]}``.
        image_size: the resolution the dataset's own config recommends (None: the method decides).
        learning_rate: the dataset's recommended learning rate, if its config names one.
    """

    name: str
    root: Path
    task: Task
    classes: list[str]
    splits: dict[str, list[Sample]]
    image_size: int | None = None
    learning_rate: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def manifest_hash(self) -> str:
        """Hash of everything about the data that changes preloaded tensors.

        Covers split membership, labels, and each file's size and modification
        time (reading every byte of a multi-GB dataset for a key would cost more
        than the preload it guards; a rewritten file changes its mtime).
        """
        digest = hashlib.sha256()
        digest.update(json.dumps([self.task, self.classes]).encode())
        for split in SPLITS:
            for sample in self.splits.get(split, []):
                stat = sample.path.stat()
                label = list(sample.label) if isinstance(sample.label, tuple) else sample.label
                digest.update(
                    json.dumps([split, str(sample.path), label, stat.st_size, stat.st_mtime_ns]).encode()
                )
        return digest.hexdigest()[:16]

    def summary(self) -> str:
        counts = ", ".join(f"{s} {len(self.splits.get(s, []))}" for s in SPLITS)
        return f"{self.name}: {self.task}, {self.num_classes} classes, {counts} images"
