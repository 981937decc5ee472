"""Published hyperparameters, encoded as plain data, shared by several methods.

Everything here is either copied from a public work (and says where) or a
stated default (and says why). A method's own recommended point, and the source
it cites, is in its record (:mod:`medsweep.spaces.methods`), built from these.
Search spaces are centred on these values, so a
sweep starts from what the authors ran rather than from a guess.

Sources (see ``/work/shared/reference`` and DESIGN.md):

* LoRA-medical: "Less Could Be Better: Parameter-efficient Fine-tuning Advances
  Medical Vision Foundation Models", README section 5 and the official code
  (github RL4M/MED-PEFT).
* FPT / FPT+: the official configs and code (github YijinHuang/FPT, HEAD 8fa801f6).
* Cross-domain fine-tuning (JBHI 2023): README commands and
  ``CODE/config_clip_vit.py`` (github qklee-lz/CDTM).
* Truncated transfer learning (BMVC 2023): README and ``main.py`` (github PL97/TTL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medsweep.errors import ConfigError

# -- Loss weighting, layer-wise lr decay, which parameters decay ----------------------

# The three settings at what the works below do unless they say otherwise: an unweighted loss
# (none of LoRA-medical, FPT, cross-domain weighs classes), no layer-wise lr decay, and weight
# decay on >=2-D weights only (LoRA-medical's and the timm/MAE rule: no decay on biases, norms, tokens).
PLAIN_TRAINING: dict[str, Any] = {"class_weights": "none", "layer_decay": 1.0, "decay": "matrices"}

# -- LoRA-medical -------------------------------------------------------------------

LORA_WEIGHTS: tuple[str, ...] = ("mrm", "cxr_mae")
LORA_DATASETS: tuple[str, ...] = ("nih", "chexpert", "rsna")
LORA_FRACTIONS: tuple[int, ...] = (1, 10, 100)  # percent of the training labels

LORA_ALPHA = 32
LORA_DROPOUT = 0.1
LORA_BATCH_SIZE = 64
LORA_IMAGE_SIZE = 224
LORA_WARMUP_EPOCHS = 5  # then per-iteration cosine to 1e-6
LORA_LR_BASE_BATCH = 256  # AdamW rows publish a base lr: lr = base x batch / 256
LORA_WEIGHT_DECAY = {"sgd": 0.0, "adamw": 0.05}  # AdamW: on >=2-D params only
LORA_SGD_MOMENTUM = 0.9
LORA_ADAMW_LAYER_DECAY = 0.65  # AdamW rows only; SGD rows use none
LORA_LAYER_DECAY = {"sgd": 1.0, "adamw": LORA_ADAMW_LAYER_DECAY}  # per optimizer, as above
LORA_GRAD_CLIP = 0.0  # the MAE fine-tuning code clips nothing by default


@dataclass(frozen=True)
class LoraRow:
    """One row of the LoRA-medical recommended tables (README section 5).

    ``lr`` is the value as published: absolute for the SGD rows (MRM, table
    5.1) and a *base* lr for the AdamW rows (CXR_MAE, table 5.2), which the
    code scales by batch / 256. :attr:`absolute_lr` applies that scaling so
    callers never mix the two.
    """

    epochs: int
    optimizer: str
    lr: float
    rank: int

    @property
    def absolute_lr(self) -> float:
        """Peak lr the optimizer sees at the published batch size of 64."""
        if self.optimizer == "adamw":
            return self.lr * LORA_BATCH_SIZE / LORA_LR_BASE_BATCH
        return self.lr


# (weights, dataset, fraction %) -> row, exactly as README tables 5.1 and 5.2 print them.
LORA_TABLE: dict[tuple[str, str, int], LoraRow] = {
    # 5.1 MRM pre-trained weights: SGD, absolute learning rate.
    ("mrm", "nih", 1): LoraRow(epochs=100, optimizer="sgd", lr=0.05, rank=4),
    ("mrm", "nih", 10): LoraRow(epochs=100, optimizer="sgd", lr=0.05, rank=8),
    ("mrm", "nih", 100): LoraRow(epochs=100, optimizer="sgd", lr=0.2, rank=32),
    ("mrm", "chexpert", 1): LoraRow(epochs=100, optimizer="sgd", lr=0.02, rank=4),
    ("mrm", "chexpert", 10): LoraRow(epochs=100, optimizer="sgd", lr=0.05, rank=16),
    ("mrm", "chexpert", 100): LoraRow(epochs=100, optimizer="sgd", lr=0.01, rank=32),
    ("mrm", "rsna", 1): LoraRow(epochs=100, optimizer="sgd", lr=0.01, rank=4),
    ("mrm", "rsna", 10): LoraRow(epochs=100, optimizer="sgd", lr=0.01, rank=32),
    ("mrm", "rsna", 100): LoraRow(epochs=100, optimizer="sgd", lr=0.01, rank=32),
    # 5.2 CXR_MAE pre-trained weights: AdamW, *base* learning rate.
    ("cxr_mae", "nih", 1): LoraRow(epochs=400, optimizer="adamw", lr=3e-3, rank=4),
    ("cxr_mae", "nih", 10): LoraRow(epochs=200, optimizer="adamw", lr=1e-3, rank=8),
    ("cxr_mae", "nih", 100): LoraRow(epochs=100, optimizer="adamw", lr=3e-3, rank=32),
    ("cxr_mae", "chexpert", 1): LoraRow(epochs=400, optimizer="adamw", lr=3e-3, rank=4),
    ("cxr_mae", "chexpert", 10): LoraRow(epochs=100, optimizer="adamw", lr=5e-3, rank=8),
    ("cxr_mae", "chexpert", 100): LoraRow(epochs=100, optimizer="adamw", lr=3e-3, rank=32),
    ("cxr_mae", "rsna", 1): LoraRow(epochs=100, optimizer="adamw", lr=3e-3, rank=4),
    ("cxr_mae", "rsna", 10): LoraRow(epochs=100, optimizer="adamw", lr=5e-3, rank=8),
    ("cxr_mae", "rsna", 100): LoraRow(epochs=100, optimizer="adamw", lr=5e-3, rank=32),
}

# How the README names things, for messages and recommendation sources.
LORA_WEIGHTS_LABEL = {"mrm": "MRM", "cxr_mae": "CXR_MAE"}
LORA_TABLE_SECTION = {"mrm": "5.1", "cxr_mae": "5.2"}
LORA_DATASET_LABEL = {"nih": "NIH", "chexpert": "CheXpert", "rsna": "RSNA"}

# Which checkpoint's table holds each optimizer: the only published value per optimizer.
LORA_WEIGHTS_FOR_OPTIMIZER = {"sgd": "mrm", "adamw": "cxr_mae"}

# Without a checkpoint from the tables: the median of each table (SGD 0.02 of
# 0.01-0.2, AdamW base 3e-3 of 1e-3-5e-3, both also covered x/÷10 by the space),
# rank 8 (median of table 5.2) and 100 epochs (the mode of both tables).
LORA_DEFAULT_ROWS = {
    "sgd": LoraRow(epochs=100, optimizer="sgd", lr=0.02, rank=8),
    "adamw": LoraRow(epochs=100, optimizer="adamw", lr=3e-3, rank=8),
}
LORA_DEFAULT_OPTIMIZER = "adamw"  # AdamW is also how the FPT works ran their LoRA baseline


def _choice(kind: str, value: Any, valid: tuple[Any, ...]) -> Any:
    """Normalise ``value`` (case-insensitive for names) or refuse it naming the valid ones."""
    key = value.lower() if isinstance(value, str) else value
    if isinstance(key, bool) or key not in valid:
        names = ", ".join(str(v) for v in valid)
        raise ConfigError(f"unknown LoRA-medical {kind} {value!r}; the tables cover: {names}")
    return valid[valid.index(key)]


def lora_recommended(weights: str, dataset: str, fraction: float) -> LoraRow:
    """The LoRA-medical row for a checkpoint (mrm / cxr_mae), dataset and label fraction in %."""
    key = (
        _choice("weights", weights, LORA_WEIGHTS),
        _choice("dataset", dataset, LORA_DATASETS),
        _choice("fraction (percent)", fraction, LORA_FRACTIONS),
    )
    return LORA_TABLE[key]


# -- FPT / FPT+ --------------------------------------------------------------------

# learning_rate in the official configs/dataset/<name>.yaml.
FPT_LEARNING_RATES: dict[str, float] = {
    "messidor2": 2e-4,
    "ddr": 5e-4,
    "isic2016": 5e-3,
    "isic2018": 1e-4,
    "ddsm": 1e-3,
    "cmmd": 5e-5,
    "covid": 1e-4,
    "chncxr": 5e-4,
}
# No published lr for other datasets: 5e-4 is the published value whose x/÷10
# range (the space's lr bounds) covers all eight published rates (5e-5..5e-3).
FPT_DEFAULT_LR = 5e-4

# Training setup of the official code: AdamW on all params, per-iteration cosine
# to 0, no warm-up, grad-norm clip 1, validation each epoch.
FPT_EPOCHS = 20
FPT_BATCH_SIZE = 16
FPT_WEIGHT_DECAY = 0.1
FPT_WARMUP_EPOCHS = 0
FPT_GRAD_CLIP = 1.0
FPT_KEEP_RATIO = 0.2
FPT_NUM_PROMPTS = 16
FPT_SIDE_REDUCTION = 8  # side hidden = frozen hidden / 8 (768 -> 96)
FPT_FROZEN_IMAGE_SIZE = 512

FPT_TRAINING: dict[str, Any] = {
    **PLAIN_TRAINING,
    "decay": "all",  # the official code hands every trainable parameter to AdamW with weight decay 0.1
    "weight_decay": FPT_WEIGHT_DECAY,
    "optimizer": "adamw",
    "warmup_epochs": FPT_WARMUP_EPOCHS,
    "epochs": FPT_EPOCHS,
    "batch_size": FPT_BATCH_SIZE,
    "grad_clip": FPT_GRAD_CLIP,
    "seed": 0,
    "precision": "fp32",  # a run setting: the sweep sets it from --precision
    "accumulate_steps": 1,
}

# -- Cross-domain fine-tuning and TTL ----------------------------------------------

# Cross-domain README commands (--init-lr 1e-4 --batch-size 8 --epochs 100
# --warmup_epochs 2) and config_clip_vit.py (Adam, L2 weight decay 1e-3); the
# code uses AMP and no gradient clipping.
CROSS_DOMAIN_TRAINING: dict[str, Any] = {
    **PLAIN_TRAINING,
    "lr": 1e-4,
    "weight_decay": 1e-3,
    "optimizer": "adam",
    "warmup_epochs": 2,
    "epochs": 100,
    "batch_size": 8,
    "grad_clip": 0.0,
    "seed": 0,
    "precision": "fp32",  # a run setting: the sweep sets it from --precision
    "accumulate_steps": 1,
}
CDTM_NUM_CENTERS = 300  # config_clip_vit.py MODEL.FRT.centers
# Staged fine-tuning re-runs the same 100-epoch command from the stage-1 best
# checkpoint with everything unfrozen and lr / 10; ``epochs`` counts both stages.
STAGED_STAGE1_EPOCHS = 100

# TTL main.py: Adam lr 1e-4, no weight decay, no clipping; README: batch 64,
# --max_epoch 200 (ReduceLROnPlateau there, stopping at lr < 1e-6).
# utils/settings.py weighs every dataset's loss by inverse class frequency (HAM10000 and
# BIMCV: CrossEntropyLoss(weight=...); CheXpert multi-label: BCEWithLogitsLoss(pos_weight=...)).
TTL_TRAINING: dict[str, Any] = {
    **PLAIN_TRAINING,
    "class_weights": "balanced",
    "lr": 1e-4,
    "weight_decay": 0.0,
    "optimizer": "adam",
    "warmup_epochs": 0,
    "epochs": 200,
    "batch_size": 64,
    "grad_clip": 0.0,
    "seed": 0,
    "precision": "fp32",  # a run setting: the sweep sets it from --precision
    "accumulate_steps": 1,
}
# The published block-wise runs compare truncation 1, 2, 3 and -1 (whole net);
# no single value is recommended. 3 (drop only the last block) is our default:
# the mildest truncation, and the space searches all four.
TTL_TRUNCATION = 3
