"""The record of one method's search facts (:class:`MethodSpace`) and of a recommended point.

Each method's record lives in its own file under :mod:`medsweep.spaces.methods`;
this module holds only the shapes of those records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from medsweep.spaces._rules import Check, Rule

Distribution = FloatDistribution | IntDistribution | CategoricalDistribution


@dataclass(frozen=True)
class Recommendation:
    """A method's recommended flat config (``method`` included) and its source.

    ``recipes`` maps each optimizer the space may choose to the keys that change
    with it; empty for methods whose optimizer is fixed.
    """

    point: dict[str, Any]
    source: str
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)


# A method's own recommendation for a dataset, label fraction (%) and published checkpoint:
# (record, dataset, fraction, weights) -> Recommendation.
Recommender = Callable[["MethodSpace", "str | None", "float | None", "str | None"], Recommendation]


@dataclass(frozen=True)
class MethodSpace:
    """Everything the search knows about one method, in one record.

    * ``name``: the name the method registers under in ``medsweep.trainables``;
      ``order`` places it in method lists (lower first).
    * ``rules``: every field of the method's config beyond the common ones
      (backbone, image size, classes, task), with what its value may be. The
      config dataclass checks its fields with these rules, and
      :func:`~medsweep.spaces.validate` a flat trial config.
    * ``recommended``: the recommended flat config without ``method``: every
      training key and the method's published keys; ``source`` says where
      each value comes from. Keys of ``rules`` not in it keep their config
      default unless a user fixes them.
    * ``searched``: the distribution of each searched key (besides lr and
      weight decay, searched for every method around the recommended value).
    * ``checks``: checks of several keys at once, run with the rules.
    * ``launch_rules``: stricter rules a sweep applies before launch where the
      method itself can only check a value once built (an image size against
      the backbone's patch).
    * ``recommend``: a method whose recommended point depends on the dataset,
      label fraction or a published checkpoint computes it here; ``weights``
      names the checkpoints with published tables (``None`` without any).
    """

    name: str
    order: int
    rules: dict[str, Rule]
    recommended: dict[str, Any]
    source: str
    searched: dict[str, Distribution] = field(default_factory=dict)
    checks: tuple[Check, ...] = ()
    launch_rules: dict[str, Rule] = field(default_factory=dict)
    recommend: Recommender | None = None
    weights: tuple[str, ...] = ()
