"""Datasets: every supported layout read into one :class:`DatasetSpec`, and images read as RGB.

``load_dataset`` is the CLI's entry point; the individual loaders are public
for notebooks and tests. Nothing here imports torch or Ray.
"""

from __future__ import annotations

from medsweep.datasets.images import load_image, resize_square
from medsweep.datasets.sources import (
    IMAGE_EXTENSIONS,
    apply_label_fraction,
    load_csv,
    load_dataset,
    load_dataset_yaml,
    load_imagefolder,
    load_list_files,
)
from medsweep.datasets.spec import SPLITS, DatasetSpec, Sample
from medsweep.datasets.synthetic import make_synthetic

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "DatasetSpec",
    "Sample",
    "apply_label_fraction",
    "load_csv",
    "load_dataset",
    "load_dataset_yaml",
    "load_image",
    "load_imagefolder",
    "load_list_files",
    "make_synthetic",
    "resize_square",
]
