"""Full fine-tuning: the cross-domain work's full mode; warm-up guards pretrained weights under full updates."""

from optuna.distributions import IntDistribution

from medsweep.spaces._record import MethodSpace
from medsweep.spaces.tables import CROSS_DOMAIN_TRAINING

SPACE = MethodSpace(
    name="full",
    order=20,
    rules={},
    recommended=dict(CROSS_DOMAIN_TRAINING),
    source="cross-domain fine-tuning (JBHI 2023) full mode: Adam lr 1e-4, L2 1e-3, warm-up 2, batch 8, 100 epochs",
    searched={"warmup_epochs": IntDistribution(0, 5)},
)
