"""The flat trial-config keys of every method and the rules their values must obey.

A trial config is one flat dict: ``method``, the training keys of
``TrainConfig`` and the method's own keys. :func:`validate` checks such a dict
(or the part of it a user overrides) before anything launches, so a bad value
fails in one line at the command line instead of inside a Ray worker an hour
into a sweep. The training-key rules mirror ``TrainConfig.__post_init__``;
``spaces`` imports nothing of ours but errors, hence the copy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from medsweep.errors import ConfigError

OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "adam")


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


TRAIN_RULES: dict[str, Rule] = {
    "lr": Rule(float, low=0, low_open=True),
    "weight_decay": Rule(float, low=0),
    "optimizer": Rule(str, choices=OPTIMIZERS),
    "warmup_epochs": Rule(float, low=0),
    "epochs": Rule(int, low=1),
    "batch_size": Rule(int, low=1),
    "grad_clip": Rule(float, low=0),
    "seed": Rule(int),
}

_FPT_RULES: dict[str, Rule] = {
    "keep_ratio": Rule(float, low=0, high=1, low_open=True),
    "num_prompts": Rule(int, low=1),
    # 0: the method derives it from the frozen input size (1/4 for FPT+, 7/16 for FPT);
    # otherwise at least 8 px, the smallest image any method input accepts.
    "side_image_size": Rule(int, low=8, special=(0,)),
    "side_reduction": Rule(int, low=1),
}

# Each method's own keys. The order of this table is the order methods are listed in.
METHOD_RULES: dict[str, dict[str, Rule]] = {
    "linear": {},
    "full": {},
    "fpt_plus": _FPT_RULES,
    "fpt": _FPT_RULES,
    "lora": {
        "rank": Rule(int, low=1),
        "alpha": Rule(float, low=0, low_open=True),  # published as 32; the LoRA scale alpha / rank is real
        "lora_dropout": Rule(float, low=0, high=1, high_open=True),
    },
    "adapter": {"bottleneck": Rule(int, low=1)},
    "prompt": {"num_prompts": Rule(int, low=1), "deep": Rule(bool)},
    "cdtm": {"num_centers": Rule(int, low=1)},
    "staged": {"stage1": Rule(str, choices=("linear", "cdtm")), "stage1_epochs": Rule(int, low=1)},
    # -1 keeps the whole network (TTL's convention); the upper bound depends on the backbone.
    "truncated": {"truncation": Rule(int, low=1, special=(-1,)), "granularity": Rule(str, choices=("block", "layer"))},
}

METHODS: tuple[str, ...] = tuple(METHOD_RULES)


def _stage2_has_epochs(values: Mapping[str, Any]) -> str | None:
    if "stage1_epochs" in values and "epochs" in values and values["stage1_epochs"] >= values["epochs"]:
        return (
            f"stage1_epochs ({values['stage1_epochs']}) must be below epochs ({values['epochs']}): "
            "epochs counts both stages, and stage 2 needs at least one"
        )
    return None


# Checks that involve more than one key, run once every single key passed.
_CROSS_CHECKS: dict[str, tuple[Callable[[Mapping[str, Any]], str | None], ...]] = {
    "staged": (_stage2_has_epochs,),
}


def check_method(method: str) -> str:
    """Return ``method`` if it is known, else fail naming every known method."""
    if method not in METHOD_RULES:
        raise ConfigError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    return method


def allowed_keys(method: str) -> tuple[str, ...]:
    """Every key a flat trial config of ``method`` may hold, ``method`` first."""
    return ("method", *TRAIN_RULES, *METHOD_RULES[check_method(method)])


def validate(method: str, values: Mapping[str, Any]) -> None:
    """Refuse an invalid (possibly partial) flat config of ``method`` with one clear ConfigError.

    Only the keys present are checked, so user overrides can be validated
    before they are merged with a space; a complete trial config is checked
    the same way.
    """
    allowed = allowed_keys(method)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} for method {method!r}; allowed: {', '.join(allowed)}"
        )
    if "method" in values and values["method"] != method:
        raise ConfigError(f"config says method {values['method']!r} but is validated as {method!r}")
    rules = {**TRAIN_RULES, **METHOD_RULES[method]}
    for key, value in values.items():
        problem = rules[key].problem(value) if key in rules else None
        if problem:
            raise ConfigError(f"{method}: {key} {problem}")
    for check in _CROSS_CHECKS.get(method, ()):
        problem = check(values)
        if problem:
            raise ConfigError(f"{method}: {problem}")
