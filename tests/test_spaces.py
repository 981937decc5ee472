"""Tests of medsweep.spaces: published tables, recommended points, define-by-run spaces, validation."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.samplers import TPESampler
from optuna.trial import FixedTrial

import medsweep.spaces
from medsweep.errors import ConfigError
from medsweep.spaces import (
    METHODS,
    TRAIN_RULES,
    LoraRow,
    allowed_keys,
    cross_method_space,
    describe,
    format_describe,
    lora_recommended,
    points_to_evaluate,
    recommended,
    replay,
    search_space_keys,
    space_for,
    to_trial_config,
    validate,
)
from medsweep.spaces.tables import LORA_TABLE
from medsweep.trainables.config import TrainConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)

# README section 5 of the LoRA-medical work, typed out by hand:
# (weights, dataset, fraction %, epochs, optimizer, lr as printed, rank).
LORA_README_ROWS = [
    ("mrm", "nih", 1, 100, "sgd", 0.05, 4),
    ("mrm", "nih", 10, 100, "sgd", 0.05, 8),
    ("mrm", "nih", 100, 100, "sgd", 0.2, 32),
    ("mrm", "chexpert", 1, 100, "sgd", 0.02, 4),
    ("mrm", "chexpert", 10, 100, "sgd", 0.05, 16),
    ("mrm", "chexpert", 100, 100, "sgd", 0.01, 32),
    ("mrm", "rsna", 1, 100, "sgd", 0.01, 4),
    ("mrm", "rsna", 10, 100, "sgd", 0.01, 32),
    ("mrm", "rsna", 100, 100, "sgd", 0.01, 32),
    ("cxr_mae", "nih", 1, 400, "adamw", 3e-3, 4),
    ("cxr_mae", "nih", 10, 200, "adamw", 1e-3, 8),
    ("cxr_mae", "nih", 100, 100, "adamw", 3e-3, 32),
    ("cxr_mae", "chexpert", 1, 400, "adamw", 3e-3, 4),
    ("cxr_mae", "chexpert", 10, 100, "adamw", 5e-3, 8),
    ("cxr_mae", "chexpert", 100, 100, "adamw", 3e-3, 32),
    ("cxr_mae", "rsna", 1, 100, "adamw", 3e-3, 4),
    ("cxr_mae", "rsna", 10, 100, "adamw", 5e-3, 8),
    ("cxr_mae", "rsna", 100, 100, "adamw", 5e-3, 32),
]

# learning_rate of the official FPT configs/dataset/*.yaml.
FPT_LRS = {
    "messidor2": 2e-4,
    "ddr": 5e-4,
    "isic2016": 5e-3,
    "isic2018": 1e-4,
    "ddsm": 1e-3,
    "cmmd": 5e-5,
    "covid": 1e-4,
    "chncxr": 5e-4,
}

# Every (method, kwargs) combination with its own recommended point.
CASES: list[tuple[str, dict[str, Any]]] = [
    *[(method, {}) for method in METHODS],
    *[(method, {"dataset": name}) for method in ("fpt", "fpt_plus") for name in FPT_LRS],
    *[("lora", {"weights": w, "dataset": d, "fraction": f}) for w, d, f, *_ in LORA_README_ROWS],
]
CASE_IDS = [f"{method}-{'-'.join(map(str, kwargs.values()))}" for method, kwargs in CASES]


def _strict_replay(space: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Replay with Optuna's out-of-range warning turned into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return replay(space, params)


def _in_distribution(value: Any, distribution: Any) -> bool:
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    return distribution.low <= value <= distribution.high


# -- published tables --------------------------------------------------------------


def test_lora_table_has_exactly_the_18_published_rows() -> None:
    assert sorted(LORA_TABLE) == sorted((w, d, f) for w, d, f, *_ in LORA_README_ROWS)


@pytest.mark.parametrize(("weights", "dataset", "fraction", "epochs", "optimizer", "lr", "rank"), LORA_README_ROWS)
def test_lora_rows_match_readme(weights: str, dataset: str, fraction: int, epochs: int, optimizer: str, lr: float, rank: int) -> None:
    assert lora_recommended(weights, dataset, fraction) == LoraRow(epochs=epochs, optimizer=optimizer, lr=lr, rank=rank)


@pytest.mark.parametrize(("weights", "dataset", "fraction", "epochs", "optimizer", "lr", "rank"), LORA_README_ROWS)
def test_lora_recommended_point_uses_absolute_lr(
    weights: str, dataset: str, fraction: int, epochs: int, optimizer: str, lr: float, rank: int
) -> None:
    point = recommended("lora", weights=weights, dataset=dataset, fraction=fraction)
    absolute = lr * 64 / 256 if weights == "cxr_mae" else lr
    assert point == {
        "method": "lora",
        "lr": pytest.approx(absolute, rel=1e-12),
        "weight_decay": 0.05 if optimizer == "adamw" else 0.0,
        "layer_decay": 0.65 if optimizer == "adamw" else 1.0,
        "class_weights": "none",
        "decay": "matrices",
        "optimizer": optimizer,
        "warmup_epochs": 5,
        "epochs": epochs,
        "batch_size": 64,
        "grad_clip": 0.0,
        "seed": 0,
        "precision": "fp32",
        "accumulate_steps": 1,
        "rank": rank,
        "alpha": 32,
        "lora_dropout": 0.1,
    }


def test_lora_lookup_is_case_insensitive_and_accepts_float_fractions() -> None:
    assert lora_recommended("CXR_MAE", "NIH", 10.0) == lora_recommended("cxr_mae", "nih", 10)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("imagenet", "nih", 1), "mrm, cxr_mae"),
        (("mrm", "mimic", 1), "nih, chexpert, rsna"),
        (("mrm", "nih", 5), "1, 10, 100"),
        (("mrm", "nih", True), "1, 10, 100"),
    ],
)
def test_lora_lookup_refuses_unknown_keys_naming_valid_ones(args: tuple[Any, ...], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        lora_recommended(*args)


@pytest.mark.parametrize("dataset", FPT_LRS)
def test_fpt_learning_rates_per_dataset(dataset: str) -> None:
    for method, side in (("fpt_plus", 128), ("fpt", 224)):
        point = recommended(method, dataset=dataset)
        assert point["lr"] == FPT_LRS[dataset]
        assert point["side_image_size"] == side
        assert (point["epochs"], point["batch_size"], point["optimizer"], point["weight_decay"]) == (20, 16, "adamw", 0.1)
        assert (point["warmup_epochs"], point["grad_clip"], point["keep_ratio"]) == (0, 1.0, 0.2)
        assert (point["num_prompts"], point["side_reduction"]) == (16, 8)


def test_unknown_dataset_falls_back_to_default_unless_weights_asked() -> None:
    assert recommended("fpt_plus", dataset="my_hospital") == recommended("fpt_plus")
    assert recommended("lora", dataset="my_hospital", fraction=1) == recommended("lora")
    assert recommended("lora")["rank"] == 8
    with pytest.raises(ConfigError, match="nih, chexpert, rsna"):
        recommended("lora", weights="mrm", dataset="my_hospital", fraction=1)
    with pytest.raises(ConfigError, match="fraction"):
        recommended("lora", weights="mrm", dataset="nih")
    with pytest.raises(ConfigError, match="LoRA-medical"):
        recommended("fpt", weights="mrm")


def test_unknown_method_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="known methods: linear, full, fpt_plus, fpt, lora"):
        recommended("ssf")


def test_other_method_defaults_cite_their_sources() -> None:
    for method in ("linear", "full", "cdtm"):
        point = recommended(method)
        assert (point["optimizer"], point["lr"], point["weight_decay"], point["warmup_epochs"]) == ("adam", 1e-4, 1e-3, 2)
    assert recommended("cdtm")["num_centers"] == 300
    assert (recommended("truncated")["optimizer"], recommended("truncated")["lr"]) == ("adam", 1e-4)
    assert recommended("adapter")["bottleneck"] == 64
    assert "cross-domain" in describe("full")["source"] and "TTL" in describe("truncated")["source"]


# -- recommended points are valid, complete configs --------------------------------


def test_train_rules_mirror_train_config() -> None:
    assert set(TRAIN_RULES) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize(("method", "kwargs"), CASES, ids=CASE_IDS)
def test_recommended_is_complete_and_valid(method: str, kwargs: dict[str, Any]) -> None:
    point = recommended(method, **kwargs)
    assert set(point) == set(allowed_keys(method))
    validate(method, point)
    TrainConfig.from_dict(point)


# -- spaces: replay, recommended points, sampling ----------------------------------


@pytest.mark.parametrize(("method", "kwargs"), CASES, ids=CASE_IDS)
def test_points_replay_to_the_recommended_config(method: str, kwargs: dict[str, Any]) -> None:
    (point,) = points_to_evaluate(method, **kwargs)
    assert all(name.rpartition(".")[2] in search_space_keys(method) for name in point)
    assert _strict_replay(space_for(method, **kwargs), point) == recommended(method, **kwargs)


def test_fixed_trial_gives_expected_flat_config_lora() -> None:
    space = space_for("lora", weights="mrm", dataset="nih", fraction=1)
    params = {"rank": 16, "optimizer": "adamw", "adamw.lr": 1e-3, "adamw.weight_decay": 0.01}
    trial = FixedTrial(params)
    constants = space(trial)
    assert trial.params == params
    assert to_trial_config({**trial.params, **constants}) == {
        "method": "lora",
        "lr": 1e-3,
        "weight_decay": 0.01,
        "optimizer": "adamw",
        "warmup_epochs": 5,
        "epochs": 400,  # CXR_MAE's NIH 1% row: the published AdamW recipe for this task
        "layer_decay": 0.65,  # the AdamW recipe's layer-wise lr decay
        "class_weights": "none",
        "decay": "matrices",
        "batch_size": 64,
        "grad_clip": 0.0,
        "seed": 0,
        "precision": "fp32",
        "accumulate_steps": 1,
        "rank": 16,
        "alpha": 32,
        "lora_dropout": 0.1,
    }
    sgd = _strict_replay(space, {"rank": 4, "optimizer": "sgd", "sgd.lr": 0.1})
    assert (sgd["lr"], sgd["weight_decay"], sgd["epochs"], sgd["optimizer"], sgd["layer_decay"]) == (0.1, 0.0, 100, "sgd", 1.0)


def test_fixed_trial_gives_expected_flat_config_fpt_plus() -> None:
    params = {"lr": 1e-3, "weight_decay": 0.05, "batch_size": 32, "keep_ratio": 0.3, "num_prompts": 8}
    assert _strict_replay(space_for("fpt_plus", dataset="isic2016"), params) == {
        "method": "fpt_plus",
        **params,
        "optimizer": "adamw",
        "warmup_epochs": 0,
        "epochs": 20,
        "grad_clip": 1.0,
        "seed": 0,
        "precision": "fp32",
        "accumulate_steps": 1,
        "side_image_size": 128,
        "side_reduction": 8,
        "class_weights": "none",
        "layer_decay": 1.0,
        "decay": "all",  # the official code decays every trainable parameter
    }


def test_replay_refuses_params_that_miss_a_searched_key() -> None:
    with pytest.raises(ConfigError, match="rank"):
        replay(space_for("lora"), {"optimizer": "sgd", "sgd.lr": 0.1})


@pytest.mark.parametrize("method", METHODS)
def test_lr_range_is_a_decade_each_side_of_recommended(method: str) -> None:
    rows = {row["name"]: row for row in describe(method)["searched"]}
    for row in rows.values():
        if row["key"] == "lr":
            assert row["distribution"]["log"]
            assert row["distribution"]["low"] == pytest.approx(row["recommended"] / 10)
            assert row["distribution"]["high"] == pytest.approx(row["recommended"] * 10)


def test_search_space_keys() -> None:
    assert search_space_keys("lora") == ("lr", "optimizer", "rank", "weight_decay")
    assert search_space_keys("fpt_plus") == ("batch_size", "keep_ratio", "lr", "num_prompts", "weight_decay")
    assert search_space_keys("truncated") == ("lr", "truncation")  # TTL uses no weight decay
    for method in METHODS:
        assert "lr" in search_space_keys(method)
        assert set(search_space_keys(method)) <= set(allowed_keys(method))


def _sample(space: Any, n: int) -> list[tuple[optuna.trial.Trial, dict[str, Any]]]:
    """Ask/tell ``n`` trials of a seeded TPE study; the objective favours small lr so TPE moves."""
    study = optuna.create_study(sampler=TPESampler(seed=0))
    trials = []
    for _ in range(n):
        trial = study.ask()
        constants = space(trial)  # suggests first: trial.params is empty before
        config = to_trial_config({**trial.params, **constants})
        study.tell(trial, math.log(config["lr"]))
        trials.append((trial, config))
    return trials


@pytest.mark.parametrize("method", METHODS)
def test_tpe_samples_stay_in_bounds_and_validate(method: str) -> None:
    space = space_for(method)
    for trial, config in _sample(space, 50):
        for name, value in trial.params.items():
            assert _in_distribution(value, trial.distributions[name]), name
        assert config["method"] == method
        assert set(config) == set(allowed_keys(method))
        validate(method, config)


def test_cross_method_space_only_suggests_the_chosen_method() -> None:
    methods = ["lora", "fpt_plus", "fpt", "truncated", "staged"]
    space = cross_method_space(methods, dataset="chexpert", fraction=10, weights="cxr_mae")
    seen = set()
    for trial, config in _sample(space, 50):
        method = trial.params["method"]
        seen.add(method)
        assert all(name.startswith(f"{method}.") for name in trial.params if name != "method")
        if method == "lora":  # only the chosen optimizer's branch
            (other,) = {"sgd", "adamw"} - {trial.params["lora.optimizer"]}
            assert not any(name.startswith(f"lora.{other}.") for name in trial.params)
        for name, value in trial.params.items():
            assert _in_distribution(value, trial.distributions[name]), name
        assert set(config) == set(allowed_keys(method))
        validate(method, config)
    assert seen == set(methods)


def test_cross_method_space_of_one_method_is_that_method_space() -> None:
    params = points_to_evaluate("cdtm")[0]
    assert replay(cross_method_space(["cdtm"]), params) == replay(space_for("cdtm"), params) == recommended("cdtm")


@pytest.mark.parametrize(
    ("methods", "kwargs"),
    [
        (["lora"], {"weights": "mrm", "dataset": "rsna", "fraction": 100}),
        (["fpt_plus"], {"dataset": "cmmd"}),
        (list(METHODS), {"weights": "cxr_mae", "dataset": "nih", "fraction": 1}),
        (["fpt", "lora", "prompt"], {"dataset": "ddsm"}),
    ],
)
def test_enqueued_points_are_asked_first_with_recommended_values(methods: list[str], kwargs: dict[str, Any]) -> None:
    points = points_to_evaluate(methods, **kwargs)
    assert len(points) == len(methods)
    space = cross_method_space(methods, **kwargs)
    study = optuna.create_study(sampler=TPESampler(seed=0))
    for point in points:
        study.enqueue_trial(point)
    for point, method in zip(points, methods, strict=True):
        trial = study.ask()
        constants = space(trial)  # suggests first: trial.params is empty before
        config = to_trial_config({**trial.params, **constants})
        assert trial.params == point
        lora_kwargs = kwargs if method == "lora" else {k: v for k, v in kwargs.items() if k != "weights"}
        assert config == recommended(method, **lora_kwargs)
        study.tell(trial, 0.0)


def test_cross_method_points_name_params_by_method() -> None:
    lora, fpt = points_to_evaluate(["lora", "fpt"])
    assert lora == {"method": "lora", "lora.rank": 8, "lora.optimizer": "adamw", "lora.adamw.lr": 7.5e-4, "lora.adamw.weight_decay": 0.05}
    assert fpt["method"] == "fpt" and fpt["fpt.lr"] == 5e-4 and fpt["fpt.keep_ratio"] == 0.2


@pytest.mark.parametrize(
    ("methods", "kwargs", "message"),
    [
        ([], {}, "no methods"),
        (["lora", "lora"], {}, "more than once"),
        (["lora", "ssf"], {}, "known methods"),
        (["fpt", "linear"], {"weights": "mrm", "dataset": "nih", "fraction": 1}, "lora is not among"),
    ],
)
def test_cross_method_space_refuses_bad_method_lists(methods: list[str], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cross_method_space(methods, **kwargs)


def test_space_pickles_for_ray_searcher_checkpoints() -> None:
    space = cross_method_space(["lora", "fpt_plus"], weights="mrm", dataset="nih", fraction=10)
    restored = pickle.loads(pickle.dumps(space))
    point = points_to_evaluate(["lora", "fpt_plus"], weights="mrm", dataset="nih", fraction=10)[0]
    assert replay(restored, point) == replay(space, point)


# -- to_trial_config ---------------------------------------------------------------


def test_to_trial_config_strips_chosen_prefixes_and_passes_other_keys() -> None:
    sampled = {"method": "lora", "lora.rank": 4, "lora.optimizer": "sgd", "lora.sgd.lr": 0.05, "epochs": 100, "dataset_dir": "/d"}
    assert to_trial_config(sampled) == {"method": "lora", "rank": 4, "optimizer": "sgd", "lr": 0.05, "epochs": 100, "dataset_dir": "/d"}


@pytest.mark.parametrize(
    ("sampled", "message"),
    [
        ({"lr": 0.1}, "'method'"),
        ({"method": "lora", "fpt.lr": 0.1}, "belongs to 'fpt'"),
        ({"method": "lora", "optimizer": "sgd", "adamw.lr": 0.1}, "belongs to 'adamw'"),
        ({"method": "fpt", "fpt.lr": 0.1, "lr": 0.2}, "set twice"),
    ],
)
def test_to_trial_config_refuses_mixed_trials(sampled: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        to_trial_config(sampled)


# -- validate ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "values", "message"),
    [
        ("lora", {"rank": 0}, "rank"),
        ("lora", {"rank": True}, "rank must be int"),
        ("lora", {"rank": 8.5}, "rank must be int"),
        ("lora", {"lora_dropout": 1.0}, "lora_dropout"),
        ("fpt_plus", {"keep_ratio": 0.0}, r"keep_ratio must be in \(0, 1\]"),
        ("fpt", {"keep_ratio": 1.01}, "keep_ratio"),
        ("fpt", {"keep_ratio": -0.2}, "keep_ratio"),
        ("linear", {"lr": 0.0}, "lr"),
        ("linear", {"lr": -1e-3}, "lr"),
        ("linear", {"lr": math.inf}, "lr must be finite"),
        ("linear", {"lr": math.nan}, "lr must be finite"),
        ("linear", {"lr": "1e-3"}, "lr must be float"),
        ("full", {"weight_decay": -0.1}, "weight_decay"),
        ("fpt_plus", {"num_prompts": 0}, "num_prompts"),
        ("prompt", {"num_prompts": 0}, "num_prompts"),
        ("prompt", {"deep": "yes"}, "deep must be bool"),
        ("adapter", {"bottleneck": 0}, "bottleneck"),
        ("cdtm", {"epochs": 0}, "epochs"),
        ("cdtm", {"batch_size": 0}, "batch_size"),
        ("adapter", {"optimizer": "rmsprop"}, "optimizer must be one of adamw, sgd, adam"),
        ("fpt", {"rank": 8}, "unknown key.*rank.*allowed: method, lr"),
        ("linear", {"bottleneck": 8, "lr_scale": 2}, "bottleneck, lr_scale"),
        ("lora", {"method": "fpt"}, "method 'fpt'"),
        ("truncated", {"truncation": 0}, r"truncation must be in \[1, inf\) or -1"),
        ("truncated", {"truncation": -2}, "truncation"),
        ("fpt_plus", {"side_image_size": 4}, "side_image_size"),
        ("lora", {"alpha": 0}, "alpha"),
        ("truncated", {"granularity": "stage"}, "granularity"),
        ("staged", {"stage1": "full"}, "stage1"),
        ("staged", {"stage1_epochs": 100, "epochs": 100}, "stage1_epochs"),
        ("ssf", {}, "known methods"),
    ],
)
def test_validate_refuses(method: str, values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(method, values)


def test_validate_accepts_boundaries_and_partial_overrides() -> None:
    validate("fpt_plus", {"keep_ratio": 1.0, "lr": 1e-5})
    validate("truncated", {"truncation": -1, "granularity": "layer"})
    validate("fpt", {"side_image_size": 0})  # 0: the method derives it from the frozen input size
    validate("lora", {"alpha": 16.0, "rank": 1})
    validate("full", {"weight_decay": 0, "warmup_epochs": 0.5})  # YAML ints stand for floats
    validate("linear", {})


# -- describe ----------------------------------------------------------------------


@pytest.mark.parametrize(("method", "kwargs"), CASES, ids=CASE_IDS)
def test_describe_is_json_and_consistent(method: str, kwargs: dict[str, Any]) -> None:
    desc = describe(method, **kwargs)
    assert json.loads(json.dumps(desc))["recommended"] == desc["recommended"]
    assert desc["recommended"] == recommended(method, **kwargs)
    assert {row["key"] for row in desc["searched"]} == set(search_space_keys(method))
    for row in desc["searched"]:
        dist = row["distribution"]
        if dist["type"] == "categorical":
            assert row["recommended"] in dist["choices"]
        else:
            assert dist["low"] <= row["recommended"] <= dist["high"]
    text = format_describe(desc)
    assert desc["source"] in text and all(row["name"] in text for row in desc["searched"])


def test_describe_names_the_lora_table_source() -> None:
    desc = describe("lora", weights="cxr_mae", dataset="nih", fraction=1)
    assert desc["source"].startswith("LoRA-medical README table 5.2, CXR_MAE, NIH 1%")
    conditions = {row["name"]: row["when"] for row in desc["searched"]}
    assert conditions == {
        "rank": None,
        "optimizer": None,
        "sgd.lr": "optimizer=sgd",
        "adamw.lr": "optimizer=adamw",
        "adamw.weight_decay": "optimizer=adamw",
    }
    assert describe("fpt", dataset="cmmd")["source"].endswith("lr 5e-05 from FPT configs/dataset/cmmd.yaml")


# -- purity ------------------------------------------------------------------------


def test_spaces_imports_nothing_but_errors_from_medsweep_and_no_ray() -> None:
    for path in Path(medsweep.spaces.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            for module in modules:
                assert not module.startswith("ray"), (path.name, module)
                if module.startswith("medsweep"):
                    assert module == "medsweep.errors" or module.startswith("medsweep.spaces"), (path.name, module)
