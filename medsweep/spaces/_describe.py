"""What a method's space searches, as JSON-able data and as a plain-text table.

Backs ``medsweep spaces show``: a user sees the recommended point, where it
comes from, every searched param (with the name Optuna stores it under) and
every constant before spending GPU-hours on a sweep.
"""

from __future__ import annotations

from typing import Any

from optuna.distributions import CategoricalDistribution, IntDistribution

from medsweep.spaces._recommend import recommendation
from medsweep.spaces._record import Distribution
from medsweep.spaces._space import Node, space_for


def describe(
    method: str,
    *,
    dataset: str | None = None,
    fraction: float | None = None,
    weights: str | None = None,
) -> dict[str, Any]:
    """JSON-able description of ``space_for(method, ...)``: source, recommended point, searched, constants.

    ``searched`` rows carry the Optuna param ``name``, the flat config ``key``,
    the condition ``when`` they apply (None: always), the distribution and the
    recommended value; ``constants`` rows carry ``key``, ``value`` and ``when``.
    """
    rec = recommendation(method, dataset=dataset, fraction=fraction, weights=weights)
    space = space_for(method, dataset=dataset, fraction=fraction, weights=weights)
    searched: list[dict[str, Any]] = []
    constants: list[dict[str, Any]] = []
    _rows(space.root, "", None, searched, constants)
    return {
        "method": method,
        "source": rec.source,
        "recommended": dict(rec.point),
        "searched": searched,
        "constants": constants,
    }


def format_describe(desc: dict[str, Any]) -> str:
    """A :func:`describe` result as aligned plain-text tables."""
    lines = [
        f"method       {desc['method']}",
        f"source       {desc['source']}",
        "recommended  " + " ".join(f"{k}={_show(v)}" for k, v in desc["recommended"].items()),
        "",
        "searched",
        *_table(
            ("name", "when", "distribution", "recommended"),
            [
                (row["name"], row["when"] or "-", _show_distribution(row["distribution"]), _show(row["recommended"]))
                for row in desc["searched"]
            ],
        ),
        "",
        "constants",
        *_table(("key", "value", "when"), [(row["key"], _show(row["value"]), row["when"] or "-") for row in desc["constants"]]),
    ]
    return "\n".join(lines)


def _rows(node: Node, prefix: str, when: str | None, searched: list[dict[str, Any]], constants: list[dict[str, Any]]) -> None:
    """Append ``node``'s params and constants, then each branch child's under its condition."""
    for key, param in node.params.items():
        searched.append(_searched_row(prefix, key, when, param.distribution, param.recommended))
    for key, value in node.constants.items():
        constants.append({"key": key, "value": value, "when": when})
    if node.branch is not None:
        branch = node.branch
        choices = CategoricalDistribution(tuple(branch.children))
        searched.append(_searched_row(prefix, branch.key, when, choices, branch.recommended))
        for choice, child in branch.children.items():
            condition = f"{branch.key}={choice}" if when is None else f"{when}, {branch.key}={choice}"
            _rows(child, f"{prefix}{choice}.", condition, searched, constants)


def _searched_row(prefix: str, key: str, when: str | None, distribution: Distribution, recommended: Any) -> dict[str, Any]:
    return {
        "name": prefix + key,
        "key": key,
        "when": when,
        "distribution": _distribution_json(distribution),
        "recommended": recommended,
    }


def _distribution_json(distribution: Distribution) -> dict[str, Any]:
    if isinstance(distribution, CategoricalDistribution):
        return {"type": "categorical", "choices": list(distribution.choices)}
    kind = "int" if isinstance(distribution, IntDistribution) else "float"
    return {"type": kind, "low": distribution.low, "high": distribution.high, "log": distribution.log}


def _show_distribution(dist: dict[str, Any]) -> str:
    if dist["type"] == "categorical":
        return "one of " + ", ".join(_show(c) for c in dist["choices"])
    scale = "log-uniform" if dist["log"] else "uniform"
    kind = " int" if dist["type"] == "int" else ""
    return f"{scale}{kind} [{_show(dist['low'])}, {_show(dist['high'])}]"


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns, two spaces apart, indented by two."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    return ["  " + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in (headers, *rows)]
