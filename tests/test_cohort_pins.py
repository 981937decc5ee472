"""Cohort-aware sampling: a fused method's trials come in runs of K sharing their shape keys (no Ray cluster)."""

from __future__ import annotations

from collections import defaultdict

import pytest
from optuna.samplers import TPESampler

from medsweep.search.cohort_pins import CohortPins
from medsweep.search.space import build_search, trial_config
from medsweep.search.tuning import SweepSearch, cohort_pins
from medsweep.trainables.cohort import cohort_key, shape_keys

SHAPE = ("batch_size", "num_prompts")  # FPT+'s searched shape keys; linear's is batch_size


def _searcher(methods: list[str], sizes: dict[str, int] | None) -> SweepSearch:
    space, points = build_search(methods, {method: {"method": method} for method in methods}, dataset="synthetic")
    searcher = SweepSearch(space=space, metric="best_val_auc", mode="max", points_to_evaluate=points, sampler=TPESampler(seed=3, n_startup_trials=4))
    searcher.pins = cohort_pins(methods, sizes or {})  # as build_searcher sets them
    return searcher


def _run(searcher: SweepSearch, count: int, start: int = 0) -> list[dict]:
    """Suggest ``count`` trials, telling each a value at once (so TPE models the later ones)."""
    configs = []
    for index in range(start, start + count):
        config = trial_config(searcher.suggest(f"t{index}"))
        searcher.on_trial_complete(f"t{index}", {"best_val_auc": 0.5 + 0.01 * (index % 7)})
        configs.append(config)
    return configs


def _runs_of(configs: list[dict], size: int) -> dict[str, list[list[dict]]]:
    by_method: dict[str, list[dict]] = defaultdict(list)
    for config in configs:
        by_method[config["method"]].append(config)
    return {method: [trials[i : i + size] for i in range(0, len(trials), size)] for method, trials in by_method.items()}


def test_shape_keys_are_what_the_cohort_key_compares() -> None:
    keys = shape_keys("fpt_plus")
    assert {"batch_size", "num_prompts", "side_reduction", "seed", "epochs"} <= keys
    assert not {"keep_ratio", "fusion_dropout", "lr", "weight_decay", "warmup_epochs"} & keys  # members may differ here
    base = {"method": "fpt_plus", "backbone": "vit-tiny", "image_size": 64, "num_classes": 2}
    assert cohort_key({**base, "lr": 1e-3, "keep_ratio": 0.2}) == cohort_key({**base, "lr": 1e-4, "keep_ratio": 0.4})
    assert cohort_key({**base, "num_prompts": 8}) != cohort_key({**base, "num_prompts": 16})
    assert cohort_key({**base, "batch_size": 8}) != cohort_key({**base, "batch_size": 32})


def test_a_fused_methods_trials_come_in_runs_sharing_their_shape() -> None:
    configs = _run(_searcher(["fpt_plus"], {"fpt_plus": 4}), 12)
    runs = _runs_of(configs, 4)["fpt_plus"]
    assert [len(run) for run in runs] == [4, 4, 4]
    assert (configs[0]["num_prompts"], configs[0]["batch_size"]) == (16, 16)  # the recommended point leads the first run
    for run in runs:
        assert len({tuple(config[k] for k in SHAPE) for config in run}) == 1, run
        assert len({config["lr"] for config in run}) == len(run)  # the rest is still sampled per trial
    assert len({cohort_key(config) for config in configs}) <= 3  # three cohorts' worth, not up to twelve
    alone = _run(_searcher(["fpt_plus"], None), 12)
    assert len({cohort_key(config) for config in alone}) > 3  # what TPE draws without pins (the seed fixes it)


def test_the_method_stays_free_and_each_methods_runs_keep_their_shape() -> None:
    configs = _run(_searcher(["fpt_plus", "linear"], {"fpt_plus": 3, "linear": 3}), 18)
    assert {config["method"] for config in configs} == {"fpt_plus", "linear"}
    for method, runs in _runs_of(configs, 3).items():
        keys = SHAPE if method == "fpt_plus" else ("batch_size",)
        for run in runs:
            assert len({tuple(config[k] for k in keys) for config in run}) == 1, (method, run)


def test_an_unfused_method_is_not_pinned() -> None:
    searcher = _searcher(["fpt_plus", "lora"], {"fpt_plus": 4})
    configs = _run(searcher, 10)
    assert set(searcher.pins.runs) == {"fpt_plus"}
    assert any(config["method"] == "lora" for config in configs)


def test_open_runs_survive_a_save_and_restore(tmp_path) -> None:
    searcher = _searcher(["fpt_plus"], {"fpt_plus": 4})
    first = _run(searcher, 6)  # a run of 4, then 2 of the next run
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = _searcher(["fpt_plus"], None)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.pins is not None and restored.pins.runs["fpt_plus"].remaining == 2
    rest = _run(restored, 2, start=6)
    assert {tuple(config[k] for k in SHAPE) for config in first[4:] + rest} == {tuple(first[4][k] for k in SHAPE)}


@pytest.mark.parametrize("size", [1, 0])
def test_a_cohort_size_below_two_pins_nothing(size: int) -> None:
    pins = CohortPins({"fpt_plus": size}, {"fpt_plus": shape_keys("fpt_plus")}, "fpt_plus")
    pins.record({"batch_size": 8, "num_prompts": 4, "lr": 1e-3})
    assert pins.fixed_params() == {}
