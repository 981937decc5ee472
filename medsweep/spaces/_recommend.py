"""The recommended flat config of a method, and where it comes from.

A recommendation is the point a sweep evaluates first and the centre of the
method's search space. For LoRA it also carries one recipe per optimizer
(lr, weight decay, epochs), because the LoRA-medical tables publish an SGD
recipe (MRM) and an AdamW recipe (CXR_MAE) for the same dataset and fraction,
and the space searches the optimizer between the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medsweep.errors import ConfigError
from medsweep.spaces._schema import check_method
from medsweep.spaces.tables import (
    FPT_LEARNING_RATES,
    LORA_DATASET_LABEL,
    LORA_DEFAULT_ROWS,
    LORA_TABLE_SECTION,
    LORA_WEIGHT_DECAY,
    LORA_WEIGHTS_FOR_OPTIMIZER,
    LORA_WEIGHTS_LABEL,
    METHOD_DEFAULT_SOURCES,
    METHOD_DEFAULTS,
    LoraRow,
    lora_recommended,
)


@dataclass(frozen=True)
class Recommendation:
    """A method's recommended flat config (``method`` included) and its source.

    ``recipes`` maps each optimizer the space may choose to the keys that change
    with it; empty for methods whose optimizer is fixed.
    """

    point: dict[str, Any]
    source: str
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)


def recommendation(
    method: str,
    *,
    dataset: str | None = None,
    fraction: float | None = None,
    weights: str | None = None,
) -> Recommendation:
    """Build the recommendation of ``method`` for a dataset, label fraction (%) and LoRA checkpoint.

    A dataset without a published value falls back to the method default
    (sweeping a new dataset is the normal case); asking for LoRA ``weights``
    with a dataset or fraction outside the tables is an error, because the
    caller explicitly asked for a published row.
    """
    check_method(method)
    if method == "lora":
        return _lora(dataset, fraction, weights)
    if weights is not None:
        raise ConfigError(f"weights={weights!r} selects a LoRA-medical table; method {method!r} has none")
    point = {"method": method, **METHOD_DEFAULTS[method]}
    source = METHOD_DEFAULT_SOURCES[method]
    if method in ("fpt", "fpt_plus"):
        name = (dataset or "").lower()
        if name in FPT_LEARNING_RATES:
            point["lr"] = FPT_LEARNING_RATES[name]
            source = f"{source}; lr {point['lr']:g} from FPT configs/dataset/{name}.yaml"
        else:
            which = f"no published lr for dataset {dataset!r}" if dataset else "no dataset given"
            source = f"{source}; {which}: lr {point['lr']:g}, whose x/÷10 range covers all 8 published FPT lrs"
    return Recommendation(point, source)


def recommended(
    method: str,
    *,
    dataset: str | None = None,
    fraction: float | None = None,
    weights: str | None = None,
) -> dict[str, Any]:
    """The recommended flat trial config of ``method`` (``method`` key included).

    LoRA with ``weights`` (mrm / cxr_mae), ``dataset`` (nih / chexpert / rsna)
    and ``fraction`` (1 / 10 / 100 %) gets its LoRA-medical table row with the
    lr made absolute (CXR_MAE: base x 64 / 256); FPT and FPT+ get the official
    per-dataset lr. Everything else is the method default (see ``tables``).
    """
    return dict(recommendation(method, dataset=dataset, fraction=fraction, weights=weights).point)


def _lora(dataset: str | None, fraction: float | None, weights: str | None) -> Recommendation:
    """LoRA: the table row of ``weights`` when asked for, otherwise the table-median defaults."""
    if weights is None:
        rows = LORA_DEFAULT_ROWS
        optimizer = METHOD_DEFAULTS["lora"]["optimizer"]
        source = METHOD_DEFAULT_SOURCES["lora"]
    else:
        if dataset is None or fraction is None:
            raise ConfigError("LoRA weights need a dataset (nih, chexpert, rsna) and a fraction (1, 10, 100)")
        # Both checkpoints' rows for this task: the chosen one is the recommendation,
        # the other is the only published recipe for the other optimizer.
        rows = {opt: lora_recommended(w, dataset, fraction) for opt, w in LORA_WEIGHTS_FOR_OPTIMIZER.items()}
        optimizer = lora_recommended(weights, dataset, fraction).optimizer
        source = _lora_source(weights, dataset, fraction, rows[optimizer])
    row = rows[optimizer]
    point = {
        "method": "lora",
        **METHOD_DEFAULTS["lora"],
        **_lora_recipe(row),
        "optimizer": optimizer,
        "rank": row.rank,
    }
    return Recommendation(point, source, {opt: _lora_recipe(r) for opt, r in rows.items()})


def _lora_recipe(row: LoraRow) -> dict[str, Any]:
    """The keys that change with the optimizer: absolute lr, weight decay, epochs."""
    return {"lr": row.absolute_lr, "weight_decay": LORA_WEIGHT_DECAY[row.optimizer], "epochs": row.epochs}


def _lora_source(weights: str, dataset: str, fraction: float, row: LoraRow) -> str:
    weights, dataset = weights.lower(), dataset.lower()
    source = (
        f"LoRA-medical README table {LORA_TABLE_SECTION[weights]}, {LORA_WEIGHTS_LABEL[weights]}, "
        f"{LORA_DATASET_LABEL[dataset]} {fraction:g}%"
    )
    if row.optimizer == "adamw":
        source += f" (base lr {row.lr:g} x 64/256 = {row.absolute_lr:g})"
    return source
