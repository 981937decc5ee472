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

What the search knows of each method is one record in the method's own file,
:mod:`medsweep.spaces.methods` (rules, recommended point and its source,
searched distributions); every table here is derived from those records.
The rules are also what the config dataclasses of ``medsweep.trainables``
check their fields with (:func:`check_method_config`, :data:`TRAIN_RULES`,
:data:`CONTEXT_RULES`), so each rule is written once.
"""

from medsweep.spaces._describe import describe, format_describe
from medsweep.spaces._overrides import fixed_values
from medsweep.spaces._recommend import recommendation, recommended
from medsweep.spaces._record import MethodSpace, Recommendation
from medsweep.spaces._rules import (
    CLASS_WEIGHTS,
    CONTEXT_CHECKS,
    CONTEXT_RULES,
    DECAY_RULES,
    OPTIMIZERS,
    PRECISION_NAMES,
    TRAIN_RULES,
    Rule,
    problem_of,
    refuse_unknown,
)
from medsweep.spaces._schema import allowed_keys, check_method_config, config_keys, validate
from medsweep.spaces._space import (
    SEARCHED,
    Space,
    check_overrides,
    cross_method_space,
    points_to_evaluate,
    replay,
    search_space_keys,
    space_for,
    to_trial_config,
)
from medsweep.spaces.methods import METHODS, RECORDS, record
from medsweep.spaces.tables import LoraRow, lora_recommended

__all__ = [
    "CLASS_WEIGHTS",
    "CONTEXT_CHECKS",
    "CONTEXT_RULES",
    "DECAY_RULES",
    "METHODS",
    "OPTIMIZERS",
    "PRECISION_NAMES",
    "RECORDS",
    "SEARCHED",
    "TRAIN_RULES",
    "LoraRow",
    "MethodSpace",
    "Recommendation",
    "Rule",
    "Space",
    "allowed_keys",
    "check_method_config",
    "check_overrides",
    "config_keys",
    "cross_method_space",
    "describe",
    "fixed_values",
    "format_describe",
    "lora_recommended",
    "points_to_evaluate",
    "problem_of",
    "recommendation",
    "recommended",
    "record",
    "refuse_unknown",
    "replay",
    "search_space_keys",
    "space_for",
    "to_trial_config",
    "validate",
]
