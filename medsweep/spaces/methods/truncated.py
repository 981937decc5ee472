"""Truncated transfer learning: TTL's training; the published block-wise truncations are searched."""

from optuna.distributions import CategoricalDistribution

from medsweep.spaces._record import MethodSpace
from medsweep.spaces._rules import Rule
from medsweep.spaces.tables import TTL_TRAINING, TTL_TRUNCATION

SPACE = MethodSpace(
    name="truncated",
    order=110,
    rules={
        # -1 keeps the whole network (TTL's convention); the upper bound depends on the backbone.
        "truncation": Rule(int, low=1, special=(-1,)),
        "granularity": Rule(str, choices=("block", "layer")),
        "pool": Rule(bool),
    },
    recommended={**TTL_TRAINING, "truncation": TTL_TRUNCATION, "granularity": "block"},
    source="TTL (BMVC 2023): Adam lr 1e-4, no weight decay, batch 64, 200 epochs; truncation 3 is our default among the published 1/2/3/-1",
    # TTL's published block-wise truncations; -1 keeps the whole network.
    searched={"truncation": CategoricalDistribution((1, 2, 3, -1))},
)
