"""The flat trial-config keys of every method and the check of such a config before launch.

A trial config is one flat dict: ``method``, the training keys of
``TrainConfig`` and the method's own keys (the rules of
:mod:`medsweep.spaces._rules` and of each method's record). :func:`validate`
checks such a dict (or the part of it a user overrides) before anything
launches, so a bad value fails in one line at the command line instead of
inside a Ray worker an hour into a sweep.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medsweep.errors import ConfigError
from medsweep.spaces._rules import TRAIN_RULES, problem_of, refuse_unknown
from medsweep.spaces.methods import record


def check_method(method: str) -> str:
    """Return ``method`` if it is known, else fail naming every known method."""
    return record(method).name


def allowed_keys(method: str) -> tuple[str, ...]:
    """The keys of ``method``'s recommended flat config, ``method`` first: training keys, then its published keys."""
    space = record(method)
    return ("method", *TRAIN_RULES, *(key for key in space.recommended if key not in TRAIN_RULES))


def config_keys(method: str) -> tuple[str, ...]:
    """Every key a flat trial config of ``method`` may hold: :func:`allowed_keys`, then the method's
    other config fields (which keep their config default unless fixed)."""
    allowed = allowed_keys(method)
    return (*allowed, *(key for key in record(method).rules if key not in allowed))


def validate(method: str, values: Mapping[str, Any]) -> None:
    """Refuse an invalid (possibly partial) flat config of ``method`` with one clear ConfigError.

    Only the keys present are checked, so user overrides can be validated
    before they are merged with a space; a complete trial config is checked
    the same way.
    """
    space = record(method)
    refuse_unknown(f"method {method!r}", values, config_keys(method))
    if "method" in values and values["method"] != method:
        raise ConfigError(f"config says method {values['method']!r} but is validated as {method!r}")
    rules = {**TRAIN_RULES, **space.rules, **space.launch_rules}
    problem = problem_of(rules, space.checks, values)
    if problem:
        raise ConfigError(f"{method}: {problem}")


def check_method_config(method: str, values: Mapping[str, Any]) -> None:
    """Refuse a method config's own fields (without training keys) that break ``method``'s rules.

    What a config dataclass runs in ``__post_init__``: the same rules and checks
    as :func:`validate`, but not the launch rules (the built method checks those
    values against its backbone).
    """
    space = record(method)
    problem = problem_of(space.rules, space.checks, values)
    if problem:
        raise ConfigError(f"{method}: {problem}")
