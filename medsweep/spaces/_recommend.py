"""The recommended flat config of a method, and where it comes from.

A recommendation is the point a sweep evaluates first and the centre of the
method's search space: the ``recommended`` values of the method's record, or
what its ``recommend`` function makes of a dataset, label fraction and
published checkpoint (LoRA's tables, FPT's per-dataset lr).
"""

from __future__ import annotations

from typing import Any

from medsweep.errors import ConfigError
from medsweep.spaces._record import Recommendation
from medsweep.spaces.methods import record


def recommendation(
    method: str,
    *,
    dataset: str | None = None,
    fraction: float | None = None,
    weights: str | None = None,
) -> Recommendation:
    """Build the recommendation of ``method`` for a dataset, label fraction (%) and published checkpoint.

    A dataset without a published value falls back to the method default
    (sweeping a new dataset is the normal case); asking for ``weights`` with a
    dataset or fraction outside the tables is an error, because the caller
    explicitly asked for a published row.
    """
    space = record(method)
    if weights is not None and not space.weights:
        raise ConfigError(f"weights={weights!r} selects a LoRA-medical table; method {method!r} has none")
    if space.recommend is not None:
        return space.recommend(space, dataset, fraction, weights)
    return Recommendation({"method": method, **space.recommended}, space.source)


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
    per-dataset lr. Everything else is the method's record.
    """
    return dict(recommendation(method, dataset=dataset, fraction=fraction, weights=weights).point)
