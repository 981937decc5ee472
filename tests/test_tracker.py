"""--tracker: W&B, MLflow (one run per trial in a store under the sweep folder) or none."""

from __future__ import annotations

import pandas as pd
import pytest
from ray.air.integrations.wandb import WandbLoggerCallback

from medsweep.cli import main
from medsweep.search.console import SweepConsole
from medsweep.search.export import read_best
from medsweep.search.settings import SweepSettings
from medsweep.search.study import LEADERBOARD_CSV, MLFLOW_DB, SWEEP_OUTPUTS, WANDB_DIR
from medsweep.search.tracking import SweepMlflowCallback
from medsweep.search.tuning import ConsoleCallback, CurvesSurviveRestarts, build_callbacks

ALWAYS = [ConsoleCallback, CurvesSurviveRestarts]  # every sweep's callbacks, whatever its tracker


def _callbacks(tmp_path, synthetic_spec, **settings):
    return build_callbacks(SweepSettings(methods=["linear"], out=tmp_path, **settings), synthetic_spec, SweepConsole(quiet=True))


def _trackers(tmp_path, synthetic_spec, **settings):
    """The callbacks besides those every sweep has."""
    callbacks = _callbacks(tmp_path, synthetic_spec, **settings)
    assert [type(c) for c in callbacks[: len(ALWAYS)]] == ALWAYS
    return callbacks[len(ALWAYS) :]


def test_tracker_none_and_disabled_wandb_log_only_to_the_console(tmp_path, synthetic_spec):
    for settings in ({"tracker": "none"}, {"tracker": "none", "wandb": "online"}, {"tracker": "wandb", "wandb": "disabled"}):
        assert [type(c) for c in _callbacks(tmp_path, synthetic_spec, **settings)] == ALWAYS, settings
    assert list(tmp_path.iterdir()) == []  # no wandb folder, no mlflow.db


def test_tracker_picks_one_callback(tmp_path, synthetic_spec, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (wandb,) = _trackers(tmp_path, synthetic_spec, tracker="wandb", wandb="offline")
    assert isinstance(wandb, WandbLoggerCallback)
    (mlflow,) = _trackers(tmp_path, synthetic_spec, tracker="mlflow", wandb="offline")  # --wandb is W&B's mode only
    assert isinstance(mlflow, SweepMlflowCallback)
    assert mlflow.tracking_uri == f"sqlite:///{tmp_path.resolve() / MLFLOW_DB}" and mlflow.experiment_name == f"medsweep-{tmp_path.name}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.hospital:5000")
    (server,) = _trackers(tmp_path, synthetic_spec, tracker="mlflow")
    assert server.tracking_uri == "http://mlflow.hospital:5000"
    assert MLFLOW_DB in SWEEP_OUTPUTS  # --overwrite deletes an earlier sweep's store


def test_a_bad_tracker_is_one_line_and_exit_code_2(capsys):
    assert main(["sweep", "--tracker", "neptune"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tracker must be wandb, mlflow or none, got 'neptune'" in err


@pytest.fixture(scope="module")
def mlflow_sweep(tmp_path_factory, ray_session, synthetic_root, feature_cache):
    """A tiny real sweep logged to MLflow: linear on vit-tiny, 2 trials x 2 epochs."""
    from medsweep.search.sweep import run_sweep

    out = tmp_path_factory.mktemp("mlflow-sweep")
    settings = SweepSettings(
        dataset=str(synthetic_root),
        methods=["linear"],
        trials=2,
        max_epochs=2,
        backbone="vit-tiny",
        image_size=32,
        tracker="mlflow",
        out=out,
        cache_dir=feature_cache,
        fixed={"lr": 0.01, "warmup_epochs": 0},
        final_seeds=0,
        early_stopping=False,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        run_sweep(settings, SweepConsole(quiet=True))
    return out


@pytest.mark.slow
def test_the_mlflow_store_holds_one_run_per_trial_with_the_leaderboards_values(mlflow_sweep):
    from mlflow.tracking import MlflowClient

    out = mlflow_sweep
    assert not (out / WANDB_DIR).exists()
    board = pd.read_csv(out / LEADERBOARD_CSV).set_index("trial_id")
    client = MlflowClient(tracking_uri=f"sqlite:///{out / MLFLOW_DB}")
    experiment = client.get_experiment_by_name(f"medsweep-{out.name}")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.data.tags["trial_id"] for run in runs) == sorted(board.index)  # exactly one run per trial
    for run in runs:
        row = board.loc[run.data.tags["trial_id"]]
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"linear-{row.name}"
        assert run.data.tags["method"] == "linear" and [run.data.tags["dataset"]] == list(read_best(out))
        assert float(run.data.params["lr"]) == pytest.approx(0.01)
        history = client.get_metric_history(run.info.run_id, "val_auc")
        assert [m.step for m in history] == [1, 2]  # logged per epoch
        assert max(m.value for m in history) == pytest.approx(row["best_val_auc"])
        assert run.data.metrics["best_val_auc"] == pytest.approx(row["best_val_auc"])  # the last report's
        assert run.data.metrics["epoch"] == row["epochs_run"] == 2


def test_a_resumed_trial_continues_its_mlflow_run(tmp_path, synthetic_spec, monkeypatch):
    """A new driver (``medsweep resume``) has no trial -> run map: it finds the trial's run by its tag. The run's
    parameters are the trial's flat config (``lr``, not the ``linear.lr`` a sweep of several methods samples)."""
    from mlflow.tracking import MlflowClient
    from ray.tune.experiment import Trial

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = []
    for epochs in ([1], [2]):  # the first driver, interrupted after epoch 1, then the resumed one
        (callback,) = _trackers(tmp_path, synthetic_spec, tracker="mlflow")
        callback.setup()
        # as a sweep of several methods samples it (prefixed keys)
        sampled = {"method": "linear", "linear.lr": 0.01, "linear.batch_size": 16, "epochs": 2}
        trial = Trial("run_trial", config=sampled, trial_id="abc00001", stub=True)
        callback.log_trial_start(trial)
        for epoch in epochs:
            callback.log_trial_result(epoch, trial, {"epoch": epoch, "val_auc": 0.5 + epoch / 10, "training_iteration": 1})
        if epochs == [1]:  # the interrupt: no trial end, the experiment ends; the run is not left RUNNING
            callback.on_experiment_end([trial])
            assert callback.mlflow_util._get_client().get_run(callback._trial_runs[trial]).info.status == "KILLED"
        else:
            callback.log_trial_end(trial)
        runs.append(callback._trial_runs[trial])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / MLFLOW_DB}")
    assert runs[0] == runs[1] and len(client.search_runs([callback.mlflow_util.experiment_id])) == 1
    assert client.get_run(runs[0]).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(runs[0], "val_auc")] == [(1, 0.6), (2, 0.7)]
    # its parameters: the flat config the trial ran with, as the leaderboard has it
    assert client.get_run(runs[0]).data.params == {"method": "linear", "lr": "0.01", "batch_size": "16", "epochs": "2"}
