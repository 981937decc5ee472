"""Cross-domain transfer module: the cross-domain work's frt mode with its 300 centres."""

from optuna.distributions import CategoricalDistribution

from medsweep.spaces._record import MethodSpace
from medsweep.spaces._rules import Rule
from medsweep.spaces.tables import CDTM_NUM_CENTERS, CROSS_DOMAIN_TRAINING

RULES: dict[str, Rule] = {"num_centers": Rule(int, low=1), "mlp_ratio": Rule(float, low=0, low_open=True)}

SPACE = MethodSpace(
    name="cdtm",
    order=90,
    rules=RULES,
    recommended={**CROSS_DOMAIN_TRAINING, "num_centers": CDTM_NUM_CENTERS},
    source="cross-domain fine-tuning (JBHI 2023) frt mode (CDTM, 300 centres): Adam lr 1e-4, L2 1e-3, warm-up 2, batch 8, 100 epochs",
    searched={"num_centers": CategoricalDistribution((100, 200, 300, 400))},
)
