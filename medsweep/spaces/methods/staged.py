"""Staged fine-tuning: the cross-domain work's 100 frozen epochs, then 100 unfrozen at lr / 10."""

from collections.abc import Mapping
from typing import Any

from optuna.distributions import CategoricalDistribution

from medsweep.spaces._record import MethodSpace
from medsweep.spaces._rules import Rule
from medsweep.spaces.methods.cdtm import RULES as CDTM_RULES
from medsweep.spaces.tables import CROSS_DOMAIN_TRAINING, STAGED_STAGE1_EPOCHS

STAGE1 = ("linear", "cdtm")  # what trains on the frozen backbone in stage 1


def stage2_has_epochs(values: Mapping[str, Any]) -> str | None:
    if "stage1_epochs" in values and "epochs" in values and values["stage1_epochs"] >= values["epochs"]:
        return (
            f"stage1_epochs ({values['stage1_epochs']}) must be below epochs ({values['epochs']}): "
            "epochs counts both stages, and stage 2 needs at least one"
        )
    return None


SPACE = MethodSpace(
    name="staged",
    order=100,
    rules={**CDTM_RULES, "stage1": Rule(str, choices=STAGE1), "stage1_epochs": Rule(int, low=1)},
    recommended={
        **CROSS_DOMAIN_TRAINING,
        "epochs": 2 * CROSS_DOMAIN_TRAINING["epochs"],
        "stage1": "cdtm",
        "stage1_epochs": STAGED_STAGE1_EPOCHS,
    },
    source="cross-domain staged fine-tuning: 100 frozen epochs (CDTM) then 100 unfrozen at lr / 10; Adam lr 1e-4, L2 1e-3, batch 8",
    searched={
        "stage1": CategoricalDistribution(STAGE1),
        "stage1_epochs": CategoricalDistribution((25, 50, 100)),
    },
    checks=(stage2_has_epochs,),
)
