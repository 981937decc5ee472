"""Cohort-aware sampling: a fused method's trials come in runs of K that share the keys deciding their cohort.

Members fuse only when every key of their :func:`~medsweep.trainables.cohort.cohort_key`
agrees: the batch stream (batch size, ...) and the method's shape fields
(``num_prompts``, ...); FPT's keep ratio is masked, and lr, weight decay and the
other optimizer keys may differ freely. TPE draws the shape keys per trial, so
left alone figure 1's 16 FPT+ trials split into 11 cohorts of 1-3 members
(BENCHMARKS.md figure 11): the fused sweep then ran its cohorts nearly one trial
at a time.

So the searcher pins them. The first trial of a fused method is a *leader*, drawn
by the sampler like any trial. Its values of the method's shape keys are then
*pinned* for the next K - 1 trials of that method: each later suggestion is
enqueued into the Optuna study with the pinned values as fixed params
(``study.enqueue_trial`` with a partial dict), and the sampler draws every other
param (the method itself, lr, keep ratio, ...) as it would have. A follower
carries the pins of every method with an open run, so the sampler still picks the
method: the pins of a method it did not pick are simply unused. After K - 1
followers, the next trial of that method leads a new run, with shape keys the
sampler draws, conditioned on everything told so far.

What this costs the search: a run of K trials explores one value of each shape
key, so TPE tries fewer distinct batch sizes and prompt counts per trial (figure 5
measures the compute to the target with and without cohorts). Trials the study
already holds waiting (the recommended points, warm starts) are handed out first
and unchanged; a recommended point leads its method's first run, so the first
cohort searches lr and keep ratio around the published shape.

The pins are plain data on the searcher, saved and restored with it (OptunaSearch
pickles its ``__dict__``), so a resumed sweep continues the runs it had open.
Which keys are shape keys comes from :func:`medsweep.trainables.cohort.shape_keys`,
passed in by the driver (this module imports no model code).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class OpenRun:
    """A method's run of trials sharing its leader's shape values: the pinned params, and followers still to come."""

    params: dict[str, Any]  # Optuna param name -> value
    remaining: int


@dataclass
class CohortPins:
    """Which shape params the next trials of each fused method get (see the module docstring).

    ``sizes``: fused method -> cohort size K; ``shape_keys``: fused method -> the config keys that decide its
    cohort; ``single_method``: the sweep's only method when it has one (its Optuna params carry no prefix).
    """

    sizes: dict[str, int]
    shape_keys: dict[str, frozenset[str]]
    single_method: str | None = None
    runs: dict[str, OpenRun] = field(default_factory=dict)

    def fixed_params(self) -> dict[str, Any]:
        """The params to enqueue the next trial with: every open run's pins (empty: sample freely)."""
        fixed: dict[str, Any] = {}
        for run in self.runs.values():
            if run.remaining > 0:
                fixed.update(run.params)
        return fixed

    def record(self, params: Mapping[str, Any]) -> None:
        """Account for a suggested trial (its Optuna params): a follower of its method's open run, a leader
        of a new run, or neither (a waiting trial that does not match the open run, or an unfused method)."""
        method = self.single_method or params.get("method")
        if method not in self.sizes or self.sizes[method] < 2:
            return
        shape = self._shape_params(method, params)
        run = self.runs.get(method)
        if run is not None and run.remaining > 0:
            if all(params.get(name) == value for name, value in run.params.items()):
                run.remaining -= 1
            return
        self.runs[method] = OpenRun(shape, self.sizes[method] - 1)

    def _shape_params(self, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        prefix = "" if self.single_method else f"{method}."
        keys = self.shape_keys[method]
        return {name: value for name, value in params.items() if name.startswith(prefix) and name[len(prefix) :] in keys}
