"""``medsweep extend`` and ``medsweep sweep --warm-start``: a search continued on the same study, or begun from an earlier one's.

One tiny finished sweep (linear on vit-tiny at 32 px, 3 trials x 2 epochs, lr 0.01 without warm-up
so its trials learn) is extended by 2 trials, then a new sweep warm-starts from it; the refusals run
without Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from medsweep.cli import main
from medsweep.errors import ConfigError
from medsweep.search.extend import best_trial, extend_sweep
from medsweep.search.settings import SweepSettings, load_settings, sweep_dataset
from medsweep.search.study import FINAL_JSON, LEADERBOARD_CSV, LOCK_FILE, MANIFEST_JSON, SETTINGS_FILE, load_study
from medsweep.search.sweep import run_sweep
from medsweep.search.tuning import tpe_startup_trials
from medsweep.search.warm import WARM_START_ATTR
from medsweep.spaces import cross_method_space, points_to_evaluate

FIRST, MORE = 3, 2


def _settings(root: Path, out: Path, cache: Path, **extra) -> SweepSettings:
    extra = {"final_seeds": 0, **extra}
    return SweepSettings(
        dataset=str(root),
        methods=["linear"],
        trials=FIRST,
        max_epochs=2,
        backbone="vit-tiny",
        image_size=32,
        wandb="disabled",
        out=out,
        cache_dir=cache,
        fixed={"lr": 0.01, "warmup_epochs": 0},
        early_stopping=False,
        **extra,
    )


@pytest.fixture(scope="module")
def cache(feature_cache) -> Path:
    return feature_cache


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ray_session, synthetic_root, cache):
    """A finished 3-trial sweep whose best trial was retrained once (final, one seed, one candidate);
    returns (folder, its study's trials as they were before any extension)."""
    out = tmp_path_factory.mktemp("sweep")
    run_sweep(_settings(synthetic_root, out, cache, final_seeds=1, final_top=1))
    return out, load_study(out).trials


@pytest.fixture(scope="module")
def extended(finished):
    """The sweep extended by 2 trials; returns (folder, trials before, (best trial, final.json) before)."""
    out, before = finished
    answer = best_trial(out), (out / FINAL_JSON).read_text()
    extend_sweep(out, trials=MORE)
    return out, before, answer


@pytest.mark.slow
def test_extend_adds_exactly_n_trials_on_the_same_study(extended):
    out, before, _ = extended
    board = pd.read_csv(out / LEADERBOARD_CSV)
    assert len(board) == FIRST + MORE and board["trial_id"].is_unique
    study = load_study(out)
    assert len(study.trials) == FIRST + MORE
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert [t.params for t in study.trials[:FIRST]] == [t.params for t in before]  # the sweep's own trials, kept
    recommended = points_to_evaluate(["linear"])
    assert sum(t.params == recommended[0] for t in study.trials) == 1  # not enqueued again
    assert load_settings(out).trials == FIRST + MORE
    assert (out / "ray" / "tune-extend-1").is_dir() and (out / "ray" / "tune").is_dir()
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert next(iter(best.values()))["best"]["trial_id"] in set(board["trial_id"])


@pytest.mark.slow
def test_extended_trials_are_not_the_draws_of_a_restarted_sampler(extended, synthetic_root):
    """What the sweep's own sampler (seed --seed) would draw next from the same 3 trials is not what
    the extension drew: its sampler was reseeded, so it continues rather than replays."""
    out, before, _ = extended
    new = [t.params for t in load_study(out).trials[FIRST:]]
    restarted = _draws(before, seed=0, count=MORE, dataset=synthetic_root.name)
    assert all(params not in restarted for params in new)
    assert all(params not in [t.params for t in before] for params in new)
    # The control: the extension's first draw (nothing pending yet) is TPE's, at seed --seed + 3 trials, from those 3.
    assert _draws(before, seed=FIRST, count=1, dataset=synthetic_root.name) == new[:1]


@pytest.mark.slow
def test_final_is_rerun_exactly_when_the_extension_changed_the_best(extended):
    """Whichever way this seeded run goes, final's answer must describe the best trial after the extension:
    rerun (one candidate: the new best) when the best changed, left byte for byte as it was otherwise."""
    out, _, (best_before, final_before) = extended
    best_after, final_after = best_trial(out), (out / FINAL_JSON).read_text()
    if best_after == best_before:
        assert final_after == final_before
    else:
        selection = next(iter(json.loads(final_after).values()))["selection"]
        assert selection["chosen"] == best_after and final_after != final_before


def _draws(history: list, seed: int, count: int, dataset: str) -> list[dict]:
    """What a TPE sampler seeded ``seed`` draws next, ``count`` times, from a study holding ``history``."""
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=tpe_startup_trials(MORE, 1))
    )
    study.add_trials(history)
    space = cross_method_space(["linear"], dataset=dataset)
    drawn = []
    for _ in range(count):
        trial = study.ask()
        space(trial)
        drawn.append(trial.params)
    return drawn


@pytest.mark.slow
def test_warm_start_adds_the_earlier_trials_as_completed_before_its_own(extended, synthetic_root, cache, tmp_path):
    earlier, _, _ = extended
    settings = _settings(synthetic_root, tmp_path / "warm", cache, warm_start=str(earlier))
    settings.trials = 1
    run_sweep(settings)
    old, study = load_study(earlier).trials, load_study(settings.out).trials
    warm, own = study[: len(old)], study[len(old) :]
    assert all(t.state == TrialState.COMPLETE and t.user_attrs[WARM_START_ATTR] == str(earlier.resolve()) for t in warm)
    assert [(t.params, t.values) for t in warm] == [(t.params, t.values) for t in old]
    assert len(own) == 1 and WARM_START_ATTR not in own[0].user_attrs
    assert own[0].params != points_to_evaluate(["linear"])[0]  # the earlier sweep ran the recommended point
    assert len(pd.read_csv(settings.out / LEADERBOARD_CSV)) == 1  # warm-started trials inform TPE, not the board
    assert json.loads((settings.out / SETTINGS_FILE).read_text())["warm_start"] == str(earlier.resolve())


@pytest.mark.slow
def test_resuming_a_finished_sweep_keeps_its_final_retrain(extended):
    """`medsweep resume` on a sweep that had finished (by mistake, or to be sure) retrained and retested its final
    candidates all over again: GPU-hours at real scale for the answer final.json already held."""
    from medsweep.search.console import SweepConsole
    from medsweep.search.resume import resume_sweep

    out, _, _ = extended
    best, final, trials = best_trial(out), (out / FINAL_JSON).read_text(), len(load_study(out).trials)
    console = SweepConsole(record=True)
    resume_sweep(out, console)
    assert f"final not rerun: the best trial is still {best}" in console.text()
    assert (out / FINAL_JSON).read_text() == final and best_trial(out) == best
    assert len(load_study(out).trials) == trials and len(pd.read_csv(out / LEADERBOARD_CSV)) == FIRST + MORE


# ------------------------------------------------------------------ refusals


def _one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _finished_looking(folder: Path) -> Path:
    """A folder with what extend checks before it starts Ray: settings, a leaderboard and best.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SETTINGS_FILE).write_text(SweepSettings(out=folder, cache_dir=folder / "cache").to_json())
    (folder / LEADERBOARD_CSV).write_text("trial_id\n")
    (folder / "best.yaml").write_text("{}\n")
    return folder


def test_extend_refuses_a_folder_without_a_sweep(tmp_path, capsys):
    assert main(["extend", str(tmp_path), "--trials", "2"]) == 2
    assert "has no sweep.json" in _one_line(capsys)


def test_extend_refuses_an_unfinished_sweep(tmp_path, capsys):
    folder = _finished_looking(tmp_path / "sweep")
    (folder / LEADERBOARD_CSV).unlink()
    assert main(["extend", str(folder), "--trials", "2"]) == 2
    assert f"medsweep resume {folder}" in _one_line(capsys)


@pytest.mark.parametrize("flags", [["--trials", "0"], []])
def test_extend_refuses_no_or_zero_trials(tmp_path, capsys, flags):
    assert main(["extend", str(_finished_looking(tmp_path / "sweep")), *flags]) == 2
    assert "--trials" in _one_line(capsys)


def test_extend_refuses_a_sweep_whose_driver_still_runs(tmp_path, capsys):
    """A live process holding the folder's lock (as a running sweep's driver does) makes extend refuse."""
    folder = _finished_looking(tmp_path / "sweep")
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from medsweep.search.lock import acquire; acquire({str(folder)!r}); print('held', flush=True); input()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(["extend", str(folder), "--trials", "2"]) == 2
        assert f"still running in {folder} (process {holder.pid})" in _one_line(capsys)
    finally:
        holder.kill()
        holder.wait()


def test_extend_refuses_a_dataset_whose_images_or_labels_changed(tmp_path, capsys, synthetic_root):
    """New trials on other images would share a leaderboard with trials scored on the old ones."""
    folder = _finished_looking(tmp_path / "sweep")
    (folder / SETTINGS_FILE).write_text(SweepSettings(dataset=str(synthetic_root), out=folder, cache_dir=folder / "cache").to_json())
    spec = sweep_dataset(load_settings(folder))
    sizes = {split: len(samples) for split, samples in spec.splits.items()}
    dataset = {"classes": spec.classes, "splits": sizes, "manifest_hash": "0" * 16, "membership_hash": "1" * 16}
    (folder / MANIFEST_JSON).write_text(json.dumps({"dataset": dataset, "stores": {}}))
    (folder / LOCK_FILE).touch()  # as the sweep's own driver left it (each driver writes its pid there)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != LOCK_FILE}
    assert main(["extend", str(folder), "--trials", "2"]) == 2
    assert "is not the one this sweep started on (as many images, but other files or labels)" in _one_line(capsys)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != LOCK_FILE} == before


def test_warm_start_refuses_an_earlier_sweep_of_other_methods(tmp_path, synthetic_root, cache):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    other = SweepSettings(dataset=str(synthetic_root), methods=["linear", "fpt_plus"], out=earlier, cache_dir=cache)
    (earlier / SETTINGS_FILE).write_text(other.to_json())
    (earlier / "optuna-study.log").write_text("")
    settings = _settings(synthetic_root, tmp_path / "new", cache, warm_start=str(earlier))
    with pytest.raises(ConfigError, match=r"swept methods \['fpt_plus', 'linear'\], this sweep \['linear'\]"):
        run_sweep(settings)
    assert not (tmp_path / "new").exists()


def test_a_sweep_holds_its_folder_lock_until_its_guard_exits(tmp_path):
    """What run_sweep, resume and extend do (InterruptGuard.lock_out): a second driver is refused
    while the guard is open, and the folder is free again once it closes."""
    from medsweep.search.interrupts import InterruptGuard
    from medsweep.search.lock import acquire

    with InterruptGuard(tmp_path) as guard:
        guard.lock_out()
        with pytest.raises(ConfigError, match=f"still running in {tmp_path}"):
            acquire(tmp_path)
    acquire(tmp_path).release()


@pytest.mark.slow
def test_a_trial_that_reported_nothing_is_read_without_tunes_warning(finished, tmp_path, caplog):
    """A trial pending when ``--budget-hours`` ended the search (or the driver stopped) has no results: reading the
    sweep's trials (the leaderboard of ``extend``, the grid a search returns) printed Tune's warning of it, a list
    of FileNotFoundErrors, where the sweep says itself what became of such trials."""
    import logging
    import shutil

    from medsweep.search.extend import all_results

    out = tmp_path / "sweep"
    shutil.copytree(finished[0] / "ray", out / "ray")
    pending = sorted((out / "ray" / "tune").glob("trial-*"))[0]
    for name in ("result.json", "progress.csv"):
        (pending / name).unlink()
    analysis = logging.getLogger("ray.tune.analysis.experiment_analysis")
    analysis.addHandler(caplog.handler)  # Ray's loggers do not propagate to the root, where caplog listens
    try:
        results = all_results(out)
    finally:
        analysis.removeHandler(caplog.handler)
    assert len(results) == len(list((out / "ray").glob("tune*/trial-*")))  # the sweep's (and any extension's) trials
    assert not [record for record in caplog.records if "Failed to fetch metrics" in record.getMessage()]
