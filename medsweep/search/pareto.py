"""The Pareto front of a set of trials: the one implementation, used by the sweep's export and the report.

Numpy only (no Ray, no matplotlib), so :mod:`medsweep.search.export` and
:mod:`medsweep.search.report` can both import it cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pareto_front(maximise: Sequence[float], minimise: Sequence[float], *more_minimise: Sequence[float]) -> np.ndarray:
    """Mask of the non-dominated points: none other is at least as good on every objective and better on one.

    One score to maximise (validation AUC) and one or more costs to minimise
    (learnable parameters, peak memory). Identical points do not dominate each
    other, so ties are all on the front (as in Optuna's ``study.best_trials``);
    a point with a NaN coordinate is neither on it nor dominates.
    """
    columns = [-np.asarray(maximise, dtype=float), *(np.asarray(c, dtype=float) for c in (minimise, *more_minimise))]
    costs = np.stack(columns, axis=1) if len(columns[0]) else np.zeros((0, len(columns)))
    valid = np.isfinite(costs).all(axis=1)
    c = costs[valid]
    # [i, j]: does j dominate i?
    at_least_as_good = (c[None, :, :] <= c[:, None, :]).all(axis=2)
    strictly_better = (c[None, :, :] < c[:, None, :]).any(axis=2)
    dominated = np.any(at_least_as_good & strictly_better, axis=1)
    mask = np.zeros(len(costs), dtype=bool)
    mask[np.flatnonzero(valid)] = ~dominated
    return mask
