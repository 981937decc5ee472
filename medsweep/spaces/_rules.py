"""What one value accepts (:class:`Rule`), the training keys' rules and the keys every method config has.

The rules here and in each method's record (:mod:`medsweep.spaces.methods`) are
the only statement of what a value may be: :func:`medsweep.spaces.validate`
checks a flat trial config with them before a sweep launches, and the config
dataclasses of :mod:`medsweep.trainables` check their fields with the same
rules in ``__post_init__`` (:func:`problem_of`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from medsweep.errors import ConfigError

# The optimizers a trial can use (``trainables.optimizers`` builds each one).
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "adam")
# How the training loss weighs classes: not at all, or by inverse frequency in the training split.
CLASS_WEIGHTS: tuple[str, ...] = ("none", "balanced")
# Which trainable parameters weight decay applies to: >=2-D weights only, or every one.
DECAY_RULES: tuple[str, ...] = ("matrices", "all")
# ``--precision`` of the frozen pass and of trials (``trainables.precision`` maps each to its dtype; auto resolves per device).
PRECISION_NAMES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Rule:
    """What one key accepts: a kind, optional bounds (inclusive unless ``*_open``) or choices.

    ``special`` values are accepted outside the bounds because they carry a
    meaning of their own (truncation -1: keep the whole network).
    """

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] = ()
    special: tuple[Any, ...] = ()

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is refused, or None when it is fine."""
        if not _is_kind(value, self.kind):
            return f"must be {self.kind.__name__}, got {value!r}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}, got {value!r}"
        if self.kind is float and not math.isfinite(value):
            return f"must be finite, got {value!r}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if (too_low or too_high) and value not in self.special:
            if self.high is None and not self.low_open and not self.special:
                return f"must be at least {self.low:g}, got {value!r}"
            special = "".join(f" or {v}" for v in self.special)
            return f"must be in {self._interval()}{special}, got {value!r}"
        return None

    def _interval(self) -> str:
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{left}{low}, {high}{right}"


def _is_kind(value: Any, kind: type) -> bool:
    """Type check that keeps bools out of numbers and lets ints stand for floats (YAML ``0``)."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, numbers.Integral)
    if kind is float:
        return isinstance(value, numbers.Real)
    return isinstance(value, kind)


# A check of several keys at once: the problem, or None when fine or when a key it needs is absent
# (so it runs on partial overrides and on a method config alone).
Check = Callable[[Mapping[str, Any]], "str | None"]

TRAIN_RULES: dict[str, Rule] = {
    "lr": Rule(float, low=0, low_open=True),
    "weight_decay": Rule(float, low=0),
    "optimizer": Rule(str, choices=OPTIMIZERS),
    "warmup_epochs": Rule(float, low=0),
    "epochs": Rule(int, low=1),
    "batch_size": Rule(int, low=1),
    "grad_clip": Rule(float, low=0),
    "seed": Rule(int),
    "class_weights": Rule(str, choices=CLASS_WEIGHTS),
    "layer_decay": Rule(float, low=0, high=1, low_open=True),
    "decay": Rule(str, choices=DECAY_RULES),
    "precision": Rule(str, choices=PRECISION_NAMES),
    "accumulate_steps": Rule(int, low=1),
}

# The fields every method config has. They describe the data and the backbone, not a choice a
# search makes, so they are not keys of a space; the sweep sets them for every trial.
CONTEXT_RULES: dict[str, Rule] = {
    "backbone": Rule(str),
    "image_size": Rule(int, low=8),  # the smallest image any method input accepts
    "num_classes": Rule(int, low=1),
    "task": Rule(str, choices=("multiclass", "multilabel")),
}


def _classes_fit_the_task(values: Mapping[str, Any]) -> str | None:
    if values.get("task") == "multiclass" and values.get("num_classes", 2) < 2:
        return f"a multi-class task needs at least 2 classes, got {values['num_classes']}"
    return None


CONTEXT_CHECKS: tuple[Check, ...] = (_classes_fit_the_task,)


def problem_of(rules: Mapping[str, Rule], checks: tuple[Check, ...], values: Mapping[str, Any]) -> str | None:
    """The first problem of ``values`` (``"key must ..."``) under ``rules`` then ``checks``, or None.

    Keys without a rule are not looked at: the caller decides which keys are known.
    """
    for key, value in values.items():
        problem = rules[key].problem(value) if key in rules else None
        if problem:
            return f"{key} {problem}"
    for check in checks:
        problem = check(values)
        if problem:
            return problem
    return None


def refuse_unknown(owner: str, values: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """One-line ConfigError naming the keys of ``values`` outside ``allowed``, and the allowed ones."""
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} for {owner}; allowed: {', '.join(allowed)}")
