"""Watching a sweep: its W&B offline runs read back, ``medsweep sync`` failing fast, ``medsweep dashboard``.

The W&B and dashboard tests run on the session's ``tiny_sweep`` (4 trials,
W&B offline). Its runs are read back with W&B's own reader of the ``.wandb``
transaction log (``wandb leet inspect``); the dashboard is queried through
optuna-dashboard's JSON API and rendered by headless Chromium where one is
installed. The sync tests need only one real offline run, made on the spot.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from medsweep.errors import ConfigError, MedsweepError
from medsweep.search import dashboard, sync
from medsweep.search.console import SweepConsole

# `medsweep dashboard DIR ...` as its module's own parser and run() give it (independent of cli.py's wiring).
DASHBOARD_CLI = (
    "import argparse, sys; from medsweep.search import dashboard; "
    "parser = argparse.ArgumentParser(prog='medsweep'); dashboard.add_parser(parser.add_subparsers(dest='command')); "
    "sys.exit(dashboard.run(parser.parse_args()))"
)
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip


def _inspect(run_file: Path, *flags: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(run_file)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return proc.stdout


def _parse(argv: list[str], module) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medsweep")
    module.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_the_wandb_loggers_leave_no_temporary_folders(tiny_sweep):
    """``import wandb`` makes two temporary folders per process, removed at interpreter exit, which a Ray actor
    killed after its run never reaches: each trial's W&B logger left two in /tmp until they were removed after the
    run. Nothing else runs while the session's sweep does, so folders made in its time are its loggers'."""
    import tempfile

    out = tiny_sweep[0]
    started = (out / "sweep.json").stat().st_mtime
    ended = max(path.stat().st_mtime for path in (out / "wandb").rglob("*")) + 5
    left = [folder for folder in Path(tempfile.gettempdir()).glob("tmp*wandb-*") if started <= folder.stat().st_ctime <= ended]
    assert left == []


def test_each_offline_wandb_run_holds_its_trials_values_tags_and_summary(tiny_sweep):
    out, settings, _ = tiny_sweep
    board = pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str}).set_index("trial_id")
    dataset = Path(settings.dataset).name
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == settings.trials
    for run_file in files:
        summary = json.loads(_inspect(run_file, "--summary"))
        row = board.loc[summary["run_id"]]
        assert summary["tags"] == [dataset, row["method"]]
        assert summary["name"] == f"{row['method']}-{summary['run_id']}"
        assert summary["state"] == "finished"  # wandb.finish ran: the summary record is in the file
        # where the trial's files are: its folder in the sweep (Ray's default, its staging folder, goes with Ray's session)
        assert Path(summary["config"]["trial_log_path"]).parent == out / "ray" / "tune"
        assert (Path(summary["config"]["trial_log_path"]) / "progress.csv").is_file()
        # The config the trial ran with, flat: this sweep of two methods samples prefixed keys (fpt_plus.lr)
        ran = json.loads(row["config_json"])
        assert {key: summary["config"].get(key) for key in ran} == ran and not [k for k in summary["config"] if "." in k]
        history = [json.loads(line)["history"]["item"] for line in _inspect(run_file).splitlines() if '"type":"history"' in line]
        assert [h["epoch"] for h in history] == list(range(1, int(row["epochs_run"]) + 1))
        assert max(h["val_auc"] for h in history) == pytest.approx(row["best_val_auc"])
        assert summary["summary"]["best_val_auc"] == pytest.approx(row["best_val_auc"])
        assert summary["summary"]["val_auc"] == pytest.approx(history[-1]["val_auc"])


def test_an_interrupted_sweeps_open_wandb_runs_are_finished_with_their_results(ray_session, synthetic_spec, tmp_path):
    """A sweep's interrupt stops its running trials to resume them, no trial end for Tune, so their W&B runs
    were still open at the experiment's end: Ray's callback waited its whole upload timeout (60 s after every
    Ctrl-C), then killed their loggers mid-run, leaving runs without their finish. Here a trial reports twice
    and the experiment ends (as Tune's graceful stop ends it): its run is finished, both epochs in it."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from medsweep.search.settings import SweepSettings
    from medsweep.search.tuning import SweepWandbCallback, build_callbacks

    settings = SweepSettings(methods=["linear"], out=tmp_path, tracker="wandb", wandb="offline")
    (callback,) = [c for c in build_callbacks(settings, synthetic_spec, SweepConsole(quiet=True)) if isinstance(c, SweepWandbCallback)]
    callback.setup()
    storage = StorageContext(storage_path=tmp_path / "ray", experiment_dir_name="tune", trial_dir_name="trial-open0001")
    config = {"method": "linear", "linear.lr": 0.01, "epochs": 4}  # as a sweep of several methods samples it
    trial = Trial("run_trial", config=config, trial_id="open0001", storage=storage, stub=True)
    Path(trial.local_path).mkdir(parents=True)  # as Tune makes it; the run's logger works in it
    for epoch in (1, 2):
        callback.log_trial_result(epoch, trial, {"epoch": epoch, "val_auc": 0.5 + epoch / 10, "training_iteration": epoch})
    callback.on_experiment_end([trial])
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*-open0001/run-open0001.wandb")
    summary = json.loads(_inspect(run_file, "--summary"))
    assert summary["state"] == "finished"
    assert summary["config"]["trial_log_path"] == trial.path == str(tmp_path / "ray" / "tune" / "trial-open0001")
    history = [json.loads(line)["history"]["item"] for line in _inspect(run_file).splitlines() if '"type":"history"' in line]
    assert [h["epoch"] for h in history] == [1, 2] and callback._trial_logging_actors == {}
    del callback  # Ray's callback's __del__ needs Ray: not at the interpreter's exit
    gc.collect()


@pytest.fixture(scope="module")
def offline_run_folder(tmp_path_factory) -> Path:
    """A folder laid out like a sweep's output, holding one real offline W&B run (no sweep needed)."""
    import wandb

    out = tmp_path_factory.mktemp("offline-runs")
    run = wandb.init(project="medsweep", mode="offline", dir=str(out), id="sync0001")
    run.log({"val_auc": 0.5})
    run.finish()
    return out


def test_sync_without_an_api_key_stops_at_once_and_names_the_fix(offline_run_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    start = time.monotonic()
    with pytest.raises(ConfigError, match="set WANDB_API_KEY") as error:
        sync.run(_parse(["sync", str(offline_run_folder)], sync))
    assert time.monotonic() - start < 5 and "\n" not in str(error.value)


def test_sync_that_cannot_reach_the_server_gives_up_at_its_timeout(offline_run_folder, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens: wandb retries for ever
    start = time.monotonic()
    with pytest.raises(MedsweepError, match="did not finish in 8 s") as error:
        sync.run(_parse(["sync", str(offline_run_folder), "--timeout", "8"], sync))
    assert time.monotonic() - start < 30 and "\n" not in str(error.value)
    assert sync.offline_runs(offline_run_folder)  # nothing is lost: a later sync can retry


def test_sync_and_dashboard_refuse_a_folder_that_holds_no_sweep(tmp_path):
    with pytest.raises(ConfigError, match="has no offline W&B runs"):
        sync.run(_parse(["sync", str(tmp_path)], sync))
    with pytest.raises(ConfigError, match=r"has no optuna-study\.log; pass the --out folder"):
        dashboard.run(_parse(["dashboard", str(tmp_path)], dashboard))


def test_dashboard_refuses_a_port_out_of_range_and_a_busy_port_in_one_line(tiny_sweep, capsys):
    out, _, _ = tiny_sweep
    for port in ("0", "70000"):
        with pytest.raises(SystemExit) as exit_:
            _parse(["dashboard", str(out), "--port", port], dashboard)
        assert exit_.value.code == 2 and "must be a port from 1 to 65535" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(MedsweepError, match=f"cannot serve on 127.0.0.1:{port} .*; pick another --port") as error:
            dashboard.run(_parse(["dashboard", str(out), "--port", str(port)], dashboard))
    assert "\n" not in str(error.value)


def test_the_dashboard_is_announced_at_an_address_a_browser_can_open():
    assert dashboard.dashboard_url("127.0.0.1", 8080) == "http://127.0.0.1:8080/dashboard"
    assert dashboard.dashboard_url("0.0.0.0", 8081) == f"http://{socket.gethostname()}:8081/dashboard"


@pytest.fixture(scope="module")
def dashboard_url(tiny_sweep):
    """`medsweep dashboard` on the tiny sweep, on a free localhost port, for the module's tests."""
    out, _, _ = tiny_sweep
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", DASHBOARD_CLI, "dashboard", str(out), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/studies", timeout=5)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"medsweep dashboard did not come up: {server.communicate()[0].decode()[-2000:]}")
            time.sleep(0.3)
    yield url
    server.terminate()
    server.wait(timeout=30)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_dashboard_api_lists_the_sweep_study_with_every_trial(tiny_sweep, dashboard_url):
    out, settings, _ = tiny_sweep
    (study,) = _get(f"{dashboard_url}/api/studies")["study_summaries"]
    assert study["study_name"] == "medsweep"
    trials = _get(f"{dashboard_url}/api/studies/{study['study_id']}?after=0")["trials"]
    assert len(trials) == settings.trials
    assert {t["state"] for t in trials} == {"Complete"}
    board = pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str})
    methods = sorted(p["param_external_value"] for t in trials for p in t["params"] if p["name"] == "method")
    assert methods == sorted(board["method"])


@pytest.mark.slow
def test_dashboard_page_renders_the_trials_in_chromium(tiny_sweep, dashboard_url, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); the JSON API test covers the server")
    _, settings, _ = tiny_sweep
    (study,) = _get(f"{dashboard_url}/api/studies")["study_summaries"]
    page = f"{dashboard_url}/dashboard/studies/{study['study_id']}/trials"
    browser = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*browser, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    text = " ".join(re.sub(r"<[^>]+>", " ", re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)).split())
    assert f"medsweep (id={study['study_id']})" in text and f"{settings.trials} Trials" in text
    assert all(f"Trial {n} Complete" in text for n in range(settings.trials))
    png = tmp_path / "dashboard.png"
    subprocess.run([*browser, f"--screenshot={png}", "--window-size=1280,800", page], capture_output=True, timeout=120)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
