"""medsweep: find the best PETL method and hyperparameters for a medical image dataset.

The four sub-packages are the four concerns (see README "Architecture"):
``datasets`` (images in, tensors and preload stores out), ``trainables``
(backbones, methods, the training loop, metrics and their statistics),
``spaces`` (search spaces and published recommended tables, pure data) and
``search`` (Ray Tune + Optuna orchestration). Dependencies point one way:
search -> trainables -> datasets, search -> spaces, trainables -> spaces (a
config checks its fields with the rules of the method's record there).
"""

__version__ = "0.1.0"
