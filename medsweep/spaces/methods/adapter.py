"""Bottleneck adapters: no medical table; the FPT pipeline's training with AdaptFormer's bottleneck."""

from optuna.distributions import CategoricalDistribution

from medsweep.spaces._record import MethodSpace
from medsweep.spaces._rules import Rule
from medsweep.spaces.tables import FPT_TRAINING

SPACE = MethodSpace(
    name="adapter",
    order=60,
    rules={"bottleneck": Rule(int, low=1)},
    # The FPT works ran adapters as a baseline in their pipeline; lr 1e-3 and bottleneck 64 are
    # reasonable defaults, not published for these data.
    recommended={**FPT_TRAINING, "lr": 1e-3, "bottleneck": 64},
    source="FPT pipeline training setup; AdamW lr 1e-3 and AdaptFormer-style bottleneck 64 (reasonable defaults, not published for medical data)",
    searched={"bottleneck": CategoricalDistribution((16, 32, 64, 128, 256))},
)
