"""The medsweep command: bad input is one line and exit code 2; the small commands work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medsweep.cli import main


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
        (["params", "--method", "fpt_plus", "--backbone", "./missing-dir"], "neither a registered name nor an existing directory"),
        (["spaces", "show", "lora", "--weights", "imagenet", "--dataset", "nih", "--fraction", "1"], "imagenet"),
        (["spaces", "show", "lora", "--weights", "mrm"], "need a dataset"),
        (["train", "--method", "linear", "--dataset", "/no/such/folder"], "not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medsweep: error: ")
    assert needle in err


def test_argparse_errors_are_one_line_too():
    proc = subprocess.run([sys.executable, "-m", "medsweep.cli", "sweep", "--trials", "many"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "invalid int value" in proc.stderr
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
    assert main(["best", str(out), "--json"]) == 0
    (dataset,) = json.loads(capsys.readouterr().out)
    assert dataset == out.parent.name or dataset.startswith("synthetic")
