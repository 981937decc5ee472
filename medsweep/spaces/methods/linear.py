"""Linear probe: the cross-domain work's linear mode; any batch fits a head, so batch size is searched."""

from optuna.distributions import CategoricalDistribution

from medsweep.spaces._record import MethodSpace
from medsweep.spaces.tables import CROSS_DOMAIN_TRAINING

SPACE = MethodSpace(
    name="linear",
    order=10,
    rules={},
    recommended=dict(CROSS_DOMAIN_TRAINING),
    source="cross-domain fine-tuning (JBHI 2023) linear mode: Adam lr 1e-4, L2 1e-3, warm-up 2, batch 8, 100 epochs",
    searched={"batch_size": CategoricalDistribution((8, 16, 32, 64))},
)
