"""Multi-objective search with its Pareto front, a time budget instead of a trial count, GPU fractions by method."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

MB = 2**20
GPU_80GB = 80 * 2**30


def _tiny_settings(root, out, cache, **overrides):
    from medsweep.search.settings import SweepSettings

    return SweepSettings(
        **{
            "dataset": str(root),
            "methods": ["fpt_plus", "linear"],
            "trials": 4,
            "max_epochs": 1,
            "grace_period": 1,
            "backbone": "vit-tiny",
            "image_size": 64,
            "wandb": "disabled",
            "out": out,
            "cache_dir": cache,
            "fixed": {"side_reduction": 2},
            "final_seeds": 0,
            **overrides,
        }
    )


# ----------------------------------------------------------------- GPU fractions


def test_gpu_fraction_packs_the_fpt_plus_paper_memory_figures_on_an_80_gb_gpu():
    from medsweep.search.tuning import gpu_fraction

    # FPT+ 736 MB: 736 x 1.5 + 500 = 1,604 MB fits a sixteenth (5,120 MB) of 80 GB.
    assert gpu_fraction(736 * MB, GPU_80GB, "fpt_plus") == 1 / 16
    # Full fine-tuning's 23,128 MB: 35,192 MB needs half (40,960 MB), not a quarter (20,480 MB);
    # the rule gives a PETL method with that footprint a half, and `full` whole GPUs.
    assert gpu_fraction(23_128 * MB, GPU_80GB, "lora") == 1 / 2
    assert gpu_fraction(23_128 * MB, GPU_80GB, "full") == 1.0
    assert gpu_fraction(23_128 * MB, GPU_80GB, "full", workers=4) == 4.0
    # On a 24 GB GPU FPT+ takes a eighth (3,072 MB >= 1,604 MB; a sixteenth is 1,536 MB).
    assert gpu_fraction(736 * MB, 24 * 2**30, "fpt_plus") == 1 / 8
    # More than a whole GPU: still one (it may not fit at all), never more.
    assert gpu_fraction(100 * 2**30, GPU_80GB, "lora") == 1.0


def test_gpu_fractions_are_probed_per_method_and_zero_without_gpus(ray_session, synthetic_root, tmp_path):
    from medsweep.datasets import load_imagefolder
    from medsweep.search.tuning import gpu_fraction, gpu_plan, probe_methods, trial_resources

    assert ray_session.cluster_resources().get("GPU", 0) == 0
    settings = _tiny_settings(synthetic_root, tmp_path / "out", tmp_path / "cache")
    spec = load_imagefolder(synthetic_root, name="synthetic")
    assert gpu_plan(settings, spec)[0] == {"fpt_plus": 0.0, "linear": 0.0}
    # The probe itself (a Ray task, the CPU proxy here) at each method's largest searched batch.
    probes = probe_methods(settings, spec)
    assert {m: p["batch_size"] for m, p in probes.items()} == {"fpt_plus": 32, "linear": 64}
    assert all(p["peak_bytes"] > 0 for p in probes.values())
    assert probes["linear"]["peak_bytes"] < probes["fpt_plus"]["peak_bytes"]
    # Those numbers on an 80 GB GPU: tiny models, the smallest share.
    assert {m: gpu_fraction(p["peak_bytes"], GPU_80GB, m) for m, p in probes.items()} == {"fpt_plus": 1 / 16, "linear": 1 / 16}
    # Each trial reserves its own method's fraction.
    resources = trial_resources(settings, {"fpt_plus": 0.5, "linear": 0.125})
    assert resources({"method": "fpt_plus"}).bundles == [{"CPU": 1.0, "GPU": 0.5}]
    assert resources({"method": "linear"}).bundles == [{"CPU": 1.0, "GPU": 0.125}]
    assert trial_resources(settings, {"fpt_plus": 0.0, "linear": 0.0})({"method": "linear"}).bundles == [{"CPU": 1.0}]
    # --gpus-per-trial overrides every method.
    settings.gpus_per_trial = 0.25
    assert gpu_plan(settings, spec)[0] == {"fpt_plus": 0.25, "linear": 0.25}


# A CPU machine, and two nodes of a GPU cluster.
TWO_CPUS = [{"CPU": 2.0}]
GPU_NODES = [{"CPU": 16.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 2.0}]


@pytest.mark.parametrize(
    ("overrides", "nodes", "needle"),
    [
        ({"gpus_per_trial": 0.5}, TWO_CPUS, "--gpus-per-trial 0.5, but this Ray has no GPU; leave it out"),
        ({"cpus_per_trial": 4.0}, TWO_CPUS, "--cpus-per-trial 4: no node of this Ray has that many CPUs (the largest has 2); pass at most 2"),
        ({"gpus_per_trial": 3.0}, GPU_NODES, "--gpus-per-trial 3: no node of this Ray has that many GPUs (the largest has 2)"),
        ({"methods": ["full"], "workers": 4, "fixed": {}}, TWO_CPUS, "--workers 4: a DDP group of full takes one of this Ray's CPUs per worker, and it has 2"),
        ({"methods": ["full"], "workers": 4, "gpus_per_trial": 4.0, "fixed": {}}, GPU_NODES, "takes one of this Ray's GPUs per worker, and it has 3"),
    ],
)
def test_a_trial_no_node_can_place_is_refused_before_the_sweep_starts(overrides, nodes, needle, tmp_path):
    """Tune would wait for such a trial for good (a 2-CPU machine asked for a GPU did: the sweep never ended)."""
    from medsweep.errors import ConfigError
    from medsweep.search.tuning import check_trials_fit

    with pytest.raises(ConfigError) as refused:
        check_trials_fit(_tiny_settings(tmp_path, tmp_path / "out", tmp_path / "cache", **overrides), nodes)
    assert needle in str(refused.value)


def test_trials_that_fit_pass_the_placement_check(tmp_path):
    from medsweep.search.tuning import check_trials_fit

    check_trials_fit(_tiny_settings(tmp_path, tmp_path / "out", tmp_path / "cache"), TWO_CPUS)
    check_trials_fit(_tiny_settings(tmp_path, tmp_path / "out", tmp_path / "cache", gpus_per_trial=2.0), GPU_NODES)
    # A DDP group spreads over nodes (auto GPUs: one whole GPU per worker); the other method's trials each fit one node.
    check_trials_fit(_tiny_settings(tmp_path, tmp_path / "out", tmp_path / "cache", methods=["full", "linear"], workers=3, fixed={}), GPU_NODES)
    check_trials_fit(_tiny_settings(tmp_path, tmp_path / "out", tmp_path / "cache", methods=["full"], workers=2, fixed={}), TWO_CPUS)


def test_a_sweep_asking_for_a_gpu_on_a_cpu_ray_writes_nothing(ray_session, synthetic_root, tmp_path):
    from medsweep.errors import ConfigError
    from medsweep.search.sweep import run_sweep

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="but this Ray has no GPU"):
        run_sweep(_tiny_settings(synthetic_root, out, tmp_path / "cache", gpus_per_trial=1.0))
    assert not out.exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["sweep", "--budget-hours", "0"], "--budget-hours must be a number of hours > 0"),
        (["sweep", "--budget-hours", "-2", "--trials", "4"], "--budget-hours must be a number of hours > 0"),
        (["sweep", "--objective", "auc,speed"], "--objective takes a comma-separated list of auc, memory, params"),
        (["sweep", "--objective", "memory"], "--objective must name auc once"),
    ],
)
def test_bad_budget_or_objective_is_one_line_and_exit_code_2(argv, needle, capsys):
    from medsweep.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medsweep: error: ")
    assert needle in err


def test_no_trial_count_and_no_budget_is_refused():
    from medsweep.errors import ConfigError
    from medsweep.search.settings import SweepSettings

    with pytest.raises(ConfigError, match="--trials N or --budget-hours H"):
        SweepSettings(trials=None)


# ------------------------------------------------------------ multi-objective


def _non_dominated(rows: list[tuple[float, float]]) -> list[bool]:
    """Brute force: maximise the first value, minimise the second."""
    keep = []
    for i, (a, m) in enumerate(rows):
        dominated = any(b >= a and n <= m and (b > a or n < m) for j, (b, n) in enumerate(rows) if j != i)
        keep.append(not dominated)
    return keep


@pytest.fixture(scope="module")
def cache(tiny_sweep) -> Path:
    """The session sweep's preload cache: the sweeps here use its FPT+ and linear stores (vit-tiny, 64 px,
    side reduction 2), which they would otherwise write once more (~11 s)."""
    return tiny_sweep[1].cache_dir


@pytest.fixture(scope="module")
def multi_sweep(tmp_path_factory, ray_session, synthetic_root, cache):
    from medsweep.search.console import SweepConsole
    from medsweep.search.sweep import run_sweep

    out = tmp_path_factory.mktemp("multi")
    # Two epochs at lr 0.01: with one epoch at the published rates every trial predicts one class
    # (collapsed, never on the front), and the front would be empty.
    settings = _tiny_settings(
        synthetic_root, out, cache, objective="auc,memory",
        max_epochs=2, fixed={"side_reduction": 2, "lr": 0.01, "warmup_epochs": 0},
    )  # fmt: skip
    console = SweepConsole(record=True)
    run_sweep(settings, console)
    return out, settings, console.text()


@pytest.mark.slow
def test_multi_objective_sweep_exports_the_studys_pareto_front(multi_sweep, capsys):
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    from medsweep.cli import main
    from medsweep.search.study import load_study
    from medsweep.spaces import points_to_evaluate, to_trial_config

    out, settings, text = multi_sweep
    study = load_study(out)
    assert study.directions == [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]
    trials = sorted(study.trials, key=lambda t: t.number)
    for trial, point in zip(trials, points_to_evaluate(settings.methods, dataset="synthetic"), strict=False):  # more trials than recommended points
        assert trial.params == pytest.approx(point)  # the recommended points still run first

    board = pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str})
    assert len(board) == settings.trials and "on_pareto_front" in board
    usable = board[~board["status"].isin(["error", "diverged", "collapsed"])]
    expected = usable[_non_dominated(list(zip(usable["best_val_auc"], usable["peak_mem_mb"], strict=True)))]
    front = pd.read_csv(out / "pareto.csv", dtype={"trial_id": str})  # "03e51177" is an id, not inf
    assert len(front) > 0
    assert set(front["trial_id"]) == set(expected["trial_id"]) == set(board[board["on_pareto_front"]]["trial_id"])

    # The study's best trials are the exported front: same values, same params. The study was told a
    # collapsed trial's values too (never selected, so off the exported front): it is left out here.
    told = board[~board["status"].isin(["error", "diverged"])]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == len(told)
    collapsed = {(round(a, 6), round(m, 6)) for a, m in zip(*(board[board["status"] == "collapsed"][c] for c in ("best_val_auc", "peak_mem_mb")), strict=True)}
    usable_trials = [t for t in complete if (round(t.values[0], 6), round(t.values[1], 6)) not in collapsed]
    on_front = _non_dominated([(t.values[0], t.values[1]) for t in usable_trials])
    best_usable = [t for t, keep in zip(usable_trials, on_front, strict=True) if keep]
    best = sorted((round(t.values[0], 6), round(t.values[1], 6)) for t in best_usable)
    assert best == sorted((round(a, 6), round(m, 6)) for a, m in zip(front["best_val_auc"], front["peak_mem_mb"], strict=True))
    for trial in best_usable:  # each front trial's sampled params are one exported config's values
        params = to_trial_config(trial.params) if "method" in trial.params else trial.params
        params = {k: v for k, v in params.items() if k not in settings.fixed}  # a fixed value wins over the sample
        assert any(
            all(math.isclose(v, cfg.get(k), rel_tol=1e-9) if isinstance(v, float) else cfg.get(k) == v for k, v in params.items())
            for cfg in map(json.loads, front["config_json"])
        ), params

    (entry,) = yaml.safe_load((out / "best.yaml").read_text()).values()
    assert entry["objectives"] == ["auc", "memory"]
    assert entry["best"]["trial_id"] == board.iloc[0]["trial_id"]  # best.yaml's answer stays the best AUC
    assert {e["trial_id"] for e in entry["pareto_front"]} == set(front["trial_id"])
    assert np.isfinite(front["peak_mem_mb"]).all()
    named = ", ".join(f"{row.trial_id} {row.method}" for row in board[board["on_pareto_front"]].itertuples())
    assert f"pareto front of auc, memory: {named} (pareto.csv)" in text  # the sweep's console, below its leaderboard
    assert main(["best", str(out)]) == 0
    named = ", ".join(f"{e['trial_id']} {e['config']['method']}" for e in entry["pareto_front"])
    assert capsys.readouterr().out.splitlines()[-1] == f"  pareto front of auc, memory: {named}"


# ------------------------------------------------------------------ time budget


@pytest.mark.slow
def test_a_time_budget_without_a_trial_count_ends_the_search(ray_session, synthetic_root, cache, tmp_path):
    from medsweep.search.console import SweepConsole
    from medsweep.search.settings import load_settings
    from medsweep.search.sweep import run_sweep

    out = tmp_path / "budget"
    settings = _tiny_settings(synthetic_root, out, cache, trials=None, budget_hours=0.005)  # 18 s
    console = SweepConsole(record=True)
    run_sweep(settings, console)
    board = pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str})
    ran = board[board["epochs_run"] >= 1]
    assert len(ran) >= 2, board  # at least the two recommended points
    assert set(ran["method"]) >= {"fpt_plus", "linear"}
    text = console.text()
    assert re.search(r"\(1( done)?\)", text) and "(1/" not in text and "/None" not in text  # counted without a total
    saved = load_settings(out)
    assert saved.budget_hours == 0.005 and saved.trials is None


# ------------------------------------------------------------------ TPE start-up


def test_tpe_models_short_sweeps_after_their_recommended_points():
    from medsweep.search.tuning import TPE_STARTUP_TRIALS, tpe_startup_trials

    assert tpe_startup_trials(8, recommended=2) == 2  # the default sweep: TPE from the third trial on
    assert tpe_startup_trials(24, recommended=2) == 6
    assert tpe_startup_trials(4, recommended=3) == 3  # never before every recommended point has run
    assert tpe_startup_trials(200, recommended=2) == TPE_STARTUP_TRIALS == 10  # long sweeps: Optuna's default
    assert tpe_startup_trials(None, recommended=2) == TPE_STARTUP_TRIALS  # bounded by --budget-hours only
