"""A user's changes to one method's searched keys: a new range or choices, a fixed value, or ``drop``.

A sweep file's ``search_ranges`` maps each method to ``{key: change}``, where a change is

* ``{"low": x, "high": y}`` (optional ``"log": true``): a new range for a numeric key;
* ``{"choices": [...]}``: a new set of values; also on a key the method does not search by
  default, which is then searched (e.g. ``class_weights: {choices: [none, balanced]}``);
* ``{"fixed": v}``: the key is not searched and every trial of the method runs with ``v``;
* ``"drop"``: the key is not searched and keeps its recommended value.

:func:`check_override` refuses a bad change in one line before anything starts, using the
same rules as :func:`~medsweep.spaces.validate`; :func:`narrowed` gives the searched key's new
distribution. The recommended point, run first, must lie in the space, so it is moved into a
narrowed range (the nearer bound) or onto the first choice when the new values leave it out:
the recommended value depends on the dataset, known only once the sweep loads it, so refusing
instead would fail some datasets and not others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from medsweep.errors import ConfigError
from medsweep.spaces._record import Distribution
from medsweep.spaces._schema import config_keys, validate

DROP = "drop"
RANGE_KEYS = frozenset({"low", "high", "log"})


def check_override(method: str, key: str, change: Any, searched: Mapping[str, Distribution]) -> None:
    """Refuse a change of ``method``'s ``key`` that is malformed, names an unknown key or breaks the key's rule.

    ``searched``: the distribution of each key the method's space searches, in any branch."""
    where = f"search_ranges.{method}.{key}"
    if isinstance(change, Mapping) and set(change) == {"fixed"}:
        if key not in config_keys(method) or key == "method":
            raise ConfigError(f"{where}: {method} has no setting {key!r}; see `medsweep spaces show {method}` for its keys")
        if key == "precision":
            raise ConfigError(f"{where}: the precision is a run setting of the whole sweep; set `precision` at the top of the file")
        _check_value(method, where, key, change["fixed"])
        return
    if key not in searched and not (isinstance(change, Mapping) and set(change) == {"choices"} and key in config_keys(method)):
        raise ConfigError(
            f"{where}: {method} does not search {key!r} (it searches {', '.join(sorted(searched))}); "
            f"use {{fixed: VALUE}} to set another key, or {{choices: [...]}} to search it"
        )
    if key in ("precision", "method", "epochs", "seed"):
        raise ConfigError(f"{where}: {key} is a setting of the whole sweep, not searched; set it at the top of the file")
    if change == DROP:
        return
    if not isinstance(change, Mapping):
        raise ConfigError(f"{where}: give {{low: X, high: Y}}, {{choices: [...]}}, {{fixed: VALUE}} or drop, got {change!r}")
    if set(change) == {"choices"}:
        choices = change["choices"]
        if not isinstance(choices, list) or not choices or len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where}: choices must be a non-empty list of distinct values, got {choices!r}")
        for choice in choices:
            _check_value(method, where, key, choice)
        return
    distribution = searched[key]
    if not change.keys() <= RANGE_KEYS or not {"low", "high"} <= change.keys():
        raise ConfigError(f"{where}: a range is {{low: X, high: Y}} with an optional log: true, got keys {', '.join(map(str, change))}")
    if not isinstance(distribution, FloatDistribution | IntDistribution):
        raise ConfigError(f"{where}: {key} is searched over choices, not a range; give {{choices: [...]}}")
    low, high, log = change["low"], change["high"], change.get("log", distribution.log)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    kind = int if isinstance(distribution, IntDistribution) else (int, float)
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, kind) or not math.isfinite(bound):
            raise ConfigError(f"{where}: low and high must be {'whole ' if kind is int else ''}numbers, got {bound!r}")
        _check_value(method, where, key, float(bound) if kind is not int else bound)
    if low >= high:
        raise ConfigError(f"{where}: low must be below high, got low {low} and high {high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low}")


def narrowed(distribution: Distribution, recommended: Any, change: Mapping[str, Any]) -> tuple[Distribution, Any]:
    """The checked new distribution of a searched key and the recommended value moved inside it."""
    if "choices" in change:
        choices = tuple(change["choices"])
        return CategoricalDistribution(choices), recommended if recommended in choices else choices[0]
    log = change.get("log", getattr(distribution, "log", False))
    new: Distribution
    if isinstance(distribution, IntDistribution):
        new = IntDistribution(change["low"], change["high"], log=log)
    else:
        new = FloatDistribution(float(change["low"]), float(change["high"]), log=log)
    return new, min(max(recommended, new.low), new.high)


def fixed_values(changes: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``{"fixed": v}`` changes of one method as ``{key: v}``."""
    return {key: change["fixed"] for key, change in (changes or {}).items() if isinstance(change, Mapping) and "fixed" in change}


def _check_value(method: str, where: str, key: str, value: Any) -> None:
    try:
        validate(method, {key: value})
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
