"""A sweep as a file: --print-config and --config round-trip, flags win, bad keys and ranges are one line."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FixedTrial

from medsweep.cli import main, parse_args, settings_from_args
from medsweep.errors import ConfigError
from medsweep.search.space import build_search, trial_config
from medsweep.search.study import SETTINGS_FILE
from medsweep.spaces import check_overrides


def _settings(argv: list[str]):
    return settings_from_args(parse_args(["sweep", *argv]))


def _print_config(argv: list[str], capsys) -> str:
    assert main(["sweep", "--print-config", *argv]) == 0
    return capsys.readouterr().out


RANGES = {"linear": {"lr": {"low": 1e-3, "high": 0.1}, "batch_size": {"choices": [16, 32]}, "weight_decay": "drop"}}


def test_print_config_then_config_gives_the_same_settings(tmp_path, capsys) -> None:
    argv = ["--method", "linear", "--trials", "3", "--seed", "4", "--set", "warmup_epochs=0", "--out", str(tmp_path / "run")]
    first = _print_config(argv, capsys)
    path = tmp_path / "sweep.yaml"
    path.write_text(first)
    assert _print_config(["--config", str(path)], capsys) == first
    assert asdict(_settings(["--config", str(path)])) == asdict(_settings(argv))
    # The same file as JSON (what a sweep writes as sweep.json) reads back the same.
    as_json = tmp_path / SETTINGS_FILE
    as_json.write_text(_settings(argv).to_json())
    assert _settings(["--config", str(as_json)]).to_json() == _settings(argv).to_json()


def test_flags_given_on_the_command_line_win_over_the_file(tmp_path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"methods": ["linear"], "trials": 5, "seed": 3, "fixed": {"lr": 0.01}, "early_stopping": False}))
    from_file = _settings(["--config", str(path)])
    assert (from_file.trials, from_file.seed, from_file.fixed, from_file.early_stopping) == (5, 3, {"lr": 0.01}, False)
    # --seed 0 is the default value, given explicitly: it still wins; --set adds to the file's fixed.
    flags = _settings(["--config", str(path), "--seed", "0", "--trials", "2", "--set", "warmup_epochs=0"])
    assert (flags.trials, flags.seed, flags.fixed, flags.early_stopping) == (2, 0, {"lr": 0.01, "warmup_epochs": 0}, False)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ({"trails": 3}, "unknown setting 'trails'; did you mean 'trials'?"),
        ({"methods": ["linear"], "search_ranges": {"linear": {"lr": {"low": 0.1, "high": 0.01}}}}, "low must be below high"),
        ({"methods": ["linear"], "search_ranges": {"linear": {"lr": {"low": 0, "high": 0.01, "log": True}}}}, "lr must be in (0, inf)"),
        ({"methods": ["linear"], "search_ranges": {"linear": {"rank": "drop"}}}, "linear does not search 'rank'"),
        ({"methods": ["linear"], "search_ranges": {"lora": {"rank": "drop"}}}, "lora is not among the sweep's methods"),
        ({"methods": ["linear"], "search_ranges": {"linear": {"batch_size": {"low": 8, "high": 64}}}}, "searched over choices"),
        ({"methods": ["lora"], "search_ranges": {"lora": {"optimizer": {"choices": ["adam"]}}}}, "'adam' is not one of sgd, adamw"),
        ({"methods": ["linear"], "search_ranges": {"linear": {"batch_size": {"choices": [0, 8]}}}}, "batch_size must be"),
        ({"methods": ["linear"], "seed": -1}, "--seed must be between 0 and 2147483647"),
        ({"methods": ["linear"], "image_size": 100000}, "--image-size must be between 8 and 4096 pixels"),
    ],
)
def test_unknown_keys_and_bad_ranges_are_one_line_and_exit_code_2(tmp_path, capsys, content, needle) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(content))
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medsweep: error: ")
    assert needle in err
    assert not out.exists()  # refused before anything was written


def test_search_ranges_change_the_space() -> None:
    settings = _settings(["--method", "linear", "--trials", "2"])
    settings.search_ranges = RANGES
    space, points = build_search(["linear"], {"linear": {"lr": 0.02}}, dataset="synthetic", ranges=settings.search_ranges)
    node = space.inner.root
    assert node.params["lr"].distribution == FloatDistribution(1e-3, 0.1, log=True)  # log kept from the default lr range
    assert node.params["batch_size"].distribution == CategoricalDistribution((16, 32))
    assert "weight_decay" not in node.params  # dropped: not searched, the recommended value kept
    (point,) = points
    assert point["lr"] == 1e-3  # the recommended 1e-4 moved into the narrowed range
    assert point["batch_size"] == 16  # the recommended 8 is not among the choices: the first one runs first
    trial = FixedTrial({"lr": 0.05, "batch_size": 32})
    config = trial_config({**trial.params, **space(trial)})
    assert set(trial.params) == {"lr", "batch_size"}
    assert config["weight_decay"] == node.constants["weight_decay"]


def test_choices_on_a_key_the_method_does_not_search_make_it_searched() -> None:
    """class_weights is no searched key by default (issue 13: "optionally searched"): choices search it."""
    ranges = {"linear": {"class_weights": {"choices": ["none", "balanced"]}}}
    settings = _settings(["--method", "linear", "--trials", "2"])
    settings.search_ranges = ranges
    space, (point,) = build_search(["linear"], {"linear": {}}, dataset="synthetic", ranges=ranges)
    assert space.inner.root.params["class_weights"].distribution == CategoricalDistribution(("none", "balanced"))
    assert point["class_weights"] == "none"  # the recommended value runs first
    trial = FixedTrial({**point, "class_weights": "balanced"})
    constants = space(trial)  # samples first: a FixedTrial's params fill as the space suggests them
    assert trial_config({**trial.params, **constants})["class_weights"] == "balanced"
    with pytest.raises(ConfigError, match="setting of the whole sweep"):
        check_overrides("linear", {"epochs": {"choices": [2, 3]}})
    with pytest.raises(ConfigError, match="class_weights must be one of none, balanced"):
        check_overrides("linear", {"class_weights": {"choices": ["none", "sometimes"]}})


def test_a_fixed_value_reaches_every_trial_config(tmp_path, synthetic_spec) -> None:
    from medsweep.search.settings import fixed_config

    path = tmp_path / "sweep.yaml"
    ranges = {"linear": {"batch_size": {"fixed": 8}, "grad_clip": {"fixed": 0.5}}}
    path.write_text(yaml.safe_dump({"methods": ["linear"], "trials": 2, "backbone": "vit-tiny", "search_ranges": ranges}))
    settings = _settings(["--config", str(path)])
    fixed = {"linear": fixed_config(settings, synthetic_spec, "linear")}
    space, (point,) = build_search(["linear"], fixed, dataset="synthetic", ranges=settings.search_ranges)
    assert "batch_size" not in point  # no longer searched
    trial = FixedTrial(point)
    config = trial_config({**trial.params, **space(trial)})
    assert (config["batch_size"], config["grad_clip"]) == (8, 0.5)


@pytest.mark.slow
def test_a_finished_sweeps_sweep_json_repeats_it(tiny_sweep, tmp_path, capsys) -> None:
    out, _, _ = tiny_sweep
    saved = Path(out) / SETTINGS_FILE
    # The sweep's own folder holds a sweep: a repeat needs a new --out, everything else is the file's.
    assert main(["sweep", "--config", str(saved)]) == 2
    assert "already holds a sweep" in capsys.readouterr().err
    again = _settings(["--config", str(saved), "--out", str(tmp_path / "again")])
    assert json.loads(again.to_json()) == {**json.loads(saved.read_text()), "out": str(tmp_path / "again")}


def test_the_gpu_probe_sizes_for_the_largest_batch_the_changed_space_runs() -> None:
    from medsweep.search.tuning import largest_batch_size

    settings = _settings(["--method", "linear", "--trials", "2"])
    assert largest_batch_size("linear", settings, "synthetic") == 64  # the default choices 8-64
    settings.search_ranges = {"linear": {"batch_size": {"choices": [8, 16]}}}
    assert largest_batch_size("linear", settings, "synthetic") == 16
    settings.search_ranges = {"linear": {"batch_size": {"fixed": 32}}}
    assert largest_batch_size("linear", settings, "synthetic") == 32
