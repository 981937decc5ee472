"""Bind the pure spaces of :mod:`medsweep.spaces` to one sweep's fixed values.

The spaces package knows methods and published recommendations; a sweep adds
what is not searched (dataset shape, backbone, epoch budget, its store key,
resources). :class:`SweepSpace` returns those as define-by-run constants, so
every trial's config arrives complete and flat keys win over recommended
constants (the sweep's ``--max-epochs`` over a table's 100 epochs).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from optuna.trial import BaseTrial, FixedTrial

from medsweep.spaces import Space, cross_method_space, points_to_evaluate, to_trial_config, validate
from medsweep.trainables.config import PLACEMENT_KEYS, MethodConfig


@dataclass(frozen=True)
class SweepSpace:
    """A picklable define-by-run space: the method space, then the sweep's fixed values per method."""

    inner: Space
    fixed: dict[str, dict[str, Any]]

    def __call__(self, trial: BaseTrial) -> dict[str, Any]:
        constants = self.inner(trial) or {}
        method = constants.get("method") or trial.params["method"]
        return {**constants, **self.fixed[method]}


def build_search(
    methods: list[str],
    fixed: dict[str, dict[str, Any]],
    *,
    dataset: str | None = None,
    ranges: dict[str, dict[str, Any]] | None = None,
) -> tuple[SweepSpace, list[dict[str, Any]]]:
    """The sweep's space and its recommended points (run first), validated before launch.

    ``ranges``: per method, the changes of its searched keys (``SweepSettings.search_ranges``)."""
    space = SweepSpace(cross_method_space(methods, dataset=dataset, overrides=ranges), fixed)
    points = points_to_evaluate(methods, dataset=dataset, overrides=ranges)
    for point in points:
        trial = FixedTrial(dict(point))
        config = trial_config({**trial.params, **space(trial)})
        validate(config["method"], {k: v for k, v in config.items() if k not in SWEEP_KEYS})
    return space, points


# Keys a sweep adds to every trial config that no space holds: the common method-config fields
# (data and backbone) and the placement keys (see medsweep.trainables.config).
SWEEP_KEYS = (*(f.name for f in fields(MethodConfig)), *PLACEMENT_KEYS)


def trial_config(tune_config: dict[str, Any]) -> dict[str, Any]:
    """The flat config a trial runs with, from Tune's config (prefixed params + constants).

    A value the sweep fixes (``--set lr=...``) wins over the searched param of
    the same key (``fpt_plus.lr``): the user's word is final, the sample is dropped.
    """
    plain = {key for key in tune_config if "." not in key}
    kept = {k: v for k, v in tune_config.items() if "." not in k or k.rsplit(".", 1)[-1] not in plain}
    return to_trial_config(kept)
