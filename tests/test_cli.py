"""The medsweep command: bad input is one line and exit code 2; the small commands work."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from medsweep.cli import main
from medsweep.errors import ConfigError


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["sweep", "--trials", "0"], "--trials must be at least 1"),
        (["sweep", "--method", "nope"], "unknown method 'nope'"),
        (["sweep", "--max-epochs", "0"], "--max-epochs must be at least 1"),
        (["sweep", "--gpus-per-trial", "-1"], "--gpus-per-trial must be >= 0"),
        (["sweep", "--set", "rank=4"], "--set rank: no selected method"),
        (["sweep", "--dataset", "/no/such/folder"], "dataset /no/such/folder not found"),
        (["sweep", "--method", "linear", "--method", "linear"], "--method given twice"),
        (["best", "/no/such/sweep"], "has no best.yaml"),
        (["params", "--method", "fpt_plus", "--backbone", "./missing-dir"], "neither a registered name, an existing directory nor an MAE .pth"),
        (["spaces", "show", "lora", "--weights", "imagenet", "--dataset", "nih", "--fraction", "1"], "imagenet"),
        (["spaces", "show", "lora", "--weights", "mrm"], "need a dataset"),
        (["train", "--method", "linear", "--dataset", "/no/such/folder"], "not found"),
        # --out under a file: refused before the dataset (here the synthetic set, never generated) is read
        (["train", "--method", "linear", "--out", __file__ + "/run"], "test_cli.py is a file, not a folder; pass another --out"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medsweep: error: ")
    assert needle in err


def test_a_sweep_that_has_not_finished_is_sent_to_resume_by_every_command_that_reads_its_answer(tmp_path, capsys):
    """An interrupted sweep's folder holds its settings but no answer: each command that reads the answer
    names `medsweep resume`, where it told the user to pass a sweep's folder, which they had."""
    from medsweep.search.settings import SweepSettings

    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text(SweepSettings(methods=["linear"], out=out, cache_dir=tmp_path / "cache").to_json())
    for argv in (["best"], ["report"], ["final"], ["export", "--out", str(tmp_path / "model")], ["extend", "--trials", "1"]):
        assert main([argv[0], str(out), *argv[1:]]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"the sweep in {out} has not finished" in err, err
        assert f"finish it with `medsweep resume {out}` first" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"] and [p.name for p in out.iterdir()] == ["sweep.json"]


def test_a_command_a_message_suggests_is_quoted_for_the_shell(tmp_path, capsys):
    """`medsweep resume /data/my sweep` as printed ran `resume /data/my` when pasted."""
    from medsweep.search.settings import SweepSettings

    out = tmp_path / "my sweep"
    out.mkdir()
    (out / "sweep.json").write_text(SweepSettings(methods=["linear"], out=out, cache_dir=tmp_path / "cache").to_json())
    assert main(["best", str(out)]) == 2
    assert f"finish it with `medsweep resume '{out}'` first" in capsys.readouterr().err
    assert main(["predict", str(out), "--images", str(tmp_path)]) == 2
    assert f"write one with `medsweep export SWEEP_DIR --out '{out}'`" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["sweep", "--trials", "many"], "invalid int value"),
        (["preload", "--preload-batch-size", "0"], "--preload-batch-size: must be at least 1"),
        (["preload", "--preload-batch-size", "lots"], "--preload-batch-size: must be auto or a whole number >= 1"),
        (["sweep", "--seed", "-1"], "--seed: must be between 0 and 2147483647, got -1"),  # was NumPy's traceback
        (["train", "--method", "linear", "--seed", "x"], "--seed: expected a whole number, got 'x'"),  # was "invalid _seed value"
        (["train", "--method", "linear", "--epochs", "2.5"], "--epochs: expected a whole number, got '2.5'"),
        (["sweep", "--image-size", "100000"], "--image-size: must be between 8 and 4096"),
        (["probe", "--method", "linear", "--image-size", "99999"], "--image-size: must be between 8 and 4096"),  # was an allocation traceback
    ],
)
def test_argparse_errors_are_one_line_too(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "medsweep.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_params_prints_the_fpt_plus_paper_percentage(capsys):
    assert main(["params", "--method", "fpt_plus", "--backbone", "vit-base-patch16-384", "--image-size", "512", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["learnable"] == 900_965
    assert report["learnable_pct"] == pytest.approx(1.03, rel=0.01)


def test_probe_measures_a_training_step(capsys):
    assert main(["probe", "--method", "fpt_plus", "--backbone", "vit-tiny", "--image-size", "64", "--batch-size", "4", "--json"]) == 0
    small = json.loads(capsys.readouterr().out)
    assert main(["probe", "--method", "full", "--backbone", "vit-tiny", "--image-size", "64", "--batch-size", "4", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert 0 < small["peak_bytes"] < full["peak_bytes"]


def test_spaces_show_prints_the_published_lora_row(capsys):
    assert main(["spaces", "show", "lora", "--weights", "mrm", "--dataset", "nih", "--fraction", "1", "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["recommended"]["rank"] == 4
    assert desc["recommended"]["lr"] == pytest.approx(0.05)


@pytest.mark.slow
def test_best_prints_each_method_of_a_finished_sweep(tiny_sweep, capsys):
    out, _, _ = tiny_sweep
    assert main(["best", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fpt_plus" in text and "linear" in text and "val AUC" in text
    # under each method's line its hyperparameters as KEY=VALUE at full precision (it printed a Python dict)
    from medsweep.search.export import read_best

    (best,) = read_best(out).values()
    lines = text.splitlines()
    for method, item in best["per_method"].items():
        settings = lines[next(i for i, line in enumerate(lines) if line.split()[:1] == [method]) + 1].split()
        printed = dict(pair.split("=", 1) for pair in settings)
        assert printed and all(printed[key] == str(item["config"][key]) for key in printed)
        assert "lr" in printed and "method" not in printed and "backbone" not in printed
    assert main(["best", str(out), "--json"]) == 0
    (dataset,) = json.loads(capsys.readouterr().out)
    assert dataset == out.parent.name or dataset.startswith("synthetic")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    """Things a user might pass by mistake: a file, an empty folder, a folder of someone's notes, a sweep folder."""
    from medsweep.datasets import make_synthetic

    root = tmp_path_factory.mktemp("bad-inputs")
    make_synthetic(root / "data", seed=0, image_size=32, n_train=9, n_val=6, n_test=6)
    (root / "notes.txt").write_text("not a dataset")
    (root / "empty").mkdir()
    (root / "foreign").mkdir()
    (root / "foreign" / "thesis.tex").write_text("mine")
    make_synthetic(root / "bad-image", seed=0, image_size=32, n_train=9, n_val=6, n_test=6)
    next((root / "bad-image" / "val").rglob("*.png")).write_bytes(b"<html>not found</html>")
    (root / "old-sweep").mkdir()
    (root / "old-sweep" / "sweep.json").write_text('{"methods": ["linear"]}')
    (root / "old-sweep" / "optuna-study.log").write_text("journal\n")
    return root


BAD_SWEEP_INPUTS = [
    (["--image-size", "0"], "--image-size: must be between 8 and 4096 pixels, got 0"),
    (["--image-size", "100000"], "--image-size: must be between 8 and 4096 pixels, got 100000"),
    (["--backbone", "vit-base-patch16-384", "--image-size", "8"], "smaller than one patch of vit-base-patch16-384 (16 px)"),
    (["--backbone", "./no-such-backbone"], "neither a registered name, an existing directory nor an MAE .pth"),
    # A hub id: from the hub, or without a network (here) from the local cache only, at once (the hub client's
    # retries took 30 s and printed ten lines).
    (["--backbone", "no-such-org/no-such-model"], "cannot load backbone 'no-such-org/no-such-model'"),
    (["--method", "fpt_plus", "--set", "keep_ratio=2"], "keep_ratio must be in (0, 1], got 2"),
    (["--set", "batch_size=0"], "batch_size must be at least 1, got 0"),
    (["--method", "truncated"], "needs a ResNet backbone"),
    (["--dataset", "{root}/notes.txt"], "notes.txt is a .txt file, not a dataset"),
    (["--dataset", "{root}/empty"], "empty is an empty folder"),
    (["--dataset", "{root}/data/train"], "is a folder with neither train/ nor train_list.txt"),
    (["--dataset", "{root}/bad-image"], "cannot read image {root}/bad-image/val/"),
    (["--out", "{root}/notes.txt"], "notes.txt is a file, not a folder"),
    (["--out", "{root}/notes.txt/sweep"], "cannot be created: {root}/notes.txt is a file, not a folder; pass another --out"),
    (["--dataset", "synthetic", "--cache-dir", "{root}/notes.txt"], "cannot write the synthetic set under --cache-dir {root}/notes.txt"),
    (["--out", "{root}/foreign"], "holds files medsweep did not write (thesis.tex); pass a new or empty folder, or --overwrite"),
    (["--out", "{root}/old-sweep"], "already holds a sweep; continue it with `medsweep resume {root}/old-sweep`"),
    (["--connect-timeout", "0"], "--connect-timeout must be a number of seconds > 0"),
    (["--method", "full", "--workers", "2", "--gpus-per-trial", "0.5"], "gives each DDP worker of full 0.25 GPU; DDP needs one whole GPU per worker"),
    (["--warm-start", "{root}/empty"], "empty has no sweep.json"),
]

# Runs each `medsweep sweep` of BAD_SWEEP_INPUTS in one fresh interpreter, one after another (a
# process each costs ~10 s of imports on 2 busy cores): what each printed, its exit code, whether Ray
# was started by then, and whether its --out folder exists.
_RUN_EACH = """
import contextlib, io, json, sys
from medsweep.cli import main
from medsweep.errors import ConfigError
cases, results = json.load(open(sys.argv[1])), []
for argv, out in cases:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    ray = sys.modules.get("ray")
    started = bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())
    results.append({"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "ray_started": started,
                    "out_exists": __import__("os").path.exists(out)})
json.dump(results, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def bad_sweeps(bad_inputs, tmp_path_factory) -> tuple[list[dict], dict[str, bytes], dict[str, bytes]]:
    """Every bad `medsweep sweep` run once, in a fresh process without Ray; (results, input tree before, after)."""
    work = tmp_path_factory.mktemp("bad-sweeps")
    cases = []
    for i, (extra, _) in enumerate(BAD_SWEEP_INPUTS):
        out = work / f"out-{i}"
        argv = ["sweep", "--dataset", str(bad_inputs / "data"), "--method", "linear", "--backbone", "vit-tiny",
                "--image-size", "32", "--out", str(out), "--cache-dir", str(work / f"cache-{i}"), "--wandb", "disabled"]  # fmt: skip
        cases.append(([*argv, *[part.format(root=bad_inputs) for part in extra]], str(out)))
    (work / "cases.json").write_text(json.dumps(cases))
    before = _tree(bad_inputs)
    proc = subprocess.run([sys.executable, "-c", _RUN_EACH, str(work / "cases.json"), str(work / "results.json")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((work / "results.json").read_text()), before, _tree(bad_inputs)


@pytest.mark.parametrize(("case", "needle"), [(i, needle) for i, (_, needle) in enumerate(BAD_SWEEP_INPUTS)])
def test_sweep_checks_everything_before_ray_starts_and_writes_nothing(bad_sweeps, bad_inputs, case, needle):
    """Each bad input: one line, exit code 2, before Ray starts, and no file written or changed: neither
    the --out folder nor anything already in the input folder."""
    results, before, after = bad_sweeps
    run = results[case]
    assert run["code"] == 2, run["stderr"][-2000:]
    assert run["stderr"].count("\n") == 1 and run["stderr"].startswith("medsweep: error: "), run["stderr"][-2000:]
    assert needle.format(root=bad_inputs) in run["stderr"]
    assert not run["ray_started"] and "Ray" not in run["stdout"] + run["stderr"]
    assert not run["out_exists"]
    assert after == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder no one can create files in")
def test_an_out_the_file_system_refuses_is_one_line_once_ray_is_up(tmp_path):
    """Permissions can say yes where the file system says no (/proc, a read-only mount, a full disk; root passes
    every permission check): the folder is made once Ray is up (:func:`prepare_out`), and a refusal there is one
    line naming the fix, not the traceback it was."""
    from medsweep.search.settings import SweepSettings
    from medsweep.search.sweep import prepare_out

    settings = SweepSettings(methods=["linear"], out=Path("/proc/medsweep-sweep"), cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"^cannot write --out /proc/medsweep-sweep \(.+\); pass a path you can write to, with free space$"):
        prepare_out(settings)


def test_train_prints_its_epochs_and_the_best_as_the_loop_chose_it(bad_inputs, tmp_path, capsys):
    """``medsweep train``: one line per epoch (one-class epochs marked), then the run's best, which is its last
    report's best (the best epoch that did not predict one class), not the highest AUC an epoch line showed."""
    out = tmp_path / "run"
    argv = ["train", "--dataset", str(bad_inputs / "data"), "--method", "linear", "--backbone", "vit-tiny", "--image-size", "32"]
    assert main([*argv, "--epochs", "3", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    lines = capsys.readouterr().out.splitlines()
    reports = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == len(reports) == 3
    for line, report in zip(epochs, reports, strict=True):
        assert f"val_auc {report['val_auc']:.4f}{' (one class)' if report['val_collapsed'] == 1.0 else ''}  val_acc" in line
    last = reports[-1]
    (best,) = [line for line in lines if line.startswith("best val_auc ")]
    assert best.startswith(f"best val_auc {last['best_val_auc']:.4f} (epoch {last['best_epoch']}")


def test_train_refuses_a_bad_learning_rate_before_its_preload(bad_inputs, tmp_path, capsys):
    """`--lr 0` trained at the recommended rate without a word (0 read as "not given"); `--lr -1` was refused only
    after the frozen pass had built the store."""
    argv = ["train", "--dataset", str(bad_inputs / "data"), "--method", "linear", "--backbone", "vit-tiny", "--image-size", "32"]
    for lr in ("0", "-1"):
        assert main([*argv, "--lr", lr, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]) == 2
        assert f"lr must be in (0, inf), got {float(lr)}" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "stores").exists() and not (tmp_path / "run").exists()


def test_overwrite_replaces_a_previous_sweep_but_keeps_other_files(bad_inputs, tmp_path):
    """``--overwrite`` deletes exactly the files a sweep writes (checked without running one: the
    folder is prepared once Ray is up, which needs a real sweep; see test_faults for those)."""
    from medsweep.search.settings import SweepSettings
    from medsweep.search.study import SWEEP_OUTPUTS
    from medsweep.search.sweep import check_out, prepare_out

    out = tmp_path / "out"
    out.mkdir()
    for name in ("sweep.json", "optuna-study.log", "best.yaml"):
        (out / name).write_text("old")
    (out / "ray" / "tune").mkdir(parents=True)
    (out / "thesis.tex").write_text("mine")
    check_out(out, overwrite=True)
    settings = SweepSettings(methods=["linear"], out=out, cache_dir=tmp_path / "cache")
    prepare_out(settings, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "thesis.tex"]
    assert json.loads((out / "sweep.json").read_text())["methods"] == ["linear"]
    assert {"sweep.json", "optuna-study.log", "ray"} <= set(SWEEP_OUTPUTS)


def _options(parser: argparse.ArgumentParser, command: str) -> Iterator[tuple[str, argparse.Action]]:
    """Every option and positional of every command, as (command line, action)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{command} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield command, action


@pytest.mark.parametrize("method", ["fpt_plus", "staged", "linear"])
def test_train_params_and_probe_run_the_sweeps_recommended_trial(method, synthetic_spec):
    """`medsweep train --method fpt_plus` once trained a side network of the published 512 px recipe (128 px input,
    side reduction 8: 8 wide on the demo backbone) at batch 16, where the sweep's recommended trial derives a quarter
    of the frozen input and a 2-fold reduction: val AUC 0.46 against the trial's 0.79 on the same data. Linear's
    recommended batch is 8, not TrainConfig's 16."""
    from medsweep.cli import _run_config, build_parser
    from medsweep.search.settings import SweepSettings, fixed_config
    from medsweep.spaces import recommended
    from medsweep.trainables.config import TrainConfig
    from medsweep.trainables.methods import make_config

    args = build_parser().parse_args(["train", "--method", method])
    trial = {**recommended(method, dataset=synthetic_spec.name), **fixed_config(SweepSettings(methods=[method]), synthetic_spec, method)}
    train = _run_config(args, method, dataset=synthetic_spec.name)
    compared = (set(make_config(method, trial).to_dict()) | set(TrainConfig.__dataclass_fields__)) - {"epochs", "precision", "num_classes", "task"}
    assert {key: train.get(key) for key in compared} == {key: trial.get(key) for key in compared}
    assert args.batch_size is None and train["batch_size"] == trial["batch_size"]
    assert build_parser().parse_args(["probe", "--method", method]).batch_size is None


def test_every_option_of_every_command_says_what_it_does_and_the_readme_names_it():
    from medsweep.cli import build_parser

    options = list(_options(build_parser(), "medsweep"))
    assert len(options) > 100
    assert [f"{command} {action.option_strings or action.dest}" for command, action in options if not action.help] == []
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    flags = {flag for _, action in options for flag in action.option_strings if flag.startswith("--")}
    assert sorted(flag for flag in flags if not re.search(re.escape(flag) + r"(?![\w-])", readme)) == []


def test_every_option_that_is_a_sweep_setting_defaults_to_the_settings_default():
    """One home per default: each command's option of the same name as a SweepSettings field (or
    TrainConfig field, for one training config) takes that field's default, whichever command it is."""
    from dataclasses import MISSING, fields

    from medsweep.cli import build_parser
    from medsweep.search.settings import DEFAULT_TRIALS, SweepSettings

    default = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default for f in fields(SweepSettings)}
    parser = build_parser()
    sweep = vars(parser.parse_args(["sweep"]))
    # None in argparse, decided by cmd_sweep: --method (DEFAULT_METHODS), --trials (none with --budget-hours alone).
    separately = {"methods", "trials", "out", "objective"}
    compared = [name for name in default if name in sweep and name not in separately]
    assert len(compared) >= 15, compared
    for name in compared:
        assert sweep[name] == default[name], name
    assert sweep["objective"].split(",") == default["objective"]
    assert default["trials"] == DEFAULT_TRIALS
    assert sweep["final_seeds"] == 3  # what `medsweep sweep` has always done (README: "--final-seeds N | 3")
    shared = ("dataset", "backbone", "image_size", "cache_dir", "seed", "preload_batch_size", "connect_timeout", "precision")
    for command in (["train", "--method", "linear"], ["preload"], ["params", "--method", "linear"], ["probe", "--method", "linear"]):
        args = vars(parser.parse_args(command))
        for name in (n for n in shared if n in args):
            assert args[name] == default[name], (command[0], name)
        if "batch_size" in args:
            assert args["batch_size"] is None, command[0]  # the recommended trial's (test below)
    assert vars(parser.parse_args(["train", "--method", "linear"]))["epochs"] == default["max_epochs"]
    assert parser.parse_args(["final", "somewhere"]).seeds == default["final_seeds"]


@pytest.mark.parametrize("command", ["final", "resume", "extend"])
def test_a_sweep_json_with_an_unknown_setting_is_refused_by_every_reader(command, tmp_path, capsys):
    """One load_settings for resume and final: a setting this version does not know is one line
    naming the fix, never silently dropped (which would retrain or resume a different sweep)."""
    from medsweep.search.settings import SweepSettings

    (tmp_path / "sweep.json").write_text(SweepSettings(methods=["linear"], out=tmp_path).to_json()[:-2] + ', "warp_drive": 9\n}')
    assert main([command, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not know (warp_drive)" in err and "version of medsweep that wrote it" in err


# What Ray makes of the filter main() sets: its driver-side log filter is built when Ray is imported.
_RAY_FILTER = """
import os, sys
from medsweep.cli import main
from medsweep.errors import ConfigError
main(["spaces", "show", "lora", "--json"])
from ray._private import ray_logging
line = "(raylet) WARNING: 14 PYTHON worker processes have been started on node: 94b3 with address: 192.0.2.2"
skip = ray_logging.stderr_deduplicator.skip_re
print(skip.pattern if skip else "", bool(skip and skip.search(line)), bool(skip and skip.search("(raylet) WARNING: disk full")))
"""


@pytest.mark.parametrize(("users", "expected"), [(None, "True False"), ("only-this", "only-this False False")])
def test_ray_worker_start_warnings_are_not_shown_unless_the_user_filters_otherwise(users, expected):
    """A fused sweep starts a process per member on purpose; Ray's raylet line about it is dropped, nothing else."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_DEDUP_LOGS_SKIP_REGEX"}
    if users is not None:
        env["RAY_DEDUP_LOGS_SKIP_REGEX"] = users
    shown = subprocess.run([sys.executable, "-c", _RAY_FILTER], capture_output=True, text=True, env=env, check=True)
    assert shown.stdout.strip().splitlines()[-1].endswith(expected)
