"""Full fine-tuning through the DDP path: a Tune trial that starts a 2-worker Ray Train group on CPUs."""

from __future__ import annotations

import pandas as pd
import pytest

from medsweep.search.console import SweepConsole
from medsweep.search.settings import SweepSettings
from medsweep.search.sweep import run_sweep

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_full_fine_tuning_trial_runs_on_two_ddp_workers(ray_session, synthetic_root, feature_cache, tmp_path):
    settings = SweepSettings(
        dataset=str(synthetic_root),
        methods=["full"],
        trials=1,
        max_epochs=2,
        workers=2,
        backbone="vit-tiny",
        image_size=32,
        wandb="disabled",
        out=tmp_path / "sweep",
        cache_dir=feature_cache,
        early_stopping=False,
        final_seeds=0,
    )
    run_sweep(settings, SweepConsole(record=True))
    board = pd.read_csv(settings.out / "leaderboard.csv", dtype={"trial_id": str})
    (row,) = board.to_dict("records")
    assert row["method"] == "full" and row["workers"] == 2
    assert row["status"] == "completed" and row["epochs_run"] == 2
    assert row["learnable_pct"] == pytest.approx(100.0)
    assert 0.0 <= row["best_val_auc"] <= 1.0
    # Train ran as its own named run (one per trial) with both ranks' worker logs.
    runs = list((settings.out / "train").glob("train-*"))
    assert len(runs) == 1
