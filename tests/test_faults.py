"""Faults a long sweep meets, injected for real: a killed driver, a killed trial, a NaN loss, a lost node.

Every process is killed with SIGKILL at a chosen moment, found by what it
is: the ``medsweep sweep`` driver is the process group this test started;
a trial is the Tune actor (``ray::ImplicitFunc``) whose process id its
last reported result gives (actors are reused, so an idle one may still sit
in the folder of a trial it never ran); a node is a ``ray.cluster_utils.Cluster``
worker. Each test waits until the sweep has saved what the fault must not
lose (a finished trial, a trial checkpoint), then kills, then checks what
came back.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from medsweep.errors import ConfigError
from medsweep.search import resume
from medsweep.search.console import SweepConsole
from medsweep.search.settings import SweepSettings
from medsweep.search.study import load_study
from medsweep.search.sweep import run_sweep
from medsweep.spaces import points_to_evaluate

from processes import hold_cluster, kill_process_group

EPOCHS = 3
# At the published rates (linear 1e-4 after 2 warm-up epochs, for 100 epochs) these tiny trials
# predict one class for every validation image after three epochs (collapsed, never a best): the
# sweeps here train at lr 0.01 without warm-up, which learns the grades within two. How a trial that
# ran all its epochs ends, whichever way its last epochs went:
LEARNS = {"lr": 0.01, "warmup_epochs": 0}
RAN_TO_THE_END = {"completed", "collapsed"}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    from medsweep.datasets import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("faults-data"), seed=0, image_size=32, n_train=45, n_val=30, n_test=15)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One preload cache for the module: the linear store is written once and reused."""
    return tmp_path_factory.mktemp("faults-cache")


def _sweep_argv(root: Path, out: Path, cache: Path, trials: int, *extra: str, epochs: int = EPOCHS) -> list[str]:
    return [
        sys.executable, "-m", "medsweep.cli", "sweep",
        "--dataset", str(root), "--method", "linear", "--trials", str(trials), "--max-epochs", str(epochs),
        "--backbone", "vit-tiny", "--image-size", "32", "--wandb", "disabled", "--no-early-stopping",
        "--out", str(out), "--cache-dir", str(cache), "--quiet",
        *(arg for key, value in LEARNS.items() for arg in ("--set", f"{key}={value}")), *extra,
    ]  # fmt: skip


def _results(trial_dir: Path) -> list[dict]:
    """The trial's reported results, as Tune's driver wrote them (``result.json``, one line each)."""
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _trial_dirs(out: Path) -> list[Path]:
    return sorted((out / "ray" / "tune").glob("trial-*"))


def _checkpointed_early(out: Path, epochs: int = EPOCHS) -> list[Path]:
    """Trials with a checkpoint and at least two of their ``epochs`` still to run. A trial runs at most one
    report ahead of the driver that writes ``result.json``, so a trial seen here cannot finish before a kill
    that follows at once (seen with one epoch left: the last report was already on its way)."""
    return [t for t in _trial_dirs(out) if list(t.glob("checkpoint_*")) and 0 < len(_results(t)) <= epochs - 2]


def _snapshot_knows_checkpoint(out: Path, trial_dir: Path) -> bool:
    """Whether Tune's newest experiment snapshot records a checkpoint of this trial that is still on disk:
    a killed driver's restore knows only what its last snapshot held, and the snapshot follows the
    checkpoint on disk. Read from the trial's pickled checkpoint manager: every trial's entry names a
    ``checkpoint_manager``, so finding the word in it proves nothing (a CI run once killed the driver
    before any checkpoint was recorded, and the resumed trial rightly started from epoch 1)."""
    trial_id = trial_dir.name.removeprefix("trial-")
    for path in sorted((out / "ray" / "tune").glob("experiment_state-*.json"))[-1:]:
        try:
            entries = json.loads(path.read_text())["trial_data"]
            managers = [json.loads(metadata)["checkpoint_manager"] for state, metadata in entries if f'"trial_id": "{trial_id}"' in state]
            latest = [pickle.loads(bytes.fromhex(m["value"])).latest_checkpoint_result for m in managers]
        except (OSError, ValueError, KeyError, pickle.UnpicklingError, EOFError):  # being rewritten as we read
            return False
        return any(result is not None and Path(result.checkpoint.path).is_dir() for result in latest)
    return False


def _finished(out: Path, epochs: int = EPOCHS) -> list[Path]:
    return [t for t in _trial_dirs(out) if any(r["epoch"] == epochs for r in _results(t))]


def _snapshot_knows_finished(out: Path, trial_dir: Path) -> bool:
    """Whether Tune's newest experiment snapshot records the trial as TERMINATED: its last result is on
    disk before the snapshot says so, and a killed driver's restore reruns a trial it thought running."""
    trial_id = trial_dir.name.removeprefix("trial-")
    for path in sorted((out / "ray" / "tune").glob("experiment_state-*.json"))[-1:]:
        try:
            states = [json.loads(state) for state, _ in json.loads(path.read_text())["trial_data"]]
        except (OSError, ValueError, KeyError):  # being rewritten as we read
            return False
        return any(state.get("trial_id") == trial_id and state.get("status") == "TERMINATED" for state in states)
    return False


def _start_driver(
    argv: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """A ``medsweep`` process in its own process group (so it can be killed whole), logging to a file;
    ``env``: variables set for it beside this process's own."""
    with log.open("w") as sink:
        return subprocess.Popen(
            argv, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **(env or {})}
        )


def _wait_for(inject: Callable[[], bool], timeout: float, driver: subprocess.Popen, log: Path) -> None:
    """Call ``inject`` until it reports that it injected its fault; fail if the driver ends first."""
    deadline = time.monotonic() + timeout
    while not inject():
        if driver.poll() is not None:
            pytest.fail(f"the sweep ended before the fault could be injected:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no fault moment within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _trial_processes(root_pid: int, actor: str = "ImplicitFunc") -> dict[int, psutil.Process]:
    """Ray actors of class ``actor`` under ``root_pid`` (default: Tune trial actors), by process id."""
    found = {}
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            command = proc.cmdline()  # once: a process that exits in between has none
            if command and command[0].startswith(f"ray::{actor}"):
                found[proc.pid] = proc
        except psutil.Error:  # exited while we looked
            continue
    return found


def _running_pid(trial_dir: Path) -> int:
    """The process that runs the trial: the one that reported its last result."""
    return _results(trial_dir)[-1]["pid"]


def _restored_from_checkpoint(results: list[dict]) -> bool:
    """A report that is the first since a restore but not epoch 1: the loop resumed from a checkpoint."""
    return any(r["iterations_since_restore"] == 1 and r["epoch"] > 1 for r in results)


def _resume_args(out: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medsweep")
    resume.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["resume", str(out), "--quiet"])


def test_resume_names_the_fix_when_the_folder_holds_no_sweep(tmp_path):
    with pytest.raises(ConfigError, match=r"has no sweep\.json; pass the --out folder") as error:
        resume.run(_resume_args(tmp_path))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("name", "saved", "damage"),
    [
        ("search_gen_state-2026-12-07_07-49-19.json", b"", "an empty file"),  # what a driver killed mid-copy left (before atomic_storage)
        ("searcher-state-2026-12-07_07-49-19.pkl", pickle.dumps({"study": list(range(50))})[:40], "pickle exhausted"),
        ("experiment_state-2026-12-07_07-49-19.json", b'{"trial_data": [', "Expecting value"),
    ],
)
def test_resume_refuses_a_damaged_snapshot_in_one_line_before_anything_starts(tmp_path, name, saved, damage):
    """Tune's restore meets a damaged snapshot file inside a try that restarts the whole search without
    its finished trials; resume names the file and the fix instead, and leaves the folder as it was."""
    (tmp_path / "sweep.json").write_text(SweepSettings(methods=["linear"], out=tmp_path).to_json())
    experiment = tmp_path / "ray" / "tune"
    experiment.mkdir(parents=True)
    (experiment / "experiment_state-2026-12-07_07-49-19.json").write_text("{}")
    (experiment / "search_gen_state-2026-12-07_07-40-00.json").write_bytes(pickle.dumps({"counter": 2}))  # older, whole
    (experiment / name).write_bytes(saved)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    with pytest.raises(ConfigError, match=rf"{name} is damaged \({damage}.*; start it again with `medsweep sweep` and --overwrite") as error:
        resume.run(_resume_args(tmp_path))
    assert "\n" not in str(error.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _snapshot_knowing(experiment: Path, trials: list[list[Path]]) -> None:
    """An experiment snapshot as Tune writes it, each trial's manager (Tune's own, keeping 2) knowing ``trials``'
    checkpoints, the last its restore point."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager, _TrainingResult

    data = []
    for paths in trials:
        manager = _CheckpointManager(checkpoint_config=CheckpointConfig(num_to_keep=2))
        for epoch, path in enumerate(paths, start=1):
            manager.register_checkpoint(_TrainingResult(checkpoint=Checkpoint(str(path)), metrics={"epoch": epoch}))
        metadata = {"checkpoint_manager": {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(manager).hex()}}
        data.append(["{}", json.dumps(metadata)])
    (experiment / "experiment_state-2026-12-07_07-49-19.json").write_text(json.dumps({"trial_data": data}))


def _checkpoints(folder: Path, *names: str) -> list[Path]:
    for name in names:
        (folder / name).mkdir(parents=True)
        (folder / name / "checkpoint.pt").write_text(name)
    return [folder / name for name in names]


def test_resume_gives_a_trial_back_the_checkpoints_tune_deleted_before_its_snapshot_landed(tmp_path):
    """A driver that ends between Tune deleting a trial's old checkpoints and its snapshot copy landing leaves a
    snapshot knowing deleted ones (seen after a SIGTERM to the sweep's process group). The trial's newest complete
    checkpoint takes the lost restore point's name, and a lost older one comes back empty: Tune's restore finds
    its checkpoint, and its rotation at the trial's next checkpoint (Tune's own manager here) finds what it deletes."""
    from ray.train import Checkpoint
    from ray.train._internal.checkpoint_manager import _TrainingResult

    experiment = tmp_path / "ray" / "tune"
    lost, older, kept, bare = (experiment / f"trial-{name}" for name in ("lost", "older", "kept", "bare"))
    _checkpoints(lost, "checkpoint_000000", "checkpoint_000001", "checkpoint_000002", "checkpoint_000003", "checkpoint_000004")
    _checkpoints(older, "checkpoint_000000", "checkpoint_000001", "checkpoint_000002")
    _checkpoints(kept, "checkpoint_000000")
    bare.mkdir(parents=True)
    _snapshot_knowing(experiment, [
        [lost / "checkpoint_000000", lost / "checkpoint_000001"],
        [older / "checkpoint_000000", older / "checkpoint_000001"],
        [kept / "checkpoint_000000"],
        [bare / "checkpoint_000000"],
        [],
    ])  # fmt: skip
    # What the killed driver had already deleted, and one checkpoint a killed trial was still writing.
    for gone in (lost / "checkpoint_000000", lost / "checkpoint_000001", lost / "checkpoint_000002", older / "checkpoint_000000"):
        shutil.rmtree(gone)
    (lost / "checkpoint_000004" / "checkpoint.pt").unlink()

    mended = resume.mend_lost_checkpoints(experiment)

    assert len(mended) == 1 and mended[0].startswith("trial-lost: checkpoint_000001") and "going on from checkpoint_000003" in mended[0]
    assert sorted(p.name for p in lost.iterdir()) == ["checkpoint_000000", "checkpoint_000001"]  # the unknown others: gone
    assert (lost / "checkpoint_000001" / "checkpoint.pt").read_text() == "checkpoint_000003"
    assert not any((lost / "checkpoint_000000").iterdir())  # an empty stand-in for Tune to delete
    assert (kept / "checkpoint_000000" / "checkpoint.pt").read_text() == "checkpoint_000000"
    assert resume.mend_lost_checkpoints(experiment) == []  # mended once
    # Tune's rotation at each trial's next checkpoint deletes the oldest it knows, which is there again.
    state = json.loads(next(experiment.glob("experiment_state-*.json")).read_text())["trial_data"]
    for (_, metadata), folder in zip(state[:2], (lost, older), strict=True):
        manager = pickle.loads(bytes.fromhex(json.loads(metadata)["checkpoint_manager"]["value"]))
        (folder / "checkpoint_000005").mkdir(exist_ok=True)
        manager.register_checkpoint(_TrainingResult(checkpoint=Checkpoint(str(folder / "checkpoint_000005")), metrics={"epoch": 6}))
        assert not (folder / "checkpoint_000000").exists()


def test_a_rerun_trial_whose_end_the_study_holds_keeps_its_value_and_logs_nothing():
    """A killed driver told the study a trial's end before Tune's snapshot said so; the resumed sweep reruns the
    trial from its checkpoint, and its reports and end leave the study's value as it was, without Optuna's
    refusal ("Cannot tell a COMPLETE trial") on the console."""
    import logging

    from optuna.samplers import TPESampler

    from medsweep.search.space import build_search
    from medsweep.search.tuning import SweepSearch

    space, points = build_search(["linear"], {"linear": {"method": "linear"}}, dataset="synthetic")
    searcher = SweepSearch(space=space, metric="best_val_auc", mode="max", points_to_evaluate=points, sampler=TPESampler(seed=0))
    searcher.suggest("t0")
    study = searcher._ot_study
    assert study is not None
    study.tell(searcher._ot_trials["t0"], 0.7)  # what the killed driver had told
    logger, seen = logging.getLogger("ray.tune.search.optuna.optuna_search"), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        searcher.on_trial_result("t0", {"best_val_auc": 0.9, "training_iteration": 3})
        searcher.on_trial_complete("t0", {"best_val_auc": 0.9})
    finally:
        logger.removeHandler(handler)
    assert seen == []
    assert [(t.state.name, t.value) for t in study.get_trials()] == [("COMPLETE", 0.7)]


def test_an_epoch_reported_again_after_a_resume_keeps_its_first_value_without_a_warning():
    """A trial resumed from a checkpoint older than its last report reports that epoch again: the study keeps
    the first value, and Optuna's UserWarning of the second ("The reported value is ignored") stays off the console."""
    import warnings

    from optuna.samplers import TPESampler

    from medsweep.search.space import build_search
    from medsweep.search.tuning import SweepSearch

    space, points = build_search(["linear"], {"linear": {"method": "linear"}}, dataset="synthetic")
    searcher = SweepSearch(space=space, metric="best_val_auc", mode="max", points_to_evaluate=points, sampler=TPESampler(seed=0))
    searcher.suggest("t0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        searcher.on_trial_result("t0", {"best_val_auc": 0.6, "training_iteration": 2})
        searcher.on_trial_result("t0", {"best_val_auc": 0.8, "training_iteration": 2})  # the epoch, rerun
    assert [str(w.message) for w in caught] == []
    assert searcher._ot_trials["t0"].storage.get_trial(searcher._ot_trials["t0"]._trial_id).intermediate_values == {2: 0.6}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_driver_resumes_without_rerunning_finished_trials(ray_session, tiny_root, cache_dir, tmp_path, monkeypatch):
    """SIGKILL the ``medsweep sweep`` process group once one trial has finished and the next holds a
    checkpoint; ``medsweep resume`` must end with exactly the planned trials, none run twice.

    The sweep is started with paths relative to its own working directory and resumed from
    another one: ``sweep.json`` must lead the resume to the same data and preload stores.

    The fault moment needs a checkpointed trial that Tune's experiment snapshot already records while
    it has epochs left. Tune snapshots at most every 10 s by default, longer than a tiny trial's three
    epochs: CI once saw all three trials finish without such a moment. So this driver snapshots at
    every step (``TUNE_GLOBAL_CHECKPOINT_S=0``) and trains six epochs, a window of four.

    Each trial alone (``--cohort-size 1``): fused members progress together, so a finished trial beside
    a checkpointed one is a moment only trials run one by one give (tests/test_cohorts.py kills a fused sweep)."""
    killed_driver_resumes(tiny_root, cache_dir, tmp_path, monkeypatch, "--cohort-size", "1", need_finished=True, touch_an_image=True)


def _assert_snapshot_whole(experiment: Path) -> None:
    """Every file of Tune's experiment snapshot loads, however the kill fell: a driver killed while
    Tune copied a snapshot into the sweep's folder once left zero-byte files there, and the resume
    restarted the whole search (medsweep.search.atomic_storage)."""
    saved = [path for path in experiment.iterdir() if path.suffix in {".json", ".pkl"}]
    assert any(path.name.startswith("search_gen_state-") for path in saved)
    for path in saved:  # experiment_state-*.json is JSON; the rest (search_gen_state-*.json too) are pickles
        json.loads(path.read_text()) if path.name.startswith("experiment_state-") else pickle.loads(path.read_bytes())


def killed_driver_resumes(
    tiny_root: Path,
    cache_dir: Path,
    tmp_path: Path,
    monkeypatch,
    *extra: str,
    need_finished: bool,
    trials: int = 3,
    epochs: int = 6,
    touch_an_image: bool = False,
) -> Path:
    """SIGKILL a sweep's driver (started with ``extra`` flags) once a trial holds a checkpoint with epochs left
    (and, with ``need_finished``, another has finished), ``medsweep resume`` it from another directory, and
    check that it ends with exactly ``trials`` trials, none run again from scratch. Returns the sweep folder.

    ``touch_an_image``: the resume sees an image with a new modification time (a dataset copied without its
    file times): it rebuilds the store, whose key differs, and the restored trials, whose configs name the
    sweep's first store, read the rebuilt one (they once failed with a KeyError)."""
    out, log = tmp_path / "sweep", tmp_path / "driver.log"
    started_in, resumed_in = tmp_path / "started-here", tmp_path / "resumed" / "from" / "elsewhere"
    started_in.mkdir()
    resumed_in.mkdir(parents=True)
    relative = [Path(os.path.relpath(p, started_in)) for p in (tiny_root, out, cache_dir)]
    argv = _sweep_argv(*relative, trials, *extra, epochs=epochs)
    driver = _start_driver(argv, log, cwd=started_in, env={"TUNE_GLOBAL_CHECKPOINT_S": "0"})
    before: dict[str, str] = {}  # finished trial folder -> its result.json at the kill
    interrupted: list[str] = []

    def kill_driver_at_the_fault_moment() -> bool:
        finished = [t for t in _finished(out, epochs) if _snapshot_knows_finished(out, t)]
        early = [t for t in _checkpointed_early(out, epochs) if _snapshot_knows_checkpoint(out, t)]
        if not early or (need_finished and not finished):
            return False
        kill_process_group(driver)
        before.update({t.name: (t / "result.json").read_text() for t in finished})
        interrupted.extend(t.name for t in early)
        return True

    try:
        _wait_for(kill_driver_at_the_fault_moment, 400, driver, log)
    finally:
        if driver.poll() is None:
            kill_process_group(driver)
    assert driver.returncode == -signal.SIGKILL
    _assert_snapshot_whole(out / "ray" / "tune")

    monkeypatch.chdir(resumed_in)
    touched = next(tiny_root.rglob("*.png"))
    times = touched.stat()
    if touch_an_image:
        os.utime(touched, ns=(times.st_atime_ns, times.st_mtime_ns + 10**9))
    try:
        assert resume.run(_resume_args(out)) == 0
    finally:
        os.utime(touched, ns=(times.st_atime_ns, times.st_mtime_ns))  # the module's other tests see the set as it was
    assert not any(resumed_in.iterdir())  # nothing looked for or written relative to the new directory
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["resumes"][0]["stores"] != manifest["stores"]) is touch_an_image  # the store was rebuilt

    board = pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str})
    assert len(board) == trials and board["trial_id"].is_unique
    assert set(board["status"]) <= RAN_TO_THE_END
    assert (board["epochs_run"] == epochs).all()
    ids = {f"trial-{i}" for i in board["trial_id"]}
    assert interrupted and set(before) | set(interrupted) <= ids
    for name, text in before.items():  # a finished trial is read back, never run again
        assert (out / "ray" / "tune" / name / "result.json").read_text() == text
    for name in interrupted:  # an interrupted trial continues from its checkpoint
        assert _restored_from_checkpoint(_results(out / "ray" / "tune" / name))
    study = load_study(out)
    states = [t.state.name for t in study.trials]
    # An Optuna trial asked for after Tune's last snapshot is unknown to the restored run: it may be
    # left over as FAIL (resume marks such orphans), never as RUNNING, and never counts as a trial.
    assert states.count("COMPLETE") == trials and "RUNNING" not in states
    (recommended,) = points_to_evaluate(["linear"])
    assert sum(t.params == recommended for t in study.trials) == 1  # not enqueued again on resume
    assert yaml.safe_load((out / "best.yaml").read_text())[tiny_root.name]["best_method"] == "linear"
    return out


def _tiny_settings(
    root: Path, out: Path, cache: Path, methods: list[str], trials: int, epochs: int = EPOCHS, **extra
) -> SweepSettings:
    return SweepSettings(
        dataset=str(root),
        methods=methods,
        trials=trials,
        max_epochs=epochs,
        backbone="vit-tiny",
        image_size=32,
        wandb="disabled",
        out=out,
        cache_dir=cache,
        final_seeds=0,
        **{"fixed": LEARNS, "early_stopping": False, **extra},
    )


def sweep_with_fault(settings: SweepSettings, inject: Callable[[], bool], timeout: float = 400) -> None:
    """Run the sweep in this process while a thread calls ``inject`` every 50 ms, until it reports that it
    injected its fault (or ``timeout`` seconds pass: the test then finds nothing injected)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not inject():
            time.sleep(0.05)

    killer = threading.Thread(target=watch, daemon=True)
    killer.start()
    run_sweep(settings, SweepConsole(quiet=True))
    killer.join(timeout=5)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_trial_restarts_from_its_checkpoint(ray_session, tiny_root, cache_dir, tmp_path):
    """The adapter trial's process (its Tune actor) is SIGKILLed after its first checkpoint; Tune's
    ``max_failures`` starts it again and the loop restores the checkpoint through ``ray.tune.get_checkpoint``.
    Six epochs: the kill must land between the first checkpoint and the last two epochs, a window of
    four tiny epochs."""
    epochs = 6
    settings = _tiny_settings(tiny_root, tmp_path / "sweep", cache_dir, ["adapter"], trials=1, epochs=epochs)
    killed: list[str] = []

    def kill_first_checkpointed_trial() -> bool:
        running = _trial_processes(os.getpid())
        for trial_dir in _checkpointed_early(settings.out, epochs):
            if _running_pid(trial_dir) in running:
                running[_running_pid(trial_dir)].kill()
                killed.append(trial_dir.name.removeprefix("trial-"))
                return True
        return False

    sweep_with_fault(settings, kill_first_checkpointed_trial)

    board = pd.read_csv(settings.out / "leaderboard.csv", dtype={"trial_id": str}).set_index("method")
    adapter = board.loc["adapter"]
    assert killed == [adapter["trial_id"]], "the adapter trial was not caught between its first checkpoint and its end"
    assert adapter["status"] in RAN_TO_THE_END and adapter["epochs_run"] == epochs
    results = _results(settings.out / "ray" / "tune" / f"trial-{killed[0]}")
    assert _restored_from_checkpoint(results)
    assert sorted({r["epoch"] for r in results}) == list(range(1, epochs + 1))
    assert [t.state.name for t in load_study(settings.out).trials] == ["COMPLETE"]
    # The adapter on the random-weight vit-tiny may not learn the grades in six epochs (collapsed: no best).
    best_method = yaml.safe_load((settings.out / "best.yaml").read_text())[tiny_root.name]["best_method"]
    assert best_method == ("adapter" if adapter["status"] == "completed" else None)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nan_trials_are_recorded_diverged_and_the_sweep_goes_on(ray_session, tiny_root, cache_dir, tmp_path):
    """A linear probe with SGD at lr 1e12 (no clipping, batch 8: ten steps an epoch) turns its loss NaN in
    the first epoch, every time:
    each trial must end as ``diverged``, not ``error``, with no checkpoint, a FAIL in the study (Optuna
    refuses a NaN value), and the sweep must go on to the next trial and end with no best configuration.

    (LoRA with a huge ``alpha`` under AdamW, used here before, does not blow up reliably: Adam's squared
    gradient overflows to inf and freezes the update, and the ViT's LayerNorms absorb a large one, so
    whether it diverged depended on which images the first batches held.)
    """
    settings = _tiny_settings(
        tiny_root, tmp_path / "sweep", cache_dir, ["linear"], trials=2, fixed={"lr": 1e12, "optimizer": "sgd", "grad_clip": 0.0, "batch_size": 8}
    )
    run_sweep(settings, SweepConsole(quiet=True))

    board = pd.read_csv(settings.out / "leaderboard.csv", dtype={"trial_id": str})
    assert len(board) == 2  # the sweep went on after the first NaN trial
    for _, trial in board.iterrows():
        assert trial["status"] == "diverged" and trial["epochs_run"] == 1 and math.isnan(trial["best_val_auc"])
        assert not list((settings.out / "ray" / "tune" / f"trial-{trial['trial_id']}").glob("checkpoint_*"))  # NaN is never saved
    assert [t.state.name for t in load_study(settings.out).trials] == ["FAIL", "FAIL"]
    assert yaml.safe_load((settings.out / "best.yaml").read_text())[tiny_root.name]["best_method"] is None


@contextmanager
def worker_nodes_in_a_child() -> Iterator[tuple[str, list[int], Callable[[int], None]]]:
    """:func:`processes.hold_cluster` in a spawned process: yields the cluster's address, its two worker nodes'
    raylet pids, and a function that removes worker ``index`` without grace."""
    context = multiprocessing.get_context("spawn")
    conn, child_conn = context.Pipe()
    keeper = context.Process(target=hold_cluster, args=(child_conn,), daemon=True)
    keeper.start()

    def remove(index: int) -> None:
        conn.send(index)
        assert conn.poll(60) and conn.recv() == "removed"

    try:
        assert conn.poll(120), "the local cluster did not start in 120 s"
        address, raylets = conn.recv()
        yield address, raylets, remove
    finally:
        conn.send("shutdown")
        keeper.join(timeout=60)
        if keeper.is_alive():
            keeper.kill()


def sweep_through_fault(argv: list[str], log: Path, inject: Callable[[], bool], timeout: float = 400) -> None:
    """Run the CLI ``argv`` until ``inject`` has injected its fault, then require the sweep to finish (exit 0)."""
    driver = _start_driver(argv, log)
    try:
        _wait_for(inject, timeout, driver, log)
        assert driver.wait(timeout=timeout) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            kill_process_group(driver)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_sweep_finishes_on_the_remaining_nodes_when_a_worker_node_dies(tiny_root, cache_dir, tmp_path):
    """``medsweep sweep --address`` on a 3-node local cluster; the worker node running a trial that has
    checkpointed is removed mid-trial; the trial restarts from that checkpoint on the other worker."""
    removed: list[str] = []
    out, trials, log = tmp_path / "sweep", 2, tmp_path / "driver.log"
    # Six epochs: the node must go between a trial's first checkpoint and its last two epochs, a
    # window of four tiny linear-probe epochs (with three epochs the one-epoch window was missed at times).
    epochs = 6
    with worker_nodes_in_a_child() as (address, raylets, remove):

        def remove_node_of_checkpointed_trial() -> bool:
            for index, raylet in enumerate(raylets):
                running = _trial_processes(raylet)
                for trial_dir in _checkpointed_early(out, epochs):
                    if _running_pid(trial_dir) in running:
                        remove(index)
                        removed.append(trial_dir.name)
                        return True
            return False

        sweep_through_fault(_sweep_argv(tiny_root, out, cache_dir, trials, "--address", address, epochs=epochs), log, remove_node_of_checkpointed_trial)

    board = pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str})
    assert len(board) == trials and board["trial_id"].is_unique
    assert set(board["status"]) <= RAN_TO_THE_END
    # The trial on the removed node finished all its epochs elsewhere (each epoch reported once
    # after its restart). Whether it resumed from its checkpoint or had already reported its last
    # epoch when the node went is a race here; resuming from a checkpoint is proven by
    # test_a_killed_trial_restarts_from_its_checkpoint.
    epochs = [r["epoch"] for r in _results(out / "ray" / "tune" / removed[0])]
    assert max(epochs) == board.set_index("trial_id").loc[removed[0].removeprefix("trial-"), "epochs_run"]


def _last_line(log: Path) -> str:
    return [line for line in log.read_text().splitlines() if line.strip()][-1]


ANSWER = ("leaderboard.csv", "leaderboard.parquet", "best.yaml", "final.yaml", "final.json", "final", "report")


# What Ray, Tune and Optuna print by themselves at every run: a --quiet sweep or resume shows none of it.
LIBRARY_NOISE = ("Configuration for experiment", "View detailed results", "A new study created", "Token authentication is enabled")


def _assert_interrupted(out: Path, log: Path, returncode: int, expected: int) -> None:
    """Exit code and one line; no answer written, no study trial failed."""
    assert returncode == expected, log.read_text()[-3000:]
    assert _last_line(log) == f"medsweep: interrupted: `medsweep resume {out}` continues"
    assert "Traceback" not in log.read_text()
    assert not [noise for noise in LIBRARY_NOISE if noise in log.read_text()], log.read_text()[-3000:]
    assert not [name for name in ANSWER if (out / name).exists()]
    assert "FAIL" not in {t.state.name for t in load_study(out).trials}


def _interrupt_once_it_reports(argv: list[str], out: Path, log: Path, signals: tuple[signal.Signals, ...], group: bool) -> int:
    """Run ``argv`` (a sweep or a resume of ``out``); once it has reported a result of its own, send
    ``signals`` back to back to it, or with ``group`` to its whole process group (Ray's processes included, as
    ``timeout`` or SLURM's ``scancel`` do); return its exit code."""
    before = sum(len(_results(t)) for t in _trial_dirs(out))
    driver = _start_driver(argv, log)

    def signal_once_it_reported() -> bool:
        if sum(len(_results(t)) for t in _trial_dirs(out)) <= before:
            return False
        for signum in signals:
            os.killpg(driver.pid, signum) if group else driver.send_signal(signum)
        return True

    try:
        _wait_for(signal_once_it_reported, 400, driver, log)
        return driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            kill_process_group(driver)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_sweep_interrupted_each_way_writes_no_answer_and_resumes_to_its_trial_count(ray_session, tiny_root, cache_dir, tmp_path, capsys):
    """One sweep stopped three times, each after it reported: SIGTERM to the whole process group of
    ``medsweep sweep`` (``timeout``, SLURM's ``scancel``: Ray's own processes get it too, so Tune cannot stop
    gracefully, and the driver once waited 60 s on the lost GCS and exited 1 with Ray's error), SIGTERM to the
    driver of its ``medsweep resume`` alone (a container's stop: Tune's graceful stop), and two SIGINTs back to
    back (Ctrl-C twice: the second does not wait for Tune's graceful stop) to the next resume. Each time: exit
    128 + signal, one line, no answer, no study trial failed. A last resume, in this process, finishes with
    exactly the planned trials, each run to its last epoch. (One chain instead of one sweep per signal, and the
    last resume on the session's Ray: each ``medsweep`` process costs the suite ~25 s of start-up on 2 cores.)"""
    out, trials, epochs = tmp_path / "sweep", 4, 8  # 8 epochs: a resume still has epochs left when it is stopped
    resume_argv = [sys.executable, "-m", "medsweep.cli", "resume", str(out), "--quiet"]
    sweep = _sweep_argv(tiny_root, out, cache_dir, trials, "--final-seeds", "0", epochs=epochs)
    stops = [
        (sweep, (signal.SIGTERM,), True, 143),
        (resume_argv, (signal.SIGTERM,), False, 143),
        (resume_argv, (signal.SIGINT, signal.SIGINT), False, 130),
    ]
    for index, (argv, signals, group, expected) in enumerate(stops):
        log = tmp_path / f"driver-{index}.log"
        _assert_interrupted(out, log, _interrupt_once_it_reports(argv, out, log, signals, group), expected)
    capsys.readouterr()
    assert resume.run(_resume_args(out)) == 0
    board = pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str})
    assert len(board) == trials and board["trial_id"].is_unique
    assert set(board["status"]) <= RAN_TO_THE_END and (board["epochs_run"] == epochs).all()
    answer = capsys.readouterr().out  # --quiet: the leaderboard and where the files are, no epoch lines
    assert all(trial_id in answer for trial_id in board["trial_id"]) and f"results in {out}" in answer
    assert "val_auc" not in answer and "restoring the search" not in answer
    states = [t.state.name for t in load_study(out).trials]
    assert states.count("COMPLETE") == trials and "RUNNING" not in states


def _free_port() -> int:
    """A local port with nothing listening: bound, then closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(300)
def test_an_address_with_nothing_listening_ends_in_one_line_and_leaves_nothing(tiny_root, cache_dir, tmp_path):
    """``--address`` of a closed port: one line naming the address and ``ray status``, exit 2, within
    a deadline far below Ray's own minutes of retries; no --out folder, no process of the driver's session."""
    address, out, log = f"127.0.0.1:{_free_port()}", tmp_path / "sweep", tmp_path / "driver.log"
    driver = _start_driver(_sweep_argv(tiny_root, out, cache_dir, 2, "--address", address, "--connect-timeout", "5"), log)
    try:
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            kill_process_group(driver)
    assert driver.returncode == 2, log.read_text()[-3000:]
    line = _last_line(log)
    assert line.startswith(f"medsweep: error: no Ray cluster answers at --address {address}")
    assert f"`ray status --address {address}`" in line and "Traceback" not in log.read_text()
    assert not out.exists()
    left = [p.pid for p in psutil.process_iter() if _session_of(p) == driver.pid]
    assert not left, f"processes of the driver's session left behind: {left}"


def _session_of(proc: psutil.Process) -> int | None:
    try:
        return os.getsid(proc.pid)
    except (ProcessLookupError, PermissionError):
        return None
