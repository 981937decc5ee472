"""What a person sees during a search: a live table on a terminal, one line per event elsewhere."""

from __future__ import annotations

import io
import pickle

from rich.console import Console

from medsweep.search.console import SweepConsole

FPT = {"method": "fpt_plus", "lr": 1e-3, "keep_ratio": 0.2, "epochs": 6}
LINEAR = {"method": "linear", "lr": 1e-4, "epochs": 6}


def _terminal_console() -> SweepConsole:
    console = SweepConsole(live=True)
    console.console = Console(file=io.StringIO(), force_terminal=True, record=True, width=140)
    return console


def _last_frame(text: str) -> str:
    return text.rsplit("running trials", 1)[-1]


def test_live_table_shows_running_trials_with_their_latest_epoch():
    console = _terminal_console()
    with console.live_trials(total=4):
        console.trial_start("aaaa0001", FPT)
        console.trial_start("bbbb0002", LINEAR)
        console.trial_result("aaaa0001", FPT, {"epoch": 1, "val_auc": 0.712, "train_loss": 0.93})
        console.trial_result("aaaa0001", FPT, {"epoch": 2, "val_auc": 0.695, "train_loss": 0.81})
        frame = _last_frame(console.console.export_text(clear=False))
        row = next(line for line in frame.splitlines() if "aaaa0001" in line)
        assert "2/6" in row and "0.695" in row and "0.712" in row and "0.810" in row  # latest, best, loss
        assert "keep_ratio=0.2" in row
        assert "bbbb0002" in frame
        console.trial_done("aaaa0001", FPT, {"best_val_auc": 0.712}, 1, 4)
        frame = _last_frame(console.console.export_text(clear=False))
    assert "(1/4 done)" in frame
    assert "aaaa0001" not in frame and "bbbb0002" in frame
    text = console.console.export_text()
    assert "done aaaa0001 fpt_plus best val_auc 0.712  (1/4)" in text
    # With the table on, per-epoch lines are not printed as well.
    assert "epoch  1  val_auc" not in text


def test_without_a_terminal_every_event_is_one_line():
    console = SweepConsole(record=True)
    assert not console.live
    with console.live_trials(total=None):  # a time-bounded search: no planned total
        console.trial_start("aaaa0001", FPT)
        console.trial_result("aaaa0001", FPT, {"epoch": 1, "val_auc": 0.712, "train_loss": 0.93})
        console.trial_done("aaaa0001", FPT, {"best_val_auc": 0.712}, 1, None)
    text = console.text()
    assert "running trials" not in text
    assert "aaaa0001  fpt_plus" in text and "epoch  1  val_auc 0.712" in text
    assert "(1 done)" in text
    # a notice longer than the log's 120 columns stays one line (grep finds it whole), not broken mid-sentence
    notice = "materialized once, shared by every trial: " + "it fits in 50% of the object store " * 6
    console.data_ready({"store": notice})
    assert f"ray data {notice}" in console.text().splitlines()


def test_an_epoch_that_predicted_one_class_is_marked_and_the_done_line_names_the_best_epoch():
    """Epoch 2 has the higher AUC but predicted one class: the trial's best is epoch 1, which the lines say."""
    console = SweepConsole(record=True)
    with console.live_trials(total=2):
        console.trial_result("aaaa0001", FPT, {"epoch": 1, "val_auc": 0.593, "val_collapsed": 0.0, "train_loss": 1.3})
        console.trial_result("aaaa0001", FPT, {"epoch": 2, "val_auc": 0.637, "val_collapsed": 1.0, "train_loss": 1.1})
        console.trial_done("aaaa0001", FPT, {"best_val_auc": 0.593, "best_epoch": 1, "best_collapsed": 0.0}, 1, 2)
        console.trial_done("bbbb0002", LINEAR, {"best_val_auc": 0.5, "best_epoch": 3, "best_collapsed": 1.0}, 2, 2)
    lines = console.text().splitlines()
    assert "epoch  1  val_auc 0.593  loss" in lines[0] and "epoch  2  val_auc 0.637 (one class)  loss" in lines[1]
    assert "done aaaa0001 fpt_plus best val_auc 0.593 (epoch 1)  (1/2)" in lines[2]
    assert "done bbbb0002 linear best val_auc 0.500 (epoch 3, every epoch one class)  (2/2)" in lines[3]
    live = _terminal_console()  # the live table's best column is the trial's best too, not the highest AUC shown
    with live.live_trials(total=2):
        live.trial_result("aaaa0001", FPT, {"epoch": 2, "val_auc": 0.637, "val_collapsed": 1.0, "best_val_auc": 0.593, "train_loss": 1.1})
        row = next(line for line in _last_frame(live.console.export_text(clear=False)).splitlines() if "aaaa0001" in line)
    assert "0.637" in row and "0.593" in row


def test_quiet_prints_the_answer_and_nothing_of_the_search(tmp_path):
    """``--quiet`` once printed nothing at all (rich's quiet console dropped the leaderboard too)."""
    import pandas as pd

    console = SweepConsole(quiet=True, record=True)
    console.console.print("[bold]preload[/] chatter")
    console.trial_result("aaaa0001", FPT, {"epoch": 1, "val_auc": 0.712, "train_loss": 0.93})
    console.trial_done("aaaa0001", FPT, {"best_val_auc": 0.712}, 1, 1)
    board = pd.DataFrame([{"trial_id": "aaaa0001", "method": "fpt_plus", "best_val_auc": 0.712, "epochs_run": 6,
                           "learnable_pct": 1.5, "peak_mem_mb": 12.0, "ppe": 0.7, "status": "completed", **FPT}])  # fmt: skip
    console.leaderboard(board, tmp_path)
    console.result("final fpt_plus: test AUC 0.7000")
    text = console.text()
    assert "aaaa0001" in text and "0.712" in text and "final fpt_plus: test AUC 0.7000" in text
    assert "chatter" not in text and "epoch  1" not in text and "done aaaa0001" not in text
    assert console.console.quiet  # still quiet after printing the answer


def test_a_restored_callback_prints_to_the_resumed_sweeps_console():
    """Tune unpickles the console inside its saved callback on `medsweep resume`."""
    original = SweepConsole(quiet=True)
    pickled = pickle.dumps(original)
    resumed = SweepConsole(record=True)  # the console `medsweep resume` made
    assert pickle.loads(pickled) is resumed
    del resumed
    restored = pickle.loads(pickled)  # no console in this process: a new one with the saved setting
    assert isinstance(restored, SweepConsole) and restored.quiet


def test_ray_datas_notice_that_progress_bars_are_off_is_not_printed():
    """medsweep turns Ray Data's progress bars off (the console reports reads in one line); Ray Data then warned
    "Progress bars disabled. To enable, set ..." on every sweep's console, about a choice the user did not make."""
    import logging

    import ray.data
    from ray.data._internal.progress import get_progress_manager
    from ray.util.debug import reset_log_once

    from medsweep.search.tuning import quiet_ray_data

    logger = logging.getLogger("ray.data._internal.progress")  # Ray's loggers do not propagate to pytest's capture
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        for quiet in (True, False):
            quiet_ray_data()
            if not quiet:
                logger.setLevel(logging.NOTSET)  # the logger as Ray leaves it: the notice is real, and this test sees it
            reset_log_once("ray_data_progress_manager_disabled")
            get_progress_manager(ray.data.DataContext.get_current(), "dataset", {}, verbose_progress=False)
            assert any("Progress bars disabled" in message for message in seen) is not quiet
    finally:
        logger.removeHandler(handler)
        quiet_ray_data()


def test_the_leaderboard_prints_one_line_per_trial_at_the_consoles_width(tmp_path):
    """Piped into a log (120 columns), the boxed leaderboard wrapped each trial's hyperparameters over 3-5 lines."""
    import pandas as pd

    long = {**FPT, "num_prompts": 16, "weight_decay": 0.1, "batch_size": 16, "lr": 0.000123456}
    board = pd.DataFrame(
        [
            {"trial_id": "aaaa0001", "method": "fpt_plus", "best_val_auc": 0.93088, "epochs_run": 6, "learnable_pct": 14.51,
             "peak_mem_mb": 5.386, "ppe": 0.8778, "status": "stopped early", **long},
            {"trial_id": "bbbb0002", "method": "linear", "best_val_auc": 0.464, "epochs_run": 2, "learnable_pct": 0.1196,
             "peak_mem_mb": 0.005085, "ppe": 0.4637, "status": "completed", **LINEAR, "keep_ratio": float("nan")},
        ]
    )  # fmt: skip
    console = SweepConsole(record=True)
    console.leaderboard(board, tmp_path)
    lines = console.text().splitlines()
    assert console.console.width == 120 and all(len(line) <= 120 for line in lines)
    fpt_line, linear_line = (next(line for line in lines if trial in line) for trial in ("aaaa0001", "bbbb0002"))
    assert "fpt_plus" in fpt_line and "0.9309" in fpt_line and "stopped early" in fpt_line and "lr=0.000123" in fpt_line
    assert fpt_line.rstrip().endswith("…")  # cut to the width; leaderboard.csv has every value
    assert "lr=0.0001 batch_size" not in linear_line and linear_line.rstrip().endswith("lr=0.0001")
    wide = SweepConsole(record=True)
    wide.console.width = 200
    wide.leaderboard(board, tmp_path)
    assert "batch_size=16" in next(line for line in wide.text().splitlines() if "aaaa0001" in line)


def test_each_trials_line_shows_its_hyperparameters_in_a_sweep_of_several_methods():
    """Tune hands callbacks the sampled config, whose keys a sweep of several methods prefixes (``fpt_plus.lr``):
    every per-epoch line of the default sweep showed an empty hyperparameters column."""
    from optuna.samplers import TPESampler
    from ray.tune.experiment import Trial

    from medsweep.search.space import build_search, trial_config
    from medsweep.search.tuning import ConsoleCallback, SweepSearch

    methods = ["fpt_plus", "linear"]
    space, points = build_search(methods, {method: {"method": method} for method in methods}, dataset="synthetic")
    searcher = SweepSearch(space=space, metric="best_val_auc", mode="max", points_to_evaluate=points, sampler=TPESampler(seed=0))
    sampled = searcher.suggest("t0")
    assert "fpt_plus.lr" in sampled and "lr" not in sampled  # what Tune's trial holds
    trial = Trial("medsweep", config=sampled, stub=True)
    console = SweepConsole(record=True)
    callback = ConsoleCallback(console, total=1)
    callback.on_trial_start(0, [trial], trial)
    callback.on_trial_result(0, [trial], trial, {"epoch": 1, "val_auc": 0.71, "train_loss": 0.9})
    callback.on_trial_complete(0, [trial], trial)
    epoch_line = next(line for line in console.text().splitlines() if "epoch  1" in line)
    assert f"lr={sampled['fpt_plus.lr']:.3g}" in epoch_line and f"keep_ratio={sampled['fpt_plus.keep_ratio']:.3g}" in epoch_line
    # one line whatever the hyperparameters' length: they come last, cut to the console's width
    many = {**trial_config(sampled), "keep_ratio": 0.123456789, "weight_decay": 0.000123456789, "num_prompts": 1024}
    console.trial_result("bbbb0002", many, {"epoch": 12, "val_auc": 0.5, "train_loss": 1.0})
    (line,) = [line for line in console.text().splitlines() if "bbbb0002" in line or "loss 1.000" in line]
    assert "epoch 12  val_auc 0.500  loss 1.000  lr=" in line and line.rstrip().endswith("…")
    assert len(line.rstrip()) <= console.console.width


def test_on_a_terminal_the_console_takes_the_terminals_width_and_a_log_at_least_120_columns(tmp_path):
    """The live table is redrawn in place: drawn 120 columns wide on a 100-column terminal, each row wrapped and
    the redraw left stale rows behind. A log (no terminal) keeps 120 columns, not rich's 80."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    probe = "from medsweep.search.console import SweepConsole; print(SweepConsole().console.width)"
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    with subprocess.Popen([sys.executable, "-c", probe], stdout=child, stderr=child, env=env) as proc:
        os.close(child)
        assert proc.wait(timeout=60) == 0
    assert os.read(main, 1000).decode().strip() == "100"
    os.close(main)
    logged = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert logged.stdout.strip() == "120"


def test_the_last_line_names_the_files_the_sweep_wrote_and_its_trackers_runs_only_where_they_are(tmp_path):
    """It named `DIR/wandb` after every sweep, also one with --tracker mlflow or none, which has no such folder."""
    import pandas as pd

    board = pd.DataFrame([{"trial_id": "aaaa0001", "method": "linear", "best_val_auc": 0.7, "epochs_run": 2,
                           "learnable_pct": 0.1, "peak_mem_mb": 0.01, "ppe": 0.7, "status": "completed", **LINEAR}])  # fmt: skip
    for name in ("leaderboard.csv", "leaderboard.parquet", "best.yaml", "mlflow.db"):
        (tmp_path / name).write_text("")
    console = SweepConsole(record=True)
    console.leaderboard(board, tmp_path)

    def said() -> str:  # a long folder wraps the line
        return " ".join(console.text().split())

    assert said().endswith(f"results in {tmp_path}: leaderboard.csv, leaderboard.parquet, best.yaml, mlflow.db")
    (tmp_path / "mlflow.db").unlink()
    (tmp_path / "wandb").mkdir()
    console.leaderboard(board, tmp_path)
    assert said().endswith(f"results in {tmp_path}: leaderboard.csv, leaderboard.parquet, best.yaml, wandb/")


def test_a_multi_objective_sweep_names_its_pareto_front_below_the_leaderboard(tmp_path):
    """The front was only in pareto.csv and a leaderboard.csv column: the console's answer did not say which
    trials trade accuracy for cost."""
    import pandas as pd

    row = {"epochs_run": 2, "peak_mem_mb": 0.01, "ppe": 0.7, "status": "completed", **LINEAR}
    board = pd.DataFrame(
        [
            {**row, "trial_id": "aaaa0001", "method": "fpt_plus", "best_val_auc": 0.80, "learnable_pct": 14.5, "on_pareto_front": True},
            {**row, "trial_id": "aaaa0002", "method": "linear", "best_val_auc": 0.77, "learnable_pct": 0.2, "on_pareto_front": True},
            {**row, "trial_id": "aaaa0003", "method": "linear", "best_val_auc": 0.70, "learnable_pct": 0.2, "on_pareto_front": False},
        ]
    )
    console = SweepConsole(record=True)
    console.leaderboard(board, tmp_path, objectives=["auc", "params"])
    assert "pareto front of auc, params: aaaa0001 fpt_plus, aaaa0002 linear (pareto.csv)" in console.text().splitlines()
    single = SweepConsole(record=True)
    single.leaderboard(board, tmp_path, objectives=["auc"])
    assert "pareto" not in single.text()
