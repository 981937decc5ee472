"""LoRA: the LoRA-medical tables (one recipe per optimizer), or their medians without a checkpoint.

A recommendation carries one recipe per optimizer (lr, weight decay, epochs),
because the LoRA-medical tables publish an SGD recipe (MRM) and an AdamW recipe
(CXR_MAE) for the same dataset and fraction, and the space searches the
optimizer between the two.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optuna.distributions import CategoricalDistribution

from medsweep.errors import ConfigError
from medsweep.spaces._record import MethodSpace, Recommendation
from medsweep.spaces._rules import Rule
from medsweep.spaces.tables import (
    LORA_ALPHA,
    LORA_BATCH_SIZE,
    LORA_DATASET_LABEL,
    LORA_DEFAULT_OPTIMIZER,
    LORA_DEFAULT_ROWS,
    LORA_DROPOUT,
    LORA_GRAD_CLIP,
    LORA_LAYER_DECAY,
    LORA_TABLE_SECTION,
    LORA_WARMUP_EPOCHS,
    LORA_WEIGHT_DECAY,
    LORA_WEIGHTS,
    LORA_WEIGHTS_FOR_OPTIMIZER,
    LORA_WEIGHTS_LABEL,
    PLAIN_TRAINING,
    LoraRow,
    lora_recommended,
)

# The attention projections LoRA may adapt (``target_modules`` is a comma-separated list of them).
PROJECTIONS: tuple[str, ...] = ("query", "key", "value", "output")


def _known_projections(values: Mapping[str, Any]) -> str | None:
    if "target_modules" not in values:
        return None
    names = [name.strip() for name in values["target_modules"].split(",") if name.strip()]
    if not names or set(names) - set(PROJECTIONS):
        return f"target_modules must name some of {', '.join(PROJECTIONS)} (comma-separated), got {values['target_modules']!r}"
    return None


def _recipe(row: LoraRow) -> dict[str, Any]:
    """The keys that change with the optimizer: absolute lr, weight decay, layer-wise lr decay, epochs."""
    return {
        "lr": row.absolute_lr,
        "weight_decay": LORA_WEIGHT_DECAY[row.optimizer],
        "layer_decay": LORA_LAYER_DECAY[row.optimizer],
        "epochs": row.epochs,
    }


def _source(weights: str, dataset: str, fraction: float, row: LoraRow) -> str:
    weights, dataset = weights.lower(), dataset.lower()
    source = (
        f"LoRA-medical README table {LORA_TABLE_SECTION[weights]}, {LORA_WEIGHTS_LABEL[weights]}, "
        f"{LORA_DATASET_LABEL[dataset]} {fraction:g}%"
    )
    if row.optimizer == "adamw":
        source += f" (base lr {row.lr:g} x 64/256 = {row.absolute_lr:g})"
    return source


def recommend(space: MethodSpace, dataset: str | None, fraction: float | None, weights: str | None) -> Recommendation:
    """The table row of ``weights`` when asked for, otherwise the table-median defaults."""
    if weights is None:
        rows = LORA_DEFAULT_ROWS
        optimizer = space.recommended["optimizer"]
        source = space.source
    else:
        if dataset is None or fraction is None:
            raise ConfigError("LoRA weights need a dataset (nih, chexpert, rsna) and a fraction (1, 10, 100)")
        # Both checkpoints' rows for this task: the chosen one is the recommendation,
        # the other is the only published recipe for the other optimizer.
        rows = {opt: lora_recommended(w, dataset, fraction) for opt, w in LORA_WEIGHTS_FOR_OPTIMIZER.items()}
        optimizer = lora_recommended(weights, dataset, fraction).optimizer
        source = _source(weights, dataset, fraction, rows[optimizer])
    row = rows[optimizer]
    point = {"method": space.name, **space.recommended, **_recipe(row), "optimizer": optimizer, "rank": row.rank}
    return Recommendation(point, source, {opt: _recipe(r) for opt, r in rows.items()})


_DEFAULT_ROW = LORA_DEFAULT_ROWS[LORA_DEFAULT_OPTIMIZER]

SPACE = MethodSpace(
    name="lora",
    order=50,
    rules={
        "rank": Rule(int, low=1),
        "alpha": Rule(float, low=0, low_open=True),  # published as 32; the LoRA scale alpha / rank is real
        "lora_dropout": Rule(float, low=0, high=1, high_open=True),
        "target_modules": Rule(str),
        "pool": Rule(str, choices=("cls", "mean")),
    },
    recommended={
        **PLAIN_TRAINING,  # no class weights, no decay on biases, norms, tokens (MAE's param_groups_lrd)
        "lr": _DEFAULT_ROW.absolute_lr,
        "weight_decay": LORA_WEIGHT_DECAY[LORA_DEFAULT_OPTIMIZER],
        "layer_decay": LORA_LAYER_DECAY[LORA_DEFAULT_OPTIMIZER],
        "optimizer": LORA_DEFAULT_OPTIMIZER,
        "warmup_epochs": LORA_WARMUP_EPOCHS,
        "epochs": _DEFAULT_ROW.epochs,
        "batch_size": LORA_BATCH_SIZE,
        "grad_clip": LORA_GRAD_CLIP,
        "seed": 0,
        "precision": "fp32",
        "accumulate_steps": 1,
        "rank": _DEFAULT_ROW.rank,
        "alpha": LORA_ALPHA,
        "lora_dropout": LORA_DROPOUT,
    },
    source="LoRA-medical defaults without a table row: AdamW base lr 3e-3 x 64/256, rank 8, 100 epochs, alpha 32, dropout 0.1",
    searched={"rank": CategoricalDistribution((4, 8, 16, 32))},
    checks=(_known_projections,),
    recommend=recommend,
    weights=LORA_WEIGHTS,
)
