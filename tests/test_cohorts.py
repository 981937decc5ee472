"""Fused trial cohorts in real sweeps: members stay trials (board, study, ASHA, resume) and really share a server.

The fault tests reuse tests/test_faults.py's process helpers: the driver is killed with SIGKILL,
a cohort server (the ``ray::CohortServer`` actor process) too.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from test_faults import (
    RAN_TO_THE_END,
    _checkpointed_early,
    _restored_from_checkpoint,
    _results,
    _sweep_argv,
    _tiny_settings,
    _trial_processes,
    killed_driver_resumes,
    sweep_through_fault,
    sweep_with_fault,
    worker_nodes_in_a_child,
)

from medsweep.search.cohorts import cohort_servers, slot_split, spread
from medsweep.search.console import SweepConsole
from medsweep.search.members import Cohorts
from medsweep.search.settings import SweepSettings, load_settings
from medsweep.search.study import COHORTS_FILE, load_study
from medsweep.search.sweep import run_sweep
from medsweep.search.tuning import PENDING_TRIALS_ENV, cohort_size_for, cohorts_off, trial_resources, trials_pending_at_once

EPOCHS = 3


def _settings(root: Path, out: Path, cache: Path, trials: int, epochs: int = EPOCHS, **extra) -> SweepSettings:
    return _tiny_settings(root, out, cache, ["linear"], trials, epochs, **extra)


def _cohorts(out: Path) -> list[dict]:
    return json.loads((out / "ray" / COHORTS_FILE).read_text())


def _board(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str})


@pytest.fixture(scope="module")
def cache_dir(feature_cache) -> Path:
    return feature_cache  # the linear store of the session's other sweeps over synthetic_root


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fused_members_are_trials_and_asha_stops_each_alone(ray_session, synthetic_root, cache_dir, tmp_path):
    """Six linear trials in cohorts of three (a server's share of them: two servers on the session's 2 CPUs), each
    with its own offline W&B run, ASHA (grace 1, halving) on learning rates drawn at
    random over orders of magnitude. Every member is one trial of the board and of the study, told its own value;
    they really shared a server; only members ASHA stopped left their cohort, and the others ran every epoch."""
    epochs, trials = 4, 6
    settings = _settings(
        synthetic_root, tmp_path / "sweep", cache_dir, trials=trials, cohort_size=trials, epochs=epochs,
        early_stopping=True, grace_period=1, search="random", fixed={"warmup_epochs": 0},
    )  # fmt: skip
    settings.wandb = "offline"  # each member streams to its own W&B run, as any trial
    scratch_before = set(Path(tempfile.gettempdir()).glob("medsweep-cohort-*"))
    console = SweepConsole(record=True)  # kept, not shown
    run_sweep(settings, console)
    assert set(Path(tempfile.gettempdir()).glob("medsweep-cohort-*")) <= scratch_before  # the servers removed theirs
    text = console.text()
    assert "cohorts members per cohort: linear up to 3, on 2 cohort server(s)" in text
    board = _board(settings.out)
    assert len(board) == trials and board["trial_id"].is_unique
    runs = sorted((settings.out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert {p.stem.removeprefix("run-") for p in runs} == set(board["trial_id"])  # one offline run per member
    study = load_study(settings.out)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * trials
    # Each Optuna trial was told its own member's value: the study's values are the board's, one each.
    told = sorted(t.value for t in study.trials)
    assert told == pytest.approx(sorted(board["best_val_auc"]), nan_ok=True)
    # The linear probe searches its batch size, and members of different batch sizes never fuse: the searcher
    # handed the trials out in runs of three sharing their leader's (medsweep.search.cohort_pins).
    runs = [[t.params["batch_size"] for t in study.trials[i : i + 3]] for i in (0, 3)]
    assert all(len(set(run)) == 1 for run in runs), runs
    cohorts = _cohorts(settings.out)
    assert any(len(cohort["trials"]) > 1 for cohort in cohorts), cohorts  # really fused
    assert max(len(cohort["trials"]) for cohort in cohorts) <= 3, cohorts  # spread over both servers
    trained = ", ".join(f"{c['method']} of {len(c['trials'])} member{'s' * (len(c['trials']) != 1)}" for c in cohorts)
    assert f"cohorts {len(cohorts)} trained: {trained} (ray/cohorts.json)" in text
    assert set(t for cohort in cohorts for t in cohort["trials"]) == set(board["trial_id"])
    # The board says how many trials each trained with (its cohort's size at its start).
    trained_with = {t: len(cohort["trials"]) for cohort in cohorts for t in cohort["trials"]}
    assert dict(zip(board["trial_id"], board["cohort_members"], strict=True)) == trained_with
    stopped = set(board.loc[board["epochs_run"] < epochs, "trial_id"])
    assert stopped, "ASHA stopped no trial: the test's learning rates no longer separate the members"
    ran_on = board.loc[~board["trial_id"].isin(stopped)]
    assert (ran_on["epochs_run"] == epochs).all() and set(ran_on["status"]) <= RAN_TO_THE_END
    assert set(board.loc[board["trial_id"].isin(stopped), "status"]) <= {"stopped early", "collapsed"}
    # Exactly the stopped members left their cohort, each told by Tune (the driver's CohortLeaves callback) as
    # ASHA stopped it, none dropped after the servers' grace.
    assert {t for cohort in cohorts for t in cohort["left"]} == stopped
    assert not [t for cohort in cohorts for t in cohort["dropped"]]


def test_cohort_size_one_starts_no_server_and_trials_keep_their_resources(ray_session, tmp_path):
    """``--cohort-size 1`` (no size above one): no server, so ``build_trainable`` binds ``run_trial`` as before cohorts."""
    settings = SweepSettings(methods=["linear"], trials=2, out=tmp_path, cohort_size=1)
    with cohort_servers(settings, {}, {"linear": 1}, slots=2, gpus=0.0) as cohorts:
        assert cohorts is None
    assert not (tmp_path / "ray" / COHORTS_FILE).exists()
    resources = trial_resources(settings, {"linear": 0.0})({"method": "linear"})
    assert resources.bundles == [{"CPU": 1.0}]
    cohorts = Cohorts(router=None, servers=[None, None], sizes={"linear": 4}, client_cpus=0.01)
    assert trial_resources(settings, {"linear": 0.0}, cohorts)({"method": "linear"}).bundles == [{"CPU": 0.01}]
    # A slot's CPUs hold its server and its clients: 2 slots x (0.96 + 4 x 0.01) on 2 CPUs.
    assert slot_split(1.0, 4) == pytest.approx((0.96, 0.01))
    assert slot_split(0.1, 16)[0] == pytest.approx(0.05)


def test_pending_trials_are_set_per_run_and_a_users_own_value_wins(ray_session, tmp_path, monkeypatch):
    """Each run gets its own slots' count of pending trials (the first run's value used to stick for every later
    run in the process), cohorts or not (members pending at once compete for the cores); a user's value wins."""
    monkeypatch.delenv(PENDING_TRIALS_ENV, raising=False)
    cpus = int(ray_session.cluster_resources()["CPU"])
    with trials_pending_at_once(SweepSettings(methods=["linear"], out=tmp_path, cpus_per_trial=1.0)):
        assert os.environ[PENDING_TRIALS_ENV] == str(cpus)
    assert PENDING_TRIALS_ENV not in os.environ
    with trials_pending_at_once(SweepSettings(methods=["linear"], out=tmp_path, cpus_per_trial=0.5)):
        assert os.environ[PENDING_TRIALS_ENV] == str(2 * cpus)
    monkeypatch.setenv(PENDING_TRIALS_ENV, "3")
    with trials_pending_at_once(SweepSettings(methods=["linear"], out=tmp_path)):
        assert os.environ[PENDING_TRIALS_ENV] == "3"
    assert os.environ[PENDING_TRIALS_ENV] == "3"


def test_cohorts_are_spread_over_the_servers():
    assert spread({"fpt_plus": 8, "linear": 8}, trials=8, servers=2) == {"fpt_plus": 4, "linear": 4}
    assert spread({"fpt_plus": 8}, trials=16, servers=2) == {"fpt_plus": 8}
    assert spread({"fpt_plus": 8}, trials=5, servers=2) == {"fpt_plus": 3}  # rounded up: no trial left alone
    assert spread({"fpt_plus": 8}, trials=None, servers=2) == {"fpt_plus": 8}  # a time budget: no count to share


def test_auto_cohort_size_fills_the_method_gpu_fraction():
    gib = 2**30
    assert cohort_size_for(None, 0.0, 0) == 1  # CPUs: every trial alone, the faster there (BENCHMARKS.md figure 11)
    # A quarter of 80 GiB less a 500 MiB context, steps of 1 GiB x 1.5: 13 members.
    assert cohort_size_for(gib, 0.25, 80 * gib) == 13
    assert cohort_size_for(10 * 2**20, 1.0, 80 * gib) == 16  # capped
    assert cohort_size_for(20 * gib, 0.25, 80 * gib) == 1  # one member at least


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_driver_of_a_fused_sweep_resumes_with_every_member_once(ray_session, synthetic_root, cache_dir, tmp_path, monkeypatch):
    """SIGKILL the driver while members hold checkpoints; ``medsweep resume`` starts new servers and ends
    with exactly the planned trials, the interrupted ones continued from their checkpoints."""
    out = killed_driver_resumes(synthetic_root, cache_dir, tmp_path, monkeypatch, "--cohort-size", "2", need_finished=False, trials=3)
    # The killed driver recorded nothing; the resume's servers ran every member it continued.
    assert _cohorts(out)
    assert load_settings(out).cohort_size == 2  # sweep.json kept it, and the resume ran with it
    # The restartable servers and router take no object reference or actor handle in their constructors (they fetch
    # them from the CohortRegistry), so Ray printed no error line about their restarts on the user's terminal. Ray
    # prints that line once per process: for the preload's own map actors if this driver builds the store
    # (ray-project/ray#57733), which it does not after this module's first sweep built it.
    log = (tmp_path / "driver.log").read_text()
    assert not re.search(r"Cohort\w+' and ID: \S+ has constructor arguments in the object store", log)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_cohort_server_restarts_its_members_from_their_checkpoints(ray_session, synthetic_root, cache_dir, tmp_path):
    """Every cohort server process is SIGKILLed once a member holds a checkpoint with epochs left: Ray
    restarts the servers, the members' trials fail and Tune restarts them from their checkpoints."""
    epochs, trials = 6, 3
    settings = _settings(synthetic_root, tmp_path / "sweep", cache_dir, trials=trials, cohort_size=trials, epochs=epochs)
    killed: list[int] = []

    def kill_servers_mid_cohort() -> bool:
        servers = _trial_processes(os.getpid(), actor="CohortServer")
        if not (servers and _checkpointed_early(settings.out, epochs)):
            return False
        for pid, process in servers.items():
            process.kill()
            killed.append(pid)
        return True

    sweep_with_fault(settings, kill_servers_mid_cohort)

    assert killed, "no member was caught between its first checkpoint and its end"
    board = _board(settings.out)
    assert len(board) == trials and board["trial_id"].is_unique
    assert set(board["status"]) <= RAN_TO_THE_END and (board["epochs_run"] == epochs).all()
    restored = [t for t in board["trial_id"] if _restored_from_checkpoint(_results(settings.out / "ray" / "tune" / f"trial-{t}"))]
    assert restored  # continued from a checkpoint, not from scratch
    for trial_id in board["trial_id"]:
        epochs_seen = sorted({r["epoch"] for r in _results(settings.out / "ray" / "tune" / f"trial-{trial_id}")})
        assert epochs_seen == list(range(1, epochs + 1))
    assert [t.state.name for t in load_study(settings.out).trials].count("COMPLETE") == trials


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_a_fused_sweep_spans_nodes_and_finishes_when_a_servers_node_dies(synthetic_root, cache_dir, tmp_path):
    """``medsweep sweep --address --cohort-size 2`` on a local cluster of two one-CPU worker nodes (the head has no
    CPU): one cohort server lands on each node, members and servers trade checkpoints through the object store
    across nodes, and when the node of a server whose members hold checkpoints is removed mid-cohort, its members
    restart from those checkpoints on the other node's server and the sweep ends with every trial once. The router
    and the registry stay on the driver's node (on a removed worker they took every later join with them)."""
    epochs, trials = 6, 4
    out, log = tmp_path / "sweep", tmp_path / "driver.log"
    with worker_nodes_in_a_child() as (address, raylets, remove):

        def remove_a_servers_node_mid_cohort() -> bool:
            servers = [_trial_processes(raylet, actor="CohortServer") for raylet in raylets]
            if not (all(servers) and _checkpointed_early(out, epochs)):
                return False
            # The router and the registry (no CPU) live on the driver's node (the head here), never on a worker.
            for actor in ("CohortRouter", "CohortRegistry"):
                assert _trial_processes(1, actor=actor), f"no {actor} process found"
                assert not [raylet for raylet in raylets if _trial_processes(raylet, actor=actor)], actor
            remove(0)
            return True

        argv = _sweep_argv(synthetic_root, out, cache_dir, trials, "--address", address, "--cohort-size", "2", epochs=epochs)
        sweep_through_fault(argv, log, remove_a_servers_node_mid_cohort)

    board = _board(out)
    assert len(board) == trials and board["trial_id"].is_unique
    assert set(board["status"]) <= RAN_TO_THE_END and (board["epochs_run"] == epochs).all()
    results = {t: _results(out / "ray" / "tune" / f"trial-{t}") for t in board["trial_id"]}
    assert any(_restored_from_checkpoint(r) for r in results.values())  # the removed node's members went on
    for trial_id, reported in results.items():
        assert sorted({r["epoch"] for r in reported}) == list(range(1, epochs + 1)), trial_id
    assert [t.state.name for t in load_study(out).trials].count("COMPLETE") == trials
    assert any(len(cohort["trials"]) == 2 for cohort in _cohorts(out))  # really fused, before or after the loss


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_join_passes_over_a_server_that_cannot_start_and_so_does_the_sweeps_end(ray_session, tmp_path):
    """A server whose node died restarts only where a node has room, which may be never while the live servers
    hold the CPUs. Here one server asks for more CPUs than the cluster has (it never starts): a member's join goes
    to the live server within the router's answer timeout, its leave returns, and stopping the servers at the
    sweep's end takes the stop timeout, not forever (the router used to wait on that server for good)."""
    import ray

    from medsweep.search.cohorts import STOP_TIMEOUT_S, CohortServer, _stop
    from medsweep.search.router import ANSWER_TIMEOUT_S, CohortRegistry, CohortRouter

    registry_name = f"test-registry-{tmp_path.name}"
    registry = ray.remote(CohortRegistry).options(name=registry_name, num_cpus=0).remote({})
    server = ray.remote(CohortServer)
    stuck = server.options(num_cpus=10_000, max_concurrency=8).remote(registry_name, {"linear": 2}, 1)  # never placed
    live = server.options(num_cpus=0, max_concurrency=8).remote(registry_name, {"linear": 2}, 1)
    ray.get(registry.add_servers.remote([stuck, live]))
    router = ray.remote(CohortRouter).options(num_cpus=0).remote(registry_name, {"linear": 2})
    config = {"method": "linear", "backbone": "vit-tiny", "image_size": 32, "epochs": 2, "store_key": "s"}
    try:
        assert ray.get(router.join.remote("a1", config, None), timeout=120) == 1
        assert ray.get(live.status.remote())["waiting"] == [(ray.get(live.group.remote(config, None)), 1)]
        start = time.monotonic()
        ray.get(router.leave.remote("a1"), timeout=60)
        assert ray.get(live.status.remote())["waiting"] == []
        ray.get(router.join.remote("a2", config, None), timeout=60)
        assert time.monotonic() - start < 3 * ANSWER_TIMEOUT_S
        start = time.monotonic()
        assert _stop([stuck, live]) == [] and time.monotonic() - start < STOP_TIMEOUT_S + 5
    finally:
        for actor in (router, registry, stuck, live):
            ray.kill(actor)


def _bare_server(size: int = 4):
    """A CohortServer's state only: no training thread, no stores (its join, forming and leave logic)."""
    import threading

    from medsweep.search.cohorts import CohortServer

    server = CohortServer.__new__(CohortServer)
    server.sizes, server.members, server.queue, server.last_join, server.ran = {"linear": size}, {}, [], {}, []
    server.changed = threading.Condition()
    return server


def test_a_member_whose_last_result_is_out_is_done_and_tunes_end_of_it_is_no_leave():
    """ASHA stops a trial on its result at max_t, so Tune may end a member right after its last epoch while the
    cohort still reports the others' epochs: that member is done, not left. A member ended mid-run does leave."""
    server = _bare_server(size=2)
    group = (("linear", "a"), 0)
    for trial_id in ("last", "mid"):
        server.join(trial_id, group, {"method": "linear", "epochs": 2}, None)
    assert server._next_cohort() == ["last", "mid"]
    for epoch in (1, 2):
        server.publish("last", {"epoch": epoch, "status": "running"}, None)
    server.publish("mid", {"epoch": 1, "status": "running"}, None)
    server.leave("last")
    server.leave("mid")
    assert [server.members[t].state for t in ("last", "mid")] == ["done", "left"]
    assert [(c["left"], c["dropped"]) for c in server.cohorts()] == [(["mid"], [])]


def test_a_group_forms_after_its_own_quiet_time_while_other_groups_keep_joining(monkeypatch):
    """A server's oldest group starts FORM_WAIT_S after its own last member joined, even while members of
    another group keep arriving (as they do while a busy cluster starts many member trials): a wait on the
    server's last join of any group held every group back until all joins stopped."""
    import threading
    import time

    from medsweep.search import cohorts as cohorts_module

    monkeypatch.setattr(cohorts_module, "FORM_WAIT_S", 0.3)
    server = _bare_server()

    def join(trial_id: str, group) -> None:
        server.join(trial_id, group, {"method": "linear"}, None)

    lone, busy = ((("linear", "a"), 0), (("linear", "b"), 0))
    join("a0", lone)
    stop = threading.Event()

    def keep_joining() -> None:
        for i in range(200):  # a member of the other group every 50 ms for up to 10 s, never filling it for long
            if stop.is_set():
                return
            join(f"b{i}", busy)
            with server.changed:  # keep the busy group below its size so only quiet could start it
                server.queue = [t for t in server.queue if t.startswith("a") or t == f"b{i}"]
            time.sleep(0.05)

    joiner = threading.Thread(target=keep_joining)
    joiner.start()
    try:
        assert server._next_cohort() == ["a0"]
        assert joiner.is_alive()  # taken on its own quiet time, while the other group was still joining
    finally:
        stop.set()
        joiner.join()
    assert server.ran == [{"method": "linear", "start_epoch": 0, "trials": ["a0"]}]


def test_the_console_says_why_trials_run_alone_also_when_a_cohort_size_was_asked_for_in_vain():
    """`--cohort-size 4` with --no-preload (or only methods that train on images) ran every trial alone without a word."""
    cpu = SweepSettings(methods=["fpt_plus", "linear"])
    assert cohorts_off(cpu, ["fpt_plus", "linear"], 0.0) == (
        "each trial of fpt_plus, linear runs alone; on CPUs that is the faster (BENCHMARKS.md figures 11 and 11b); --cohort-size K trains K together"
    )
    assert "GPU fraction holds one member's probed step" in str(cohorts_off(cpu, ["fpt_plus"], 0.25))
    few = SweepSettings(methods=["linear"], trials=2, cohort_size=4)
    assert "--trials 2 leaves each cohort server fewer than 2 trials" in str(cohorts_off(few, ["linear"], 0.0))
    images = SweepSettings(methods=["lora", "fpt_plus"], cohort_size=4, preload_features=False)
    assert cohorts_off(images, [], 0.0) == (
        "--cohort-size 4 is not used: with --no-preload every trial runs its frozen backbone itself, so each trial runs alone"
    )
    lora = SweepSettings(methods=["lora"], cohort_size=4)
    assert cohorts_off(lora, [], 0.0) == "--cohort-size 4 is not used: lora trains on images, not on preloaded features, so each trial runs alone"
    assert cohorts_off(SweepSettings(methods=["lora"]), [], 0.0) is None
    assert cohorts_off(SweepSettings(methods=["linear"], cohort_size=1), [], 0.0) is None
