"""Define-by-run search spaces centred on the recommended points, for Optuna and Ray Tune.

A space is a :class:`Space`: called with an Optuna trial it calls
``trial.suggest_*`` for every searched key and returns the constant keys. That
is Ray Tune ``OptunaSearch``'s define-by-run contract (the function "may return
a dict of constant values", merged into the trial config) and works as well
with a plain study, ``optuna.trial.FixedTrial`` or Ray's suggest-captor.
``Space`` is a picklable object, not a closure, because ``OptunaSearch.save``
pickles the searcher (and its space) with the standard ``pickle``.

What is searched, around each method's recommended point ``rec``:

* ``lr``: log-uniform over [rec / 10, rec x 10], for every method;
* ``weight_decay``: log-uniform over [rec / 10, rec x 10] where the published
  recipe uses one (rec > 0); a recipe without weight decay keeps 0;
* the method's own keys and the training keys that matter for it, from the
  ``searched`` of its record (:mod:`medsweep.spaces.methods`) (each range contains the recommended value);
* LoRA only: ``optimizer`` in {sgd, adamw}, the one method with both recipes
  published for the same task; lr, weight decay and epochs follow the chosen
  optimizer's recipe.

Parameter names (the namespacing scheme). A searched key whose distribution
depends on an earlier categorical choice is named by that choice:
``"<choice>.<key>"``. Keys are otherwise plain flat trial-config keys.

* single-method space: ``lr``, ``rank``, ``keep_ratio``...; LoRA's
  optimizer-dependent keys are ``sgd.lr``, ``adamw.lr``, ``adamw.weight_decay``;
* cross-method space: ``method`` is the first categorical and every other name
  is prefixed by it: ``fpt_plus.lr``, ``lora.rank``, ``lora.optimizer``,
  ``lora.sgd.lr``.

Optuna refuses one name with two categorical choice sets and would mix one
name's samples across methods whose ranges differ (lr 5e-5 for FPT vs 0.05 for
LoRA-SGD) into one TPE density; a name per condition keeps each density about
one method and optimizer. ``.`` rather than ``/`` because Ray Tune unflattens
``/`` into nested dicts before the trainable sees the config. Constants are
returned under their flat keys (only the chosen branch's are returned), and
:func:`to_trial_config` strips the prefixes, giving the flat trial config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import BaseTrial, FixedTrial

from medsweep.errors import ConfigError
from medsweep.spaces._overrides import DROP, check_override, narrowed
from medsweep.spaces._recommend import recommendation
from medsweep.spaces._record import Distribution, Recommendation
from medsweep.spaces._rules import OPTIMIZERS
from medsweep.spaces.methods import METHODS, RECORDS, record

# Method keys (and training keys beyond lr / weight decay) searched per method: each record's ``searched``.
SEARCHED: dict[str, dict[str, Distribution]] = {name: space.searched for name, space in RECORDS.items()}

# Categorical keys whose choice prefixes the names under it, in the order they nest.
_BRANCH_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (("method", METHODS), ("optimizer", OPTIMIZERS))


@dataclass(frozen=True)
class Param:
    """A searched key: its distribution and the recommended value inside it."""

    distribution: Distribution
    recommended: Any


@dataclass(frozen=True)
class Branch:
    """A categorical key whose choice selects the sub-space under it."""

    key: str
    recommended: Any
    children: dict[Any, Node]


@dataclass(frozen=True)
class Node:
    """Searched params, constants, and at most one branch: one level of a space."""

    params: dict[str, Param]
    constants: dict[str, Any]
    branch: Branch | None = None


@dataclass(frozen=True)
class Space:
    """A define-by-run space: ``space(trial)`` suggests the searched params and returns the constants."""

    root: Node

    def __call__(self, trial: BaseTrial) -> dict[str, Any]:
        return _sample(self.root, trial, "")

    def extreme_values(self, key: str) -> list[Any]:
        """Every value of ``key`` at the edge of what a trial can get, in any branch: a categorical's
        choices, a numeric range's low and high, a constant (empty if the space never sets ``key``).
        ``max()`` of it is the largest value a trial can run with (a GPU fraction sized for it)."""
        return _extreme_values(self.root, key)


def space_for(
    method: str,
    *,
    dataset: str | None = None,
    fraction: float | None = None,
    weights: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Space:
    """The search space of one method around its recommended point; ``method`` is a constant.

    ``overrides``: the user's changes to its searched keys (see :mod:`medsweep.spaces._overrides`)."""
    node = _overridden(method_node(recommendation(method, dataset=dataset, fraction=fraction, weights=weights)), overrides or {})
    return Space(replace(node, constants={"method": method, **node.constants}))


def cross_method_space(
    methods: Sequence[str] | str,
    *,
    dataset: str | None = None,
    fraction: float | None = None,
    weights: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Space:
    """One space over several methods: ``method`` is searched, then that method's (prefixed) space.

    With a single method this is :func:`space_for`, so callers can always use
    this function. ``weights`` applies to LoRA only and requires it among ``methods``.
    ``overrides`` maps a method to its changes of searched keys (:mod:`medsweep.spaces._overrides`).
    """
    nodes = _method_nodes(methods, dataset, fraction, weights, overrides)
    if len(nodes) == 1:
        (method,) = nodes
        return space_for(method, dataset=dataset, fraction=fraction, weights=weights, overrides=(overrides or {}).get(method))
    first = next(iter(nodes))
    return Space(Node(params={}, constants={}, branch=Branch("method", first, nodes)))


def points_to_evaluate(
    methods: Sequence[str] | str,
    *,
    dataset: str | None = None,
    fraction: float | None = None,
    weights: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The recommended point of each method, in the param names of ``cross_method_space(methods)``.

    Enqueue them (``study.enqueue_trial`` or OptunaSearch's ``points_to_evaluate``)
    so the published settings run before TPE explores. Only searched params
    appear; the space supplies the constants. Give the ``overrides`` the space was built with.
    """
    nodes = _method_nodes(methods, dataset, fraction, weights, overrides)
    if len(nodes) == 1:
        return [_recommended_params(node, "") for node in nodes.values()]
    return [{"method": method, **_recommended_params(node, f"{method}.")} for method, node in nodes.items()]


def search_space_keys(method: str) -> tuple[str, ...]:
    """The flat trial-config keys the space of ``method`` searches (in any branch), sorted."""
    return tuple(sorted(_keys(method_node(recommendation(method)))))


def to_trial_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """Map a sampled config (searched params + constants, as Ray hands it over) to the flat trial config.

    Strips the ``<method>.`` and ``<optimizer>.`` prefixes of the chosen
    branches; keys without a prefix pass through. A key of a branch that was
    not chosen, or two names for one key, means the dict did not come from one
    trial of one space: refused.
    """
    if "method" not in params:
        raise ConfigError("a trial config needs a 'method' key")
    config = dict(params)
    for key, choices in _BRANCH_KEYS:
        if key in config:
            config = _strip(config, config[key], choices)
    return config


def replay(space: Space, params: Mapping[str, Any]) -> dict[str, Any]:
    """The flat trial config that ``space`` gives for fixed searched ``params`` (e.g. a study's best).

    Optuna stores only searched params; replaying them through the space adds
    the constants of the branch they chose.
    """
    trial = FixedTrial(dict(params))
    try:
        constants = space(trial)
    except ValueError as error:  # FixedTrial: a param the space needs is missing
        raise ConfigError(f"params do not fit this space: {error}") from error
    return to_trial_config({**trial.params, **constants})


# -- building ----------------------------------------------------------------------


def _method_nodes(
    methods: Sequence[str] | str,
    dataset: str | None,
    fraction: float | None,
    weights: str | None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Node]:
    """Check the method list and build each method's node; weights go to LoRA only."""
    names = (methods,) if isinstance(methods, str) else tuple(methods)
    if not names:
        raise ConfigError(f"no methods to search; known methods: {', '.join(METHODS)}")
    for name in names:
        record(name)
    if len(set(names)) != len(names):
        raise ConfigError(f"methods listed more than once: {', '.join(names)}")
    if weights is not None and not any(record(name).weights for name in names):
        with_tables = " or ".join(name for name in METHODS if record(name).weights)
        raise ConfigError(f"weights={weights!r} selects a LoRA-medical table, but {with_tables} is not among the methods")
    return {
        name: _overridden(
            method_node(recommendation(name, dataset=dataset, fraction=fraction, weights=weights if record(name).weights else None)),
            (overrides or {}).get(name) or {},
        )
        for name in names
    }


def check_overrides(method: str, changes: Mapping[str, Any]) -> None:
    """Refuse, in one line, a change of ``method``'s search (a sweep file's ``search_ranges``) before anything starts."""
    searched: dict[str, Distribution] = {}
    branches: dict[str, tuple[Any, ...]] = {}
    _searched(method_node(recommendation(method)), searched, branches)
    for key, change in changes.items():
        check_override(method, key, change, searched)
        values = change["choices"] if isinstance(change, Mapping) and "choices" in change else [_fixed(change, None)]
        outside = [value for value in values if key in branches and value is not None and value not in branches[key]]
        if outside:
            raise ConfigError(f"search_ranges.{method}.{key}: {outside[0]!r} is not one of {', '.join(map(str, branches[key]))}")


def _searched(node: Node, out: dict[str, Distribution], branches: dict[str, tuple[Any, ...]]) -> None:
    """Each key ``node`` searches in any branch, with its distribution; ``branches``: each branch key's choices."""
    out.update({key: param.distribution for key, param in node.params.items()})
    if node.branch is not None:
        branches[node.branch.key] = tuple(node.branch.children)
        out[node.branch.key] = CategoricalDistribution(branches[node.branch.key])
        for child in node.branch.children.values():
            _searched(child, out, branches)


def _overridden(node: Node, changes: Mapping[str, Any]) -> Node:
    """``node`` with checked ``changes``: a dropped or fixed key becomes a constant (a dropped or fixed
    branch key keeps only its chosen child, merged in), a range or choices replace the distribution,
    and choices on a constant make it searched."""
    if not changes:
        return node
    params: dict[str, Param] = {}
    constants: dict[str, Any] = {}
    for key, value in node.constants.items():  # choices on a constant: searched from now on, recommended first
        change = changes.get(key)
        if isinstance(change, Mapping) and "choices" in change:
            params[key] = Param(*narrowed(CategoricalDistribution(tuple(change["choices"])), value, change))
        else:
            constants[key] = _fixed(change, value)
    for key, param in node.params.items():
        change = changes.get(key)
        if change is None:
            params[key] = param
        elif change == DROP or "fixed" in change:
            constants[key] = _fixed(change, param.recommended)
        else:
            params[key] = Param(*narrowed(param.distribution, param.recommended, change))
    branch = node.branch
    if branch is None:
        return Node(params, constants)
    children = {choice: _overridden(child, changes) for choice, child in branch.children.items()}
    change = changes.get(branch.key)
    if change is None:
        return Node(params, constants, replace(branch, children=children))
    if change == DROP or "fixed" in change:
        choice = _fixed(change, branch.recommended)
        kept = children[choice]
        return Node({**params, **kept.params}, {**constants, branch.key: choice, **kept.constants}, kept.branch)
    chosen = {choice: children[choice] for choice in change["choices"]}
    recommended = branch.recommended if branch.recommended in chosen else next(iter(chosen))
    return Node(params, constants, Branch(branch.key, recommended, chosen))


def _fixed(change: Any, value: Any) -> Any:
    """The value of a key under ``change``: its ``fixed`` value, else ``value``."""
    return change["fixed"] if isinstance(change, Mapping) and "fixed" in change else value


def method_node(rec: Recommendation) -> Node:
    """One method's space (unprefixed names, no ``method`` constant) split from its recommendation.

    Searched keys become params, the rest constants; LoRA's optimizer-dependent
    keys move under an ``optimizer`` branch with one child per recipe.
    """
    method = rec.point["method"]
    values = {k: v for k, v in rec.point.items() if k != "method"}
    if not rec.recipes:
        return _leaf(method, values)
    varying = {key for recipe in rec.recipes.values() for key in recipe} | {"optimizer"}
    shared = _leaf(method, {k: v for k, v in values.items() if k not in varying})
    children = {optimizer: _leaf(method, recipe) for optimizer, recipe in rec.recipes.items()}
    return replace(shared, branch=Branch("optimizer", values["optimizer"], children))


def _leaf(method: str, values: Mapping[str, Any]) -> Node:
    """Each value becomes a searched param (if a rule searches its key) or a constant."""
    params: dict[str, Param] = {}
    constants: dict[str, Any] = {}
    for key, value in values.items():
        distribution = _distribution(method, key, value)
        if distribution is None:
            constants[key] = value
        else:
            params[key] = Param(distribution, value)
    return Node(params, constants)


def _distribution(method: str, key: str, value: Any) -> Distribution | None:
    """The distribution searched for ``key`` around its recommended ``value``, or None (constant)."""
    searched = record(method).searched
    if key in searched:
        return searched[key]
    if key == "lr" or (key == "weight_decay" and value > 0):
        return FloatDistribution(value / 10, value * 10, log=True)
    return None


# -- walking -----------------------------------------------------------------------


def _sample(node: Node, trial: BaseTrial, prefix: str) -> dict[str, Any]:
    """Suggest ``node``'s params (and its chosen branch's) under ``prefix``; return the constants."""
    constants = dict(node.constants)
    for key, param in node.params.items():
        _suggest(trial, prefix + key, param.distribution)
    if node.branch is not None:
        choice = trial.suggest_categorical(prefix + node.branch.key, tuple(node.branch.children))
        constants.update(_sample(node.branch.children[choice], trial, f"{prefix}{choice}."))
    return constants


def _suggest(trial: BaseTrial, name: str, distribution: Distribution) -> Any:
    """Call the public ``suggest_*`` matching ``distribution`` (Ray's captor wraps only those)."""
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)


def _recommended_params(node: Node, prefix: str) -> dict[str, Any]:
    """The searched params of the recommended path through ``node``, named as the space names them."""
    point = {prefix + key: param.recommended for key, param in node.params.items()}
    if node.branch is not None:
        choice = node.branch.recommended
        point[prefix + node.branch.key] = choice
        point.update(_recommended_params(node.branch.children[choice], f"{prefix}{choice}."))
    return point


def _extreme_values(node: Node, key: str) -> list[Any]:
    values = [node.constants[key]] if key in node.constants else []
    if key in node.params:
        distribution = node.params[key].distribution
        values += list(distribution.choices) if isinstance(distribution, CategoricalDistribution) else [distribution.low, distribution.high]
    if node.branch is not None:
        for child in node.branch.children.values():
            values += _extreme_values(child, key)
    return values


def _keys(node: Node) -> set[str]:
    keys = set(node.params)
    if node.branch is not None:
        keys.add(node.branch.key)
        for child in node.branch.children.values():
            keys |= _keys(child)
    return keys


def _strip(config: Mapping[str, Any], chosen: Any, choices: tuple[str, ...]) -> dict[str, Any]:
    """Drop the ``<chosen>.`` prefix from every key; refuse keys of other choices and collisions."""
    out: dict[str, Any] = {}
    for name, value in config.items():
        head, dot, rest = name.partition(".")
        if dot and head == chosen:
            name = rest
        elif dot and head in choices:
            raise ConfigError(f"{name!r} belongs to {head!r}, but this trial chose {chosen!r}")
        if name in out:
            raise ConfigError(f"{name!r} is set twice in one trial config")
        out[name] = value
    return out
