"""Every registered method trains on the synthetic data in a plain single run (`medsweep train`)."""

from __future__ import annotations

import json
import math

import pytest

from medsweep.cli import main
from medsweep.trainables.methods import list_methods

# The backbone each method needs at test size; ViT methods share the tiny ViT.
BACKBONE = {"truncated": "resnet-tiny-test"}
EXTRA = {"staged": ["--set", "stage1_epochs=1", "--set", "stage1=linear"], "cdtm": ["--set", "num_centers=8"]}


@pytest.mark.parametrize("method", list_methods())
def test_method_trains_in_a_single_run(method, synthetic_root, tmp_path, capsys):
    argv = [
        "train",
        "--method", method,
        "--dataset", str(synthetic_root),
        "--backbone", BACKBONE.get(method, "vit-tiny"),
        "--image-size", "64",
        "--epochs", "2",
        "--batch-size", "16",
        "--cache-dir", str(tmp_path / "cache"),
        "--out", str(tmp_path / "run"),
        *EXTRA.get(method, []),
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    reports = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in reports] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) and r["status"] == "running" for r in reports)
    assert 0 < reports[-1]["learnable_params"] <= reports[-1]["total_params"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["method"] == method
    assert list((tmp_path / "run" / "checkpoints").glob("epoch-*/checkpoint.pt"))
