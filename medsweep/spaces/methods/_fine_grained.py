"""What FPT and FPT+ share: their keys' rules, searched values, training recipe and per-dataset lr."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optuna.distributions import CategoricalDistribution, FloatDistribution

from medsweep.spaces._record import Distribution, MethodSpace, Recommendation
from medsweep.spaces._rules import Rule
from medsweep.spaces.tables import (
    FPT_DEFAULT_LR,
    FPT_KEEP_RATIO,
    FPT_LEARNING_RATES,
    FPT_NUM_PROMPTS,
    FPT_SIDE_REDUCTION,
    FPT_TRAINING,
)

RULES: dict[str, Rule] = {
    "keep_ratio": Rule(float, low=0, high=1, low_open=True),
    "preload_keep_ratio": Rule(float, low=0, high=1, low_open=True),
    "num_prompts": Rule(int, low=1),
    # 0: the method derives it from the frozen input size (1/4 for FPT+, 7/16 for FPT).
    "side_image_size": Rule(int, low=0),
    "side_reduction": Rule(int, low=1),
    "fusion_dropout": Rule(float, low=0, high=1, high_open=True),
    "token_importance": Rule(str, choices=("global", "class_token")),
    # The official frozen ViT's position-embedding interpolation (not searched; see methods/fpt.py).
    "legacy_vit_embeddings": Rule(bool),
}
# Before a sweep launches: at least 8 px, the smallest image any method input accepts (a built
# method checks the side input against its backbone's patch).
LAUNCH_RULES: dict[str, Rule] = {"side_image_size": Rule(int, low=8, special=(0,))}


def keep_within_preload(values: Mapping[str, Any]) -> str | None:
    if "keep_ratio" in values and "preload_keep_ratio" in values and values["keep_ratio"] > values["preload_keep_ratio"]:
        return (
            f"keep_ratio {values['keep_ratio']} exceeds preload_keep_ratio {values['preload_keep_ratio']}: "
            "set preload_keep_ratio to the largest keep_ratio of the search"
        )
    return None


SEARCHED: dict[str, Distribution] = {
    # The preload stores the most important tokens up to the largest keep ratio a
    # sweep uses and a trial keeps a prefix, so the upper bound sets the store size
    # (0.5: 2.5x the store of the published 0.2).
    "keep_ratio": FloatDistribution(0.05, 0.5),
    "num_prompts": CategoricalDistribution((4, 8, 16, 32, 64)),
    # The side network is small, so every batch here fits where 16 does.
    "batch_size": CategoricalDistribution((8, 16, 32)),
}


def recommended(side_image_size: int) -> dict[str, Any]:
    """The official training defaults with the side input at the 512 px frozen input."""
    return {
        "lr": FPT_DEFAULT_LR,
        **FPT_TRAINING,
        "keep_ratio": FPT_KEEP_RATIO,
        "num_prompts": FPT_NUM_PROMPTS,
        "side_image_size": side_image_size,
        "side_reduction": FPT_SIDE_REDUCTION,
    }


def recommend(space: MethodSpace, dataset: str | None, fraction: float | None, weights: str | None) -> Recommendation:
    """The official per-dataset lr where the FPT configs publish one, else the default lr."""
    point = {"method": space.name, **space.recommended}
    name = (dataset or "").lower()
    if name in FPT_LEARNING_RATES:
        point["lr"] = FPT_LEARNING_RATES[name]
        return Recommendation(point, f"{space.source}; lr {point['lr']:g} from FPT configs/dataset/{name}.yaml")
    which = f"no published lr for dataset {dataset!r}" if dataset else "no dataset given"
    return Recommendation(point, f"{space.source}; {which}: lr {point['lr']:g}, whose x/÷10 range covers all 8 published FPT lrs")
