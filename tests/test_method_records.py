"""One record per method: the search's records and the training registry describe the same methods,
and no module but a method's own files names it.

* ``spaces.METHODS`` (the records in ``medsweep/spaces/methods/``) and
  ``trainables.methods.list_methods()`` (the registrations) list the same names;
* each record's rules cover exactly the fields of the method's config beyond the
  common ones, and the training keys are exactly ``TrainConfig``'s fields;
* a flat config with a key of no trial-config group is refused in one line;
* a method's name appears as a string only in its own files.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

import medsweep
from medsweep.errors import ConfigError
from medsweep.spaces import CONTEXT_RULES, METHODS, TRAIN_RULES, allowed_keys, config_keys, recommended, record
from medsweep.trainables.config import NOT_HYPERPARAMETERS, PLACEMENT_KEYS, MethodConfig, TrainConfig
from medsweep.trainables.methods import get_method, list_methods, make_config

PACKAGE = Path(medsweep.__file__).parent

# Strings that may name methods outside the methods' own files (the module registering a method and
# its record in spaces/methods/), as (file, the name assigned or the call's first argument): the
# product's choice of default methods for a sweep and for `medsweep preload`.
ALLOWED_NAMINGS = {
    ("search/sweep.py", "DEFAULT_METHODS"),
    ("search/settings.py", "DEFAULT_METHODS"),
    ("cli.py", "--method"),
}


def test_spaces_and_the_registry_list_the_same_methods() -> None:
    assert sorted(METHODS) == list_methods()


@pytest.mark.parametrize("name", list_methods())
def test_a_records_rules_are_exactly_the_methods_config_fields(name: str) -> None:
    fields = {f.name for f in dataclasses.fields(get_method(name).config_cls)}
    common = {f.name for f in dataclasses.fields(MethodConfig)}
    assert set(record(name).rules) == fields - common  # every rule a field, every own field a rule
    assert set(config_keys(name)) == {"method", *TRAIN_RULES, *(fields - common)}
    assert set(allowed_keys(name)) <= set(config_keys(name))
    assert set(recommended(name)) == set(allowed_keys(name))


def test_common_and_training_rules_are_exactly_their_dataclass_fields() -> None:
    assert set(TRAIN_RULES) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(CONTEXT_RULES) == {f.name for f in dataclasses.fields(MethodConfig)}


def test_non_hyperparameters_are_the_marked_fields_and_placement() -> None:
    assert set(NOT_HYPERPARAMETERS) == {"method", *CONTEXT_RULES, "epochs", "seed", "precision", *PLACEMENT_KEYS}
    assert not set(NOT_HYPERPARAMETERS) & {k for name in METHODS for k in record(name).searched}


@pytest.mark.parametrize("name", list_methods())
def test_from_dict_refuses_a_key_of_no_group_in_one_line(name: str) -> None:
    config_cls = get_method(name).config_cls
    with pytest.raises(ConfigError, match=r"unknown key\(s\) rnak for method .*; allowed: ") as error:
        config_cls.from_dict({"rnak": 4})
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="rnak"):
        make_config(name, {"method": name, "lr": 1e-3, "rnak": 4})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) rnak for a trial config"):
        TrainConfig.from_dict({"method": name, "rnak": 4})
    # keys of the other groups of a trial config are not this config's, and not unknown either
    make_config(name, {"method": name, "lr": 1e-3, "epochs": 2, "workers": 1, "store_key": "k"})


def test_a_config_checks_its_fields_with_the_records_rules() -> None:
    rank = record("lora").rules["rank"]
    assert rank.problem(0) is not None
    with pytest.raises(ConfigError, match="lora: rank must be at least 1, got 0"):
        make_config("lora", {"rank": 0})


def method_files() -> set[Path]:
    """Each method's own files: the module that registers it and the module of its spaces record."""
    modules = {get_method(name).model_cls.__module__ for name in list_methods()}
    modules |= {f"medsweep.spaces.methods.{name}" for name in METHODS}
    return {PACKAGE.parent / (module.replace(".", "/") + ".py") for module in modules}


def _context(node: ast.AST, parents: dict[int, ast.AST]) -> str:
    """The name assigned or the first argument of the call the string sits in ("" for neither)."""
    while id(node) in parents:
        node = parents[id(node)]
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            return ",".join(t.id for t in targets if isinstance(t, ast.Name))
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            return str(node.args[0].value)
    return ""


def _namings(path: Path, names: set[str]) -> list[tuple[str, int, str, str]]:
    """(name, line, context, text) of every string in ``path`` that is a method name or quotes one.

    Docstrings are prose (``linear`` and ``full`` are English words there) and are skipped.
    """
    tree = ast.parse(path.read_text())
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    quoted = re.compile(r"['\"`](" + "|".join(map(re.escape, names)) + r")['\"`]")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            hits = {node.value} & names or set(quoted.findall(node.value))
            found += [(hit, node.lineno, _context(node, parents), node.value) for hit in sorted(hits)]
    return found


def method_names_outside_their_files() -> list[str]:
    names = set(list_methods())
    own = method_files()
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if path in own:
            continue
        for name, line, context, text in _namings(path, names):
            if (relative, context) not in ALLOWED_NAMINGS:
                problems.append(f"{relative}:{line}: {text!r} names method {name!r}")
    return problems


def test_no_module_but_a_methods_own_files_names_it() -> None:
    assert method_names_outside_their_files() == []


def test_the_naming_check_finds_a_name() -> None:
    """The check above is not vacuous: it sees the names the product's defaults use."""
    sweep_files = [p for p in (PACKAGE / "search").glob("*.py") if "DEFAULT_METHODS" in p.read_text()]
    assert any(_namings(p, set(list_methods())) for p in sweep_files)
