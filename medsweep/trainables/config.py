"""The keys of a trial's flat config: training hyperparameters, method fields, and what is no hyperparameter.

A trial's config is one flat dict. Its keys fall into four groups, each the
fields of one dataclass here (or of the method's config), so every list of keys
elsewhere is derived from these:

* ``method``: the registered name of the method;
* :class:`TrainConfig`: how the trial trains (lr, optimizer, epochs...);
* the method's config (a subclass of :class:`MethodConfig`): its own fields
  (``rank``, ``keep_ratio``...) and the common ones (backbone, image size,
  number of classes, task);
* :class:`Placement`: where the trial runs and which store it reads, added by
  the sweep (``search``) and read by its trial runner; the loop ignores them.

Fields marked ``NOT_SEARCHED`` in their metadata describe the data, backbone,
budget or placement rather than a choice a search makes:
:data:`NOT_HYPERPARAMETERS` lists them (with ``method``). Key names are unique
across the groups. Values are checked with the rules of :mod:`medsweep.spaces`,
the same rules a sweep validates its configs with before launch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from medsweep.errors import ConfigError
from medsweep.spaces import (
    CLASS_WEIGHTS,
    CONTEXT_CHECKS,
    CONTEXT_RULES,
    DECAY_RULES,
    OPTIMIZERS,
    TRAIN_RULES,
    check_method_config,
    config_keys,
    problem_of,
    refuse_unknown,
)

HYPERPARAMETER = "hyperparameter"  # field metadata key: False on fields no search chooses


def not_searched(help: str) -> dict[str, Any]:
    """Field metadata of a key that is no hyperparameter (data, backbone, budget, placement)."""
    return {"help": help, HYPERPARAMETER: False}


@dataclass
class TrainConfig:
    """How one trial trains. Defaults follow the official FPT training setup."""

    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (absolute, after any batch scaling)"})
    weight_decay: float = field(default=0.1, metadata={"help": "weight decay (on the parameters `decay` names)"})
    optimizer: str = field(
        default="adamw", metadata={"help": f"one of {', '.join(OPTIMIZERS)}: AdamW (FPT), SGD with momentum 0.9 (LoRA-medical MRM), Adam (TTL)"}
    )
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear warm-up before the per-iteration cosine decay"})
    epochs: int = field(default=20, metadata=not_searched("maximum epochs (early stopping may end sooner)"))
    batch_size: int = field(default=16, metadata={"help": "global batch size (split across DDP workers)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm; 0 disables clipping"})
    seed: int = field(default=0, metadata=not_searched("seed for weights init, shuffling and augmentation"))
    class_weights: str = field(
        default="none",
        metadata={"help": f"one of {', '.join(CLASS_WEIGHTS)}: balanced weighs the training loss by inverse class frequency (TTL)"},
    )
    layer_decay: float = field(
        default=1.0, metadata={"help": "ViT layer-wise lr decay: block i of L trains at lr x decay^(L-i); 1 = off (LoRA-medical AdamW: 0.65)"}
    )
    decay: str = field(
        default="matrices",
        metadata={"help": f"one of {', '.join(DECAY_RULES)}: which trainable parameters weight decay applies to (FPT: all)"},
    )
    precision: str = field(
        default="fp32", metadata=not_searched("compute precision of the training step (autocast); a sweep sets it from --precision")
    )
    accumulate_steps: int = field(
        default=1, metadata={"help": "micro-batches per optimizer step; batch_size stays the effective batch (each micro-batch is batch_size / this)"}
    )

    def __post_init__(self) -> None:
        problem = problem_of(TRAIN_RULES, (), dataclasses.asdict(self))
        if problem:
            raise ConfigError(problem)
        self.micro_batch_size(1)

    def micro_batch_size(self, workers: int) -> int:
        """Images per forward on each of ``workers`` DDP workers: the effective ``batch_size`` split
        over workers and ``accumulate_steps``. When accumulating, their product must divide it (else the
        effective batch would drift from the searched one); without, the split rounds down as it always has."""
        parts = self.accumulate_steps * workers
        if self.accumulate_steps == 1:
            return max(1, self.batch_size // workers)
        if self.batch_size % parts:
            raise ConfigError(
                f"batch_size {self.batch_size} is not divisible by accumulate_steps {self.accumulate_steps} x {workers} worker(s); "
                f"set a batch_size that is a multiple of {parts}, or another accumulate_steps"
            )
        return self.batch_size // parts

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The training keys of a flat trial config; a key of no group of the trial config is refused."""
        refuse_unknown("a trial config", values, trial_keys(values.get("method")))
        own = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in own})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class MethodConfig:
    """Fields every method has. Subclasses add their own, each with a default and help.

    Every field a subclass adds has a rule in the method's record in
    :mod:`medsweep.spaces.methods`; ``__post_init__`` checks all fields with
    those rules, so a subclass needs no ``__post_init__`` of its own.
    """

    # The registered method name, set by ``register_method``: which record's rules apply.
    method: ClassVar[str] = ""

    backbone: str = field(default="vit-tiny", metadata=not_searched("registered backbone name, local save_pretrained folder, or hub id"))
    image_size: int = field(default=64, metadata=not_searched("input resolution of the (frozen or tuned) backbone"))
    num_classes: int = field(default=2, metadata=not_searched("number of classes (set from the dataset)"))
    task: str = field(default="multiclass", metadata=not_searched("multiclass (softmax/CE) or multilabel (sigmoid/BCE)"))

    def __post_init__(self) -> None:
        values = self.to_dict()
        problem = problem_of(CONTEXT_RULES, CONTEXT_CHECKS, values)
        if problem:
            raise ConfigError(problem)
        if self.method:
            check_method_config(self.method, {k: v for k, v in values.items() if k not in CONTEXT_RULES})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MethodConfig:
        """The method's fields of a flat trial config; keys of the other groups are ignored, others refused."""
        known = cls.field_names()
        allowed = (*(f.name for f in fields(cls)), "method", *(f.name for f in fields(TrainConfig)), *PLACEMENT_KEYS)
        refuse_unknown(f"method {cls.method or cls.__name__!r}", values, allowed)
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class Placement:
    """Where a trial runs and what it reads: set by the sweep for every trial, read by its runner.

    ``exported`` fields go into the leaderboard with the trial's config (the
    DDP worker count changes how a trial trains); the others are plumbing.
    """

    workers: int = field(default=1, metadata={**not_searched("DDP workers, one whole GPU each (methods that run DDP)"), "exported": True})
    cpus_per_trial: float = field(default=1.0, metadata=not_searched("CPUs the trial reserves (and torch threads it uses)"))
    gpus_per_trial: float = field(default=0.0, metadata=not_searched("GPU fraction the trial reserves"))
    store_key: str = field(default="", metadata=not_searched("key of the preload store the trial reads"))


PLACEMENT_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Placement))
# Placement keys that are plumbing only: not part of a trial's exported config.
PLUMBING_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Placement) if not f.metadata.get("exported"))
NOT_HYPERPARAMETERS: tuple[str, ...] = (
    "method",
    *(f.name for group in (MethodConfig, TrainConfig, Placement) for f in fields(group) if f.metadata.get(HYPERPARAMETER) is False),
)


def trial_keys(method: str | None) -> tuple[str, ...]:
    """Every key a flat trial config of ``method`` may hold (without a method: all but method fields).

    A method's own fields are read off its record in :mod:`medsweep.spaces` (whose rules cover
    exactly its config's fields, as ``tests/test_method_records.py`` checks), not off the
    registry: the registry's module imports this one.
    """
    method_fields = config_keys(method) if method else ()
    common = ("method", *(f.name for f in fields(TrainConfig)), *(f.name for f in fields(MethodConfig)))
    return (*dict.fromkeys((*common, *method_fields)), *PLACEMENT_KEYS)
