"""medsweep: find the best PETL method and hyperparameters for a medical image dataset.

The four sub-packages are the four concerns (see README "Architecture"):
``datasets`` (images in, tensors and preload stores out), ``trainables``
(backbones, methods, the training loop, metrics and their statistics),
``spaces`` (search spaces and published recommended tables, pure data) and
``search`` (Ray Tune + Optuna orchestration). Dependencies point one way:
search -> trainables -> datasets, search -> spaces, trainables -> spaces (a
config checks its fields with the rules of the method's record there).
Inside ``search``, ``settings`` and ``study`` are the bottom (what a sweep is
set to and what it writes), the modules that run a sweep import them, and
``sweep`` / ``resume`` import those; ``tests/test_layering.py`` checks on the
source that no import runs in a circle.
"""

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def load_model(path: str | Path, device: Any = None) -> Any:  # an ExportedModel; torch is imported only when called
    """A model folder written by ``medsweep export`` as an ``nn.Module`` (images in, logits out);
    see :func:`medsweep.trainables.model_dir.load_model`. No sweep folder and no Ray needed."""
    from medsweep.trainables.model_dir import load_model as load

    return load(path, device)
