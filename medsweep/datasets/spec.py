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

    def membership_hash(self) -> str:
        """Hash of what the dataset is, whatever its files' times: task, classes, and each split's images (paths
        below ``root``, so a moved copy hashes the same) with their labels. :meth:`manifest_hash` also covers each
        file's size and modification time; a dataset whose membership hash is unchanged but whose manifest hash
        differs was edited in place or copied without its file times."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.task, self.classes]).encode())
        for split in SPLITS:
            for sample in self.splits.get(split, []):
                path = sample.path.relative_to(self.root) if sample.path.is_relative_to(self.root) else sample.path
                digest.update(json.dumps([split, path.as_posix(), sample.label]).encode())
        return digest.hexdigest()[:16]

    def summary(self) -> str:
        counts = ", ".join(f"{s} {len(self.splits.get(s, []))}" for s in SPLITS)
        return f"{self.name}: {self.task}, {self.num_classes} classes, {counts} images"

    def class_counts(self, split: str) -> list[int]:
        """Images of ``split`` per class: of that class (multi-class) or having that label (multi-label)."""
        counts = [0] * self.num_classes
        for sample in self.splits.get(split, []):
            for index in (sample.label,) if isinstance(sample.label, int) else (i for i, flag in enumerate(sample.label) if flag):
                counts[index] += 1
        return counts

    def classes_without_auc(self, split: str) -> list[str]:
        """The classes a macro AUC over ``split`` leaves out, its one-vs-rest (or per-label) outcome being the same
        for every image there: a class with no image in the split, or a label that every image or none has
        (``medsweep.trainables.metrics``). The AUC of a validation split averages the other classes only."""
        images = len(self.splits.get(split, []))
        constant = (0,) if self.task == "multiclass" else (0, images)
        return [name for name, count in zip(self.classes, self.class_counts(split), strict=True) if images and count in constant]

    def auc_notes(self) -> list[str]:
        """One line per evaluated split whose AUC leaves classes out (see :meth:`classes_without_auc`)."""
        notes = []
        for split in ("val", "test"):
            left_out = self.classes_without_auc(split)
            if not left_out:
                continue
            scored = [name for name in self.classes if name not in left_out]
            kind = "classes" if self.task == "multiclass" else "labels"
            kept = f"its AUC averages the other {len(scored)} {kind}" if len(scored) > 1 else f"its AUC is {scored[0]}'s alone" if scored else "it has no AUC"
            if self.task == "multiclass":
                notes.append(f"{split}: no image of {', '.join(left_out)}; {kept}")
                continue
            counts = dict(zip(self.classes, self.class_counts(split), strict=True))
            nowhere = [name for name in left_out if counts[name] == 0]
            everywhere = [name for name in left_out if counts[name] > 0]
            said = [f"no image has {', '.join(nowhere)}"] * bool(nowhere) + [f"every image has {', '.join(everywhere)}"] * bool(everywhere)
            notes.append(f"{split}: {'; '.join(said)}; {kept}")
        return notes
