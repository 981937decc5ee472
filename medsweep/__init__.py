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

__version__ = "0.1.0"
