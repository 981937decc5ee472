"""Training hyperparameters shared by every method (one flat namespace with method fields).

A trial's config is one flat dict: the keys below go to :class:`TrainConfig`,
the method's own keys (``rank``, ``keep_ratio``...) to its method config, and
``method`` names the method. Key names are unique across the two.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from medsweep.errors import ConfigError


@dataclass
class TrainConfig:
    """How one trial trains. Defaults follow the official FPT training setup."""

    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (absolute, after any batch scaling)"})
    weight_decay: float = field(default=0.1, metadata={"help": "decoupled weight decay on >=2-D weights"})
    optimizer: Literal["adamw", "sgd", "adam"] = field(default="adamw", metadata={"help": "adamw (FPT), sgd with momentum 0.9 (LoRA-medical MRM), adam (TTL)"})
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear warm-up before the per-iteration cosine decay"})
    epochs: int = field(default=20, metadata={"help": "maximum epochs (early stopping may end sooner)"})
    batch_size: int = field(default=16, metadata={"help": "global batch size (split across DDP workers)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm; 0 disables clipping"})
    seed: int = field(default=0, metadata={"help": "seed for weights init, shuffling and augmentation"})

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.optimizer not in ("adamw", "sgd", "adam"):
            raise ConfigError(f"optimizer must be adamw, sgd or adam, got {self.optimizer!r}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.warmup_epochs < 0 or self.grad_clip < 0:
            raise ConfigError("warmup_epochs and grad_clip must be >= 0")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
