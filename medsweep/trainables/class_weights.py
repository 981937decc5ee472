"""Class-balanced loss weights from the training split's label counts (``class_weights: balanced``).

Multi-class: the inverse-frequency weight ``n / (C * count_c)`` of each class
for ``F.cross_entropy(weight=...)`` (scikit-learn's "balanced": a balanced set
gets weight 1 everywhere). Multi-label: ``pos_weight = negatives / positives``
of each label for ``F.binary_cross_entropy_with_logits``, so a label's
positives and negatives weigh the same in total (TTL weighs its CheXpert labels
this way, see ``spaces.tables.TTL_TRAINING``).

A class with no training image (or a label whose training images are all
positive or all negative) keeps weight 1: it is never a target (or has nothing
to balance) in the training loss, and 1 leaves that loss as it was rather than
dividing by zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def balanced_weights(counts: Sequence[int], rows: int, num_classes: int, task: str) -> torch.Tensor:
    """The balanced weights (multi-class) or ``pos_weight`` (multi-label), one per class, as float32.

    ``counts``: per-class counts (multi-class; missing trailing classes count 0)
    or per-label positive counts (multi-label) of the ``rows`` training images.
    """
    padded = [float(c) for c in counts] + [0.0] * (num_classes - len(counts))
    if task == "multilabel":
        weights = [(rows - pos) / pos if 0 < pos < rows else 1.0 for pos in padded[:num_classes]]
    else:
        weights = [rows / (num_classes * c) if c > 0 else 1.0 for c in padded[:num_classes]]
    return torch.tensor(weights, dtype=torch.float32)
