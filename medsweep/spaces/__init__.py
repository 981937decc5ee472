"""Search spaces and published recommended tables, as plain data and define-by-run functions.

Pure: imports nothing of medsweep but its errors, and nothing of Ray. A sweep
asks this package for

* the recommended flat config of a method (:func:`recommended`), taken from
  the published tables in :mod:`medsweep.spaces.tables`;
* a define-by-run space around it (:func:`space_for`, or
  :func:`cross_method_space` over several methods) for Ray Tune's
  ``OptunaSearch``, with :func:`points_to_evaluate` so the published settings
  run first;
* :func:`to_trial_config` to turn what a trial receives into the flat config
  (see :mod:`medsweep.spaces._space` for the param naming scheme), and
  :func:`validate` to refuse bad values before anything launches.
"""

from medsweep.spaces._describe import describe, format_describe
from medsweep.spaces._recommend import Recommendation, recommendation, recommended
from medsweep.spaces._schema import METHODS, OPTIMIZERS, TRAIN_RULES, allowed_keys, validate
from medsweep.spaces._space import (
    SEARCHED,
    Space,
    cross_method_space,
    points_to_evaluate,
    replay,
    search_space_keys,
    space_for,
    to_trial_config,
)
from medsweep.spaces.tables import LoraRow, lora_recommended

__all__ = [
    "METHODS",
    "OPTIMIZERS",
    "SEARCHED",
    "TRAIN_RULES",
    "LoraRow",
    "Recommendation",
    "Space",
    "allowed_keys",
    "cross_method_space",
    "describe",
    "format_describe",
    "lora_recommended",
    "points_to_evaluate",
    "recommendation",
    "recommended",
    "replay",
    "search_space_keys",
    "space_for",
    "to_trial_config",
    "validate",
]
