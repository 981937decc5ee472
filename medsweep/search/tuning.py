"""The Ray half of a sweep: start Ray, share the stores, build the searcher, run or restore the Tuner.

A fresh sweep (:func:`run_tuner`) and a resumed one (:func:`resume_tuner`)
build the trainable the same way (:func:`build_trainable`): its materialized
datasets are object references that die with the driver, so a resume must
rebuild them. The searcher and the callbacks are *not* rebuilt on resume:
``Tuner.restore`` unpickles them from ``tuner.pkl`` and Tune then loads the
searcher's last state (``searcher-state-*.pkl``: its Optuna trial of every
Tune trial, the trials it has completed, the sample counter) and the callbacks'
state (``callback-states-*.pkl``). ``Tuner.restore`` takes no ``tune_config``,
so a new searcher could not be passed, and it would be overwritten anyway
(``OptunaSearch.restore`` replaces its whole ``__dict__``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pyarrow.fs
import ray
from optuna.exceptions import UpdateFinishedTrialError
from optuna.samplers import RandomSampler, TPESampler
from optuna.storages import JournalStorage
from optuna.trial import TrialState
from ray import tune
from ray.air.integrations.wandb import WandbLoggerCallback, _clean_log, _QueueItem, _WandbLoggingActor
from ray.tune import Callback, CheckpointConfig, FailureConfig, PlacementGroupFactory, RunConfig, TuneConfig, Tuner
from ray.tune.result import EXPR_PROGRESS_FILE, EXPR_RESULT_FILE
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from medsweep.datasets.spec import DatasetSpec
from medsweep.errors import ConfigError
from medsweep.search.atomic_storage import atomic_local_filesystem, snapshots_wait_for_their_copy
from medsweep.search.cohort_pins import CohortPins
from medsweep.search.cohorts import CPU_COHORT_SIZE, MAX_COHORT_SIZE, cohort_servers, fused_methods
from medsweep.search.console import SweepConsole, dropping
from medsweep.search.data import StoreData, share_stores
from medsweep.search.manifest import store_keys_used
from medsweep.search.members import Cohorts, run_member, run_trial_or_member
from medsweep.search.router import router_name
from medsweep.search.settings import OBJECTIVES, SweepSettings, fixed_config, sweep_dataset, wandb_mode
from medsweep.search.space import build_search, trial_config
from medsweep.search.study import COHORTS_FILE, RAY_DIR, STUDY_NAME, TRAIN_DIR, experiment_dir, study_storage
from medsweep.search.tracking import SweepMlflowCallback, check_tracker, mlflow_experiment, mlflow_uri
from medsweep.search.trial import run_trial
from medsweep.search.warm import WARM_START_ATTR
from medsweep.trainables.cohort import shape_keys
from medsweep.trainables.preload import PreloadResult

# The one objective: the validation AUC of the trial's best epoch so far (``loop.is_better_epoch``). The
# searcher is told it, ASHA compares it at each rung (a trial is judged by the best it reached, as it will
# be ranked), and the leaderboard, best.yaml and `final` select on it (the leaderboard's ``best_val_auc``).
METRIC = OBJECTIVES["auc"][0]
DRIVER_MEMORY_BYTES = 256 * 2**20
PENDING_TRIALS_ENV = "TUNE_MAX_PENDING_TRIALS_PG"  # Tune's cap on trials pending at once (see trials_pending_at_once)
WANDB_PROJECT = "medsweep"


def start_ray(settings: SweepSettings) -> None:
    """Join ``--address`` or start a local Ray with this machine's CPUs; quiet logs."""
    check_tracker(settings.tracker)
    quiet_tune_and_optuna()
    if not ray.is_initialized():
        mode = wandb_mode(settings.wandb)
        os.environ["WANDB_MODE"] = mode  # read by W&B and by Ray's API-key check (no prompt offline)
        os.environ.setdefault("WANDB_SILENT", "true")
        # Tune warns at every forced experiment snapshot (each trial checkpoint with num_to_keep set);
        # per-epoch checkpoints of short trials are the point here, not a misconfiguration.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        join_ray(settings.address, settings.connect_timeout, {"WANDB_MODE": mode, "WANDB_SILENT": "true"})
    if settings.address is None:
        check_trials_fit(settings, [node["Resources"] for node in ray.nodes() if node.get("Alive")])


def check_trials_fit(settings: SweepSettings, nodes: list[dict[str, float]]) -> None:
    """Refuse, in one line, a trial that no node of a local Ray could ever place: Tune would wait for it for good.

    ``nodes``: each live node's resources. A trial's CPUs and GPU share sit on one node; a DDP group's workers
    (one CPU each, and one GPU each on GPUs) may spread over several. Only for a Ray that cannot grow (no
    ``--address``): a cluster joined with ``--address`` may autoscale to what a trial asks for."""
    from medsweep.trainables.methods import runs_ddp

    most_cpus = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
    most_gpus = max((node.get("GPU", 0.0) for node in nodes), default=0.0)
    all_cpus, all_gpus = sum(node.get("CPU", 0.0) for node in nodes), sum(node.get("GPU", 0.0) for node in nodes)
    ddp = [method for method in settings.methods if runs_ddp(method)] if settings.workers > 1 else []
    alone = [method for method in settings.methods if method not in ddp]
    cpus, gpus = settings.cpus_per_trial, settings.gpus_per_trial
    if alone and cpus > most_cpus:
        raise ConfigError(f"--cpus-per-trial {cpus:g}: no node of this Ray has that many CPUs (the largest has {most_cpus:g}); pass at most {most_cpus:g}")
    if gpus and not all_gpus:
        raise ConfigError(f"--gpus-per-trial {gpus:g}, but this Ray has no GPU; leave it out (trials then run on CPUs)")
    if gpus and alone and gpus > most_gpus:
        raise ConfigError(f"--gpus-per-trial {gpus:g}: no node of this Ray has that many GPUs (the largest has {most_gpus:g}); pass at most {most_gpus:g}")
    on_gpus = bool(all_gpus) and gpus != 0  # DDP workers take whole GPUs, unless --gpus-per-trial 0 keeps them on CPUs
    devices, kind = (all_gpus, "GPUs") if on_gpus else (all_cpus, "CPUs")
    if ddp and settings.workers > devices:
        raise ConfigError(
            f"--workers {settings.workers}: a DDP group of {ddp[0]} takes one of this Ray's {kind} per worker, and it has "
            f"{devices:g}; pass at most --workers {int(devices)}"
        )


def join_ray(address: str | None, connect_timeout: float, env: dict[str, str] | None = None) -> None:
    """Join the cluster at ``address`` (a bounded wait, :func:`connect`) or start a local Ray; quiet logs.

    ``env``: environment variables for every Ray worker, beside the ones set here.
    """
    if ray.is_initialized():
        return
    env = {"TOKENIZERS_PARALLELISM": "false", **(env or {})}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False, "logging_level": logging.WARNING}
    # Ray's notice of its default token authentication ("Set RAY_AUTH_MODE=disabled to opt out") is about a
    # choice no user makes here (a local Ray medsweep starts and stops) or the cluster's owner made (a joined one).
    with dropping(logging.getLogger("ray._private.authentication.authentication_token_setup"), "Token authentication is enabled"):
        if address:
            connect(address, connect_timeout, kwargs)
        else:
            ray.init(address="local", include_dashboard=False, **kwargs)  # never join a stray `ray start` cluster
    quiet_ray_data()


def quiet_tune_and_optuna() -> None:
    """Keep Tune's and Optuna's own lines off the sweep's console, which reports the search itself.

    Tune's output engine prints its experiment table and a TensorBoard hint at every run, whatever its
    ``verbose``; with its older engine (``RAY_AIR_NEW_OUTPUT=0``) ``verbose=0`` prints nothing. Optuna logs
    "A new study created" at INFO. A user's own ``RAY_AIR_NEW_OUTPUT`` is left as it is."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


class _ConnectTimeout(BaseException):
    """Raised by the watchdog alarm; a BaseException, since Ray's GCS retry loop catches Exception."""


def connect(address: str, timeout: float, kwargs: dict[str, Any]) -> None:
    """``ray.init(address)`` within ``timeout`` seconds, else one line naming the address and the check.

    Left alone, Ray retries a cluster that does not answer for minutes (a
    ``127.0.0.1`` address becomes the node's own IP first). So the GCS port
    Ray would use is probed over TCP first (nothing listening fails at once),
    Ray's own GCS wait is capped at the timeout, and an alarm bounds the rest;
    a failed connect is shut down so no half-initialised driver stays.
    """
    from ray._private.services import canonicalize_bootstrap_address

    hint = f"check it with `ray status --address {address}` (or start one with `ray start --head`)"
    try:
        target = canonicalize_bootstrap_address(address)  # host:port as ray.init would dial it
    except (ConnectionError, ValueError) as error:
        raise ConfigError(f"no Ray cluster at --address {address} ({_first_line(error)}); {hint}") from None
    if target is not None:
        _probe_tcp(target, timeout, address, hint)
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(max(1, int(timeout))))

    def alarm(signum: int, frame: Any) -> None:
        raise _ConnectTimeout

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        ray.init(address=address, **kwargs)
    except (_ConnectTimeout, ConnectionError, RuntimeError) as error:
        ray.shutdown()
        why = f"no answer within {timeout:g} s" if isinstance(error, _ConnectTimeout) else _first_line(error)
        raise ConfigError(f"cannot join the Ray cluster at --address {address} ({why}); {hint}") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _probe_tcp(target: str, timeout: float, address: str, hint: str) -> None:
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        why = "timed out" if isinstance(error, TimeoutError) else (error.strerror or type(error).__name__).lower()
        raise ConfigError(f"no Ray cluster answers at --address {address} ({target}: {why} after up to {timeout:g} s); {hint}") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def quiet_ray_data() -> None:
    """Ray Data logs every execution plan at INFO; the console reports reads in one line instead."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Progress bars disabled. To enable, set ...": a warning about the choice just made, once per sweep's console.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


# GPU fraction sizing (``--gpus-per-trial auto``, the default). A trial reserves 1/k of a GPU,
# k in GPU_SHARES, the largest k whose share holds the method's probed step memory x SAFETY plus
# CUDA_CONTEXT_BYTES:
# * SAFETY 1.5: the probe is one step at the largest searched batch size with the recommended
#   values of the other keys; a trial's own searched values (a larger keep ratio, more prompts,
#   a higher LoRA rank), the evaluation pass and the caching allocator's fragmentation can need
#   more than ``max_memory_allocated`` of that step (and the CPU proxy sits below a GPU reading);
# * CUDA_CONTEXT_BYTES 500 MiB: each trial is its own process with its own CUDA context
#   (cuBLAS/cuDNN workspaces and kernels), ~300-600 MiB on current drivers, which
#   ``max_memory_allocated`` does not count.
# Powers of two only, so mixed fractions of different methods still tile a GPU exactly;
# at most 16 trials per GPU (beyond that the trials' CPUs and the context overhead dominate).
GPU_SHARES = (16, 8, 4, 2, 1)
GPU_SAFETY = 1.5
CUDA_CONTEXT_BYTES = 500 * 2**20


def gpu_fraction(probe_bytes: int, gpu_total_bytes: int, method: str, workers: int = 1) -> float:
    """The GPU fraction one trial of ``method`` reserves, from its probed step memory.

    A method that runs DDP (``Method.ddp``) always gets whole GPUs, ``workers`` of them (one per DDP worker).
    Otherwise the smallest 1/k (k in :data:`GPU_SHARES`) of the smallest GPU's
    ``gpu_total_bytes`` that holds ``probe_bytes * GPU_SAFETY + CUDA_CONTEXT_BYTES``;
    a method that needs more than a whole GPU still gets 1 (it may not fit at all).
    """
    from medsweep.trainables.methods import runs_ddp

    if runs_ddp(method):
        return float(workers)
    need = probe_bytes * GPU_SAFETY + CUDA_CONTEXT_BYTES
    for share in GPU_SHARES:
        if need <= gpu_total_bytes / share:
            return 1.0 / share
    return 1.0


def largest_batch_size(method: str, settings: SweepSettings, dataset: str | None) -> int:
    """The largest batch size a trial of ``method`` can run with: a fixed batch size (the method's in
    ``search_ranges``, else ``--set``), else the largest in its searched space (or its recommended constant)."""
    from medsweep.spaces import fixed_values, recommended, space_for
    from medsweep.trainables.config import TrainConfig

    changes = settings.search_ranges.get(method)
    fixed = {**settings.fixed, **fixed_values(changes)}
    if "batch_size" in fixed:
        return int(fixed["batch_size"])
    sizes = space_for(method, dataset=dataset, overrides=changes).extreme_values("batch_size")
    if not sizes:
        sizes.append(recommended(method, dataset=dataset).get("batch_size", TrainConfig.batch_size))
    return int(max(sizes))


@ray.remote(max_calls=1)  # a fresh process per probe: its CUDA peak and context are its own
def _probe_task(config: dict[str, Any], batch_size: int) -> dict[str, Any]:
    import torch

    from medsweep.trainables.probe import probe_memory

    report = probe_memory(config, batch_size)
    if torch.cuda.is_available():
        report["gpu_total_bytes"] = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return report


def probe_methods(
    settings: SweepSettings,
    spec: DatasetSpec,
    num_gpus: float = 0.0,
    methods: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each method's peak training-step memory at the sweep's configuration and its largest batch.

    Runs :func:`medsweep.trainables.probe.probe_memory` as a Ray task (on a GPU
    node when ``num_gpus`` > 0: the driver may be a CPU head node), with the
    method's recommended values and the sweep's fixed ones. A report gains
    ``gpu_total_bytes``, the total memory of the GPU it ran on, when it had one.
    """
    from medsweep.spaces import recommended

    refs = {}
    for method in settings.methods if methods is None else methods:
        config = {**recommended(method, dataset=spec.name), **fixed_config(settings, spec, method)}
        batch = largest_batch_size(method, settings, spec.name)
        refs[method] = _probe_task.options(num_cpus=1, num_gpus=num_gpus).remote(config, batch)
    return {method: ray.get(ref) for method, ref in refs.items()}


def smallest_gpu_bytes() -> int | None:
    """Total memory of the smallest GPU among the cluster's alive nodes (one small task per GPU node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, num_gpus=0.01, max_calls=1)
    def total() -> int:
        import torch

        return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))

    refs = [
        total.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
        for node in ray.nodes()
        if node.get("Alive") and node.get("Resources", {}).get("GPU", 0) > 0
    ]
    sizes = ray.get(refs)
    return min(sizes) if sizes else None


def gpu_plan(
    settings: SweepSettings, spec: DatasetSpec | None, console: SweepConsole | None = None
) -> tuple[dict[str, float], dict[str, int], int]:
    """Each method's GPU fraction per trial, with what sized them (each probed method's step memory, the
    smallest GPU's bytes: cohorts are sized from them). The fraction is ``--gpus-per-trial`` for every method
    when given; else 0 without GPUs in the cluster; else sized by :func:`gpu_fraction` from a probe of each
    method (one console line per method with the probed memory and the fraction chosen)."""
    if settings.gpus_per_trial is not None:
        return {method: float(settings.gpus_per_trial) for method in settings.methods}, {}, 0
    if ray.cluster_resources().get("GPU", 0) <= 0:
        return {method: 0.0 for method in settings.methods}, {}, 0
    if spec is None:
        spec = sweep_dataset(settings)
    gpu_total = smallest_gpu_bytes()
    from medsweep.trainables.methods import runs_ddp

    # DDP methods get whole GPUs whatever they measure: not probed (their probe is the costliest).
    ddp = [m for m in settings.methods if runs_ddp(m)]
    probes = probe_methods(settings, spec, num_gpus=0.01, methods=[m for m in settings.methods if m not in ddp])
    gpu_total = min([gpu_total or math.inf, *(p.get("gpu_total_bytes", math.inf) for p in probes.values())])
    gpu_total = gpu_total if math.isfinite(gpu_total) else 0  # no GPU size known: whole GPUs, the safe side
    # gpu_fraction's rule for DDP methods does not read the memory: no probe bytes to give it.
    fractions = {method: gpu_fraction(0, int(gpu_total), method, settings.workers) for method in ddp}
    if console is not None:
        for method in ddp:
            console.console.print(f"[bold]gpu[/] {method}: {settings.workers} whole GPU(s) per trial (one per --workers), not probed")
    for method, probe in probes.items():
        fractions[method] = gpu_fraction(probe["peak_bytes"], int(gpu_total), method, settings.workers)
        if console is not None:
            console.console.print(
                f"[bold]gpu[/] {method}: probed step memory {probe['peak_mb']:.0f} MB at batch {probe['batch_size']} "
                f"(micro-batch {probe['micro_batch_size']}, {probe['precision']}, {probe['device'].split(' ')[0]}) -> {fractions[method]:g} GPU per trial "
                f"(smallest GPU {gpu_total / 2**30:.1f} GiB; x{GPU_SAFETY} + {CUDA_CONTEXT_BYTES // 2**20} MiB context)"
            )
    return fractions, {method: int(probe["peak_bytes"]) for method, probe in probes.items()}, int(gpu_total)


def cohort_size_for(step_bytes: int | None, fraction: float, gpu_total_bytes: int) -> int:
    """Members of one cohort (``--cohort-size`` auto): on a GPU, as many probed steps (x :data:`GPU_SAFETY`) as fit
    in the method's fraction beside one CUDA context, at most :data:`MAX_COHORT_SIZE`; on CPUs (or unprobed), the CPU default."""
    if not fraction or not step_bytes or not gpu_total_bytes:
        return CPU_COHORT_SIZE
    members = int((fraction * gpu_total_bytes - CUDA_CONTEXT_BYTES) // (step_bytes * GPU_SAFETY))
    return max(1, min(MAX_COHORT_SIZE, members))


def cohort_sizes(settings: SweepSettings, shared: SharedData, stores: dict[str, PreloadResult]) -> dict[str, int]:
    """Each fusable method's cohort size: ``--cohort-size``, else :func:`cohort_size_for`; none with ``--cohort-size 1``."""
    if settings.cohort_size == 1:
        return {}
    fused = fused_methods(settings, shared.stores, {method: result.store.key for method, result in stores.items()})
    return {
        method: settings.cohort_size or cohort_size_for(shared.step_bytes.get(method), shared.gpus[method], shared.gpu_bytes) for method in fused
    }


def concurrent_slots(settings: SweepSettings) -> int:
    """How many single-device trials the cluster's CPUs hold at once."""
    return max(1, int(ray.cluster_resources().get("CPU", 1) // settings.cpus_per_trial))


@contextlib.contextmanager
def trials_pending_at_once(settings: SweepSettings) -> Iterator[None]:
    """While a Tuner runs, let Tune start as many trials at once as the cluster's trial slots hold (their
    processes are reused).

    Tune allows a searcher (OptunaSearch) only one *pending* trial at a time
    (``TUNE_MAX_PENDING_TRIALS_PG`` defaults to 1 for any search algorithm but
    random/grid), and a trial stays pending while its actor process starts and
    imports torch (~5 s here). Short trials therefore ran one after the other
    on a 2-CPU machine, one slot idle. Measured on 8 tiny trials: 52 s
    sequential, 12 s with two pending trials and ``reuse_actors=True`` (an
    actor runs the next trial without a new process; the same AUCs to the last
    digit, as every trial seeds itself in the loop). More pending trials than
    slots would only make TPE suggest further ahead of its feedback.

    Cohort members too start as many at once as there are slots, not a whole cohort at once: "pending" is a
    member whose process is starting, and process starts compete for the same cores. On 2 cores (BENCHMARKS.md
    figure 11, one run each) 16 members pending at once gave the fused sweep its first result 23.9 s into the
    Tune run, 2 at once 19.5 s; 16 trivial Tune trials started all at once reported first after 10.7 s, two at a
    time after 1.3 s. A member that has started is running, not pending, so all of them still train at once.

    Tune reads the variable when a run starts, so it is set for this run only and removed after: left set,
    the first run's value held for every later run in the process (``medsweep extend``, a program calling
    ``run_sweep`` twice with other ``--cpus-per-trial``). A user's own ``TUNE_MAX_PENDING_TRIALS_PG`` wins and
    is left as it is.
    """
    if PENDING_TRIALS_ENV in os.environ:
        yield
        return
    os.environ[PENDING_TRIALS_ENV] = str(concurrent_slots(settings))
    try:
        yield
    finally:
        os.environ.pop(PENDING_TRIALS_ENV, None)


def trial_resources(settings: SweepSettings, gpus: dict[str, float], cohorts: Cohorts | None = None):
    """What a trial reserves: its CPU and its method's GPU fraction, or only a driver slot for DDP trials;
    a member of a cohort only a sliver of a CPU (its cohort server holds the resources)."""

    def resources(config: dict[str, Any]) -> PlacementGroupFactory:
        if cohorts is not None and config.get("method") in cohorts.sizes:
            return PlacementGroupFactory([{"CPU": cohorts.client_cpus}])
        if int(config.get("workers", 1)) > 1:
            # The Train worker group reserves its own CPUs/GPUs; the trial process only
            # waits for it, so it holds no CPU (even 0.01 CPU would leave a 2-CPU machine
            # unable to place 2 one-CPU workers).
            return PlacementGroupFactory([{"memory": DRIVER_MEMORY_BYTES}])
        bundle = {"CPU": settings.cpus_per_trial}
        method_gpus = gpus.get(config.get("method", ""), float(config.get("gpus_per_trial", 0)))
        if method_gpus:
            bundle["GPU"] = method_gpus
        return PlacementGroupFactory([bundle])

    return resources


class ConsoleCallback(Callback):
    """Forwards trial events to the console (the live table of running trials, or one line per event), each with
    the trial's flat config: a sweep of several methods samples prefixed keys (``fpt_plus.lr``), and the console
    showed no hyperparameters for them.

    Its count of finished trials is saved with the experiment (``get_state``),
    so a resumed sweep keeps counting from where the interrupted one stopped.
    """

    def __init__(self, console: SweepConsole, total: int | None) -> None:  # None: unbounded (--budget-hours)
        self.console = console
        self.total = total
        self.finished = 0

    def get_state(self) -> dict[str, Any]:
        return {"finished": self.finished}

    def set_state(self, state: dict[str, Any]) -> None:
        self.finished = state["finished"]

    def on_trial_start(self, iteration, trials, trial, **info):
        self.console.trial_start(trial.trial_id, trial_config(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.console.trial_result(trial.trial_id, trial_config(trial.config), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        self.console.trial_done(trial.trial_id, trial_config(trial.config), trial.last_result, self.finished, self.total)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.console.trial_error(trial.trial_id, trial_config(trial.config), str(trial.error_file))


class CurvesSurviveRestarts(Callback):
    """Keeps every epoch of a trial that Tune restarts after a fault in its ``result.json`` and ``progress.csv``.

    Tune writes those files in the driver's staging folder and copies them to the sweep's folder at each
    experiment snapshot; a restarted trial's loggers first copy the sweep's copy back over the staging one
    (``LoggerCallback._restore_from_remote``), so the epochs reported since the last snapshot vanished from
    the curves the report and the leaderboard read (seen: a trial killed after epoch 3 restored its epoch-3
    checkpoint and logged 1, 2, 4, 5, 6). Before the restart, this copies the staging files up first."""

    def on_trial_recover(self, iteration, trials, trial, **info):
        storage = trial.storage
        for name in (EXPR_RESULT_FILE, EXPR_PROGRESS_FILE):
            staged, kept = Path(trial.local_path, name), Path(storage.trial_fs_path, name)
            if staged.is_file() and staged.resolve() != kept.resolve():
                pyarrow.fs.copy_files(str(staged), kept.as_posix(), destination_filesystem=storage.storage_filesystem)


LEAVE_TIMEOUT_S = 10.0  # CohortLeaves waits this long at most for a member's leave


class CohortLeaves(Callback):
    """Tells the sweep's cohort router when Tune ends a trial (ASHA's stop, the time budget, its last epoch),
    so a fused member leaves its cohort at once instead of after the servers' grace
    (:data:`~medsweep.search.cohorts.LEAVE_GRACE_S`). The router is looked up by name at each event: a
    resumed driver unpickles this callback from ``tuner.pkl`` and must reach that driver's new router. It waits
    for the leave (milliseconds), so the cohorts the sweep records at its end show every member Tune ended."""

    def __init__(self, router: str) -> None:
        self.router = router

    def on_trial_complete(self, iteration, trials, trial, **info):
        try:
            router = ray.get_actor(self.router)
        except ValueError:  # no router (the sweep is ending): nothing waits on this member
            return
        with contextlib.suppress(ray.exceptions.RayError):  # a router restarting: the grace drops the member
            ray.get(router.leave.remote(trial.trial_id), timeout=LEAVE_TIMEOUT_S)


class _WandbRunLogger(_WandbLoggingActor):
    """Ray's per-trial W&B logging actor, which also removes the two temporary folders ``import wandb`` makes in
    each process (for media and artifacts): Ray kills the actor once its run has finished, so their cleanup at
    interpreter exit never runs, and every trial left two folders in /tmp (thousands on a long sweep's node).

    Ray records the folder it runs in as the run's ``trial_log_path``: its driver's staging folder under Ray's
    session directory, gone with the session. The run records the trial's folder in the sweep instead
    (``DIR/ray/tune/trial-*``: its ``progress.csv``, ``result.json`` and checkpoints), passed as ``trial_dir``."""

    def __init__(self, *args: Any, trial_dir: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._logdir = trial_dir

    def run(self) -> None:
        try:
            super().run()
        finally:
            _remove_wandb_temp_folders()


def _remove_wandb_temp_folders() -> None:
    media, artifacts = sys.modules.get("wandb.sdk.data_types._private"), sys.modules.get("wandb.sdk.artifacts.artifact")
    for folder in (getattr(media, "MEDIA_TMP", None), getattr(getattr(artifacts, "Artifact", None), "_TMP_DIR", None)):
        if isinstance(folder, tempfile.TemporaryDirectory):  # absent from another W&B version: nothing to remove
            folder.cleanup()


class SweepWandbCallback(WandbLoggerCallback):
    """One W&B run per trial, tagged with the dataset and the trial's method, named ``<method>-<trial id>``, its
    config the flat config the trial ran with (``lr``, not the ``fpt_plus.lr`` a sweep of several methods samples:
    one column per hyperparameter across methods in W&B's tables and charts).

    Ray's callback takes one fixed set of ``wandb.init`` arguments for every
    trial; ``log_trial_start`` is where a trial's run is opened, so the
    per-trial tags are set there (the base class merges ``self.kwargs`` last).
    Each run ends with ``wandb.finish`` when its trial ends, which writes the
    run's summary (last value of every metric, ``best_val_auc`` included).
    """

    _logger_actor_cls = _WandbRunLogger

    def __init__(self, dataset: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dataset = dataset
        self._unsent: dict[Any, list[tuple[_QueueItem, dict]]] = {}  # trial -> results not yet sent, in order
        self._sending: dict[Any, ray.ObjectRef] = {}  # trial -> its queue actor's reply to the last batch sent
        self._ending: set[Any] = set()  # trials whose run was told to finish

    def log_trial_start(self, trial) -> None:
        method = trial.config.get("method", "unknown")
        run = {"tags": [self.dataset, method], "name": f"{method}-{trial.trial_id}", "config": trial_config(trial.config)}
        self.kwargs = {**self.kwargs, **run, "trial_dir": trial.path}  # trial_dir: the logger's, not wandb.init's
        self._ending.discard(trial)  # a trial restarted after a failure opens its run again
        super().log_trial_start(trial)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        """The base class's, without waiting on the trial's queue actor.

        Ray's ``Queue.put`` waits for the queue actor's reply, and a trial's first result waits for that actor's
        process to start: on 2 busy cores 1-3 s per trial, during which Tune's driver loop stood still (it warned
        "callbacks.on_trial_result took 2.4 s" for member after member of a fused sweep). Sent without waiting,
        results could arrive out of order (Ray keeps no order for an async actor's calls) and W&B drops a step
        lower than one it logged. So a trial's results are sent in batches, each once the previous one has
        landed (:meth:`_send`), and the trial's end waits for all of them."""
        if trial not in self._trial_logging_actors:
            self.log_trial_start(trial)
        cleaned = _clean_log(result, video_kwargs=self.video_kwargs, image_kwargs=self.image_kwargs)
        if "config" in cleaned:  # Tune adds the sampled config to every result; the logger updates the run's with it
            cleaned["config"] = trial_config(trial.config)
        self._unsent.setdefault(trial, []).append((_QueueItem.RESULT, cleaned))
        self._send(trial, wait=False)

    def _send(self, trial, wait: bool) -> None:
        """Hand the trial's unsent results to its queue actor in one call, once its previous call has landed
        (``wait``: wait for it; else, if it has not, leave them for the next result or the trial's end)."""
        sending = self._sending.pop(trial, None)
        if sending is not None:
            if wait:
                ray.get(sending)
            elif not ray.wait([sending], timeout=0)[0]:
                self._sending[trial] = sending
                return
        if items := self._unsent.pop(trial, []):
            queue: Any = self._trial_queues[trial].actor
            self._sending[trial] = queue.put_nowait_batch.remote(items)

    def _signal_logging_actor_stop(self, trial) -> None:
        self._send(trial, wait=True)
        if (sending := self._sending.pop(trial, None)) is not None:
            ray.get(sending)
        super()._signal_logging_actor_stop(trial)
        self._ending.add(trial)

    def on_experiment_end(self, trials, **info) -> None:
        """Finish the runs of trials that never ended, then Ray's wait for every run's ``wandb.finish``.

        A sweep's interrupt (Ctrl-C, SIGTERM) stops its running trials to resume them later, which is no trial
        end for Tune, so their runs were still open here: Ray's callback waited its whole ``upload_timeout``
        (60 s after every Ctrl-C) for runs nobody had told to finish, then killed their actors mid-run (and
        Ray printed the kill). Each open run is finished now with the results it has (``medsweep resume``
        continues it, ``resume="allow"``), so the wait is as long as ``wandb.finish`` takes."""
        for trial in [trial for trial in self._trial_logging_actors if trial not in self._ending]:
            self._signal_logging_actor_stop(trial)
        super().on_experiment_end(trials, **info)


class SweepSearch(OptunaSearch):
    """OptunaSearch that records a trial ending without a finite metric (a diverged trial) as FAIL.

    Optuna refuses a NaN value in ``tell`` and Ray only logs the refusal, which
    leaves the trial RUNNING in the study for ever (the dashboard shows it
    running, the sampler treats it as pending). With several objectives
    (``metric`` a list) one non-finite value is enough.

    With cohorts it hands a fused method's trials out in runs that share their shape keys (``pins``,
    :mod:`medsweep.search.cohort_pins`), so its members fuse into full cohorts.
    """

    pins: CohortPins | None = None  # set by build_searcher when a method fuses; saved and restored with the searcher

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.pins is None or trial_id in self._ot_trials:
            return super().suggest(trial_id)
        fixed, study = self.pins.fixed_params(), self._ot_study
        assert study is not None  # set up by the constructor (a space was given)
        if fixed and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            study.enqueue_trial(fixed)  # the next ask() takes it: these values fixed, the rest sampled
        config = super().suggest(trial_id)
        self.pins.record(self._ot_trials[trial_id].params)
        return config

    def save(self, checkpoint_path: str) -> None:
        """OptunaSearch's save, written atomically: a temporary file renamed over the old one.

        Tune rewrites this file in its staging folder at every experiment snapshot, and OptunaSearch
        writes it in place, while the copy of the previous snapshot to the sweep's folder may still be
        reading it. A truncated pickle there makes Tune's restore fail ("Ran out of input") and restart
        the whole experiment, forgetting every finished trial. The copy itself writes whole files
        (:mod:`medsweep.search.atomic_storage`)."""
        partial = f"{checkpoint_path}.partial"
        super().save(partial)
        os.replace(partial, checkpoint_path)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        """Tell the study the trial's value (a non-finite one as FAIL); a trial the study holds as finished already
        (the rerun of a trial whose end a killed driver told, see :meth:`on_trial_result`) keeps the value it has,
        where OptunaSearch logged Optuna's refusal ("Cannot tell a COMPLETE trial") on the resumed sweep's console."""
        asked = self._ot_trials.get(trial_id)
        if asked is not None and trial_id not in self._completed_trials and self._told_already(asked.number):
            self._completed_trials.add(trial_id)
            return
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if result is not None and not all(_finite(result.get(m)) for m in metrics):
            result, error = None, True
        super().on_trial_complete(trial_id, result=result, error=error)

    def _told_already(self, number: int) -> bool:
        assert self._ot_study is not None  # set up by the constructor (a space was given)
        return self._ot_study.get_trials(deepcopy=False)[number].state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Skip the intermediate value of an Optuna trial already finished in the study.

        A driver killed (SIGKILL, a second Ctrl-C) after a trial's end was told
        to the study but before Tune's next snapshot restores that trial as
        unfinished; its rerun's reports would raise ``UpdateFinishedTrialError``
        and end the resumed sweep. The study keeps the value it was told.

        A trial resumed from a checkpoint older than its last report (an interrupt between the two) reports
        that epoch again; Optuna keeps the first value and warned of the second on the console."""
        with contextlib.suppress(UpdateFinishedTrialError), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The reported value is ignored because this `step=", category=UserWarning)
            super().on_trial_result(trial_id, result)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


@dataclass
class SharedData:
    """The sweep's materialized stores and the GPU fraction a trial of each method reserves."""

    stores: dict[str, StoreData]
    gpus: dict[str, float]
    step_bytes: dict[str, int] = field(default_factory=dict)  # each probed method's step memory (GPU sizing)
    gpu_bytes: int = 0  # the smallest GPU's memory, when probed


def share_data(
    settings: SweepSettings,
    stores: dict[str, PreloadResult],
    console: SweepConsole,
    spec: DatasetSpec | None = None,
) -> SharedData:
    """Share every method's store once (materialized, or streamed when too large); decide each
    method's GPU fraction (:func:`gpu_plan`; ``spec`` is loaded only if a probe needs it)."""
    shared = share_stores(stores.values())
    console.data_ready({key: why for key, (_, why) in shared.items()})
    gpus, step_bytes, gpu_bytes = gpu_plan(settings, spec, console)
    return SharedData({key: data for key, (data, _) in shared.items()}, gpus, step_bytes, gpu_bytes)


def build_trainable(settings: SweepSettings, shared: SharedData, cohorts: Cohorts | None = None):
    """``run_trial`` bound to the shared datasets, reserving each trial's CPU and GPU fraction; with
    ``cohorts``, trials of its fused methods are members of cohorts instead (:mod:`medsweep.search.cohorts`)."""
    out = Path(settings.out).resolve()
    if cohorts is None:
        return tune.with_resources(
            tune.with_parameters(run_trial, stores=shared.stores, storage_path=str(out / TRAIN_DIR)),
            trial_resources(settings, shared.gpus),
        )
    if set(cohorts.sizes) == set(settings.methods):  # every trial a member: clients that never load the stores (nor torch)
        trainable = tune.with_parameters(run_member, cohorts=cohorts)
    else:
        trainable = tune.with_parameters(run_trial_or_member, stores=shared.stores, storage_path=str(out / TRAIN_DIR), cohorts=cohorts)
    return tune.with_resources(trainable, trial_resources(settings, shared.gpus, cohorts))


@contextlib.contextmanager
def sweep_cohorts(settings: SweepSettings, shared: SharedData, stores: dict[str, PreloadResult], console: SweepConsole) -> Iterator[Cohorts | None]:
    """The sweep's cohort servers (yields :class:`Cohorts`, or None when every trial runs alone), with a console
    line on how the fusable methods' trials run, and at the end one on the cohorts trained."""
    sizes = cohort_sizes(settings, shared, stores)
    gpus = max((shared.gpus[method] for method in sizes), default=0.0)
    with cohort_servers(settings, shared.stores, sizes, concurrent_slots(settings), gpus) as cohorts:
        if cohorts is not None:
            fused = ", ".join(f"{method} up to {size}" for method, size in cohorts.sizes.items())
            console.console.print(
                f"[bold]cohorts[/] members per cohort: {fused}, on {len(cohorts.servers)} cohort server(s); a method's "
                "trials come in runs that share their shape keys (--cohort-size 1: each trial alone)"
            )
        elif off := cohorts_off(settings, list(sizes), gpus):
            console.console.print(f"[bold]cohorts[/] off: {off}")
        yield cohorts
    if cohorts is not None and cohorts.ran:
        console.console.print(f"[bold]cohorts[/] {len(cohorts.ran)} trained: {cohorts_trained(cohorts.ran)} ({RAY_DIR}/{COHORTS_FILE})")


def cohorts_trained(ran: list[dict[str, Any]]) -> str:
    """The cohorts a sweep trained, as "linear of 3 members, fpt_plus of 2": what the sweep's end line says."""
    return ", ".join(f"{cohort['method']} of {len(cohort['trials'])} member{'s' if len(cohort['trials']) != 1 else ''}" for cohort in ran)


def cohorts_off(settings: SweepSettings, fusable: list[str], gpus: float) -> str | None:
    """Why a sweep without cohort servers trains each trial alone, for the console: its ``fusable`` methods could
    fuse but for the sizing, or ``--cohort-size`` asked for cohorts that no trial can join; None when nothing
    was asked and nothing could fuse (``--cohort-size 1``, or only methods that train on images)."""
    if fusable:
        if settings.cohort_size:
            why = f"--trials {settings.trials} leaves each cohort server fewer than 2 trials"
        elif gpus:
            why = "its GPU fraction holds one member's probed step (--cohort-size K trains K together)"
        else:
            why = "on CPUs that is the faster (BENCHMARKS.md figures 11 and 11b); --cohort-size K trains K together"
        return f"each trial of {', '.join(fusable)} runs alone; {why}"
    if settings.cohort_size and settings.cohort_size > 1:
        why = (
            "with --no-preload every trial runs its frozen backbone itself"
            if not settings.preload_features
            else f"{', '.join(settings.methods)} {'trains' if len(settings.methods) == 1 else 'train'} on images, not on preloaded features"
        )
        return f"--cohort-size {settings.cohort_size} is not used: {why}, so each trial runs alone"
    return None


def points_to_enqueue(storage: JournalStorage, points: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The recommended points still to enqueue: all of them into an empty study; none into a study
    that holds trials of its own (they were enqueued when it began); into a study holding only
    trials warm-started from an earlier sweep (:mod:`medsweep.search.warm`), those it did not run."""
    try:
        study_id = storage.get_study_id_from_name(STUDY_NAME)
    except KeyError:
        return points
    trials = storage.get_all_trials(study_id, deepcopy=False)
    if any(WARM_START_ATTR not in trial.user_attrs for trial in trials):
        return None
    return [point for point in points if all(trial.params != point for trial in trials)] or None


# Optuna's TPE samples at random until this many trials have completed (its default).
TPE_STARTUP_TRIALS = 10


def tpe_startup_trials(trials: int | None, recommended: int) -> int:
    """Completed trials before TPE models the results: a quarter of the sweep, at most Optuna's 10.

    Optuna's default of 10 random trials is sized for long studies: with the
    default 8-trial sweep TPE would never run (two recommended points, then six
    random draws). The recommended points count as completed trials, so a
    short sweep starts modelling from them at once. A time-bounded sweep
    (no trial count) keeps the default.
    """
    if trials is None:
        return TPE_STARTUP_TRIALS
    return max(recommended, min(TPE_STARTUP_TRIALS, trials // 4))


def build_searcher(
    settings: SweepSettings,
    spec: DatasetSpec,
    stores: dict[str, PreloadResult],
    shared: SharedData,
    sampler_seed: int | None = None,
    cohort_sizes: dict[str, int] | None = None,
) -> SweepSearch:
    """Seeded TPE (or random) over the methods' spaces, on the sweep's study file.

    One objective (``--objective auc``): :data:`METRIC`, the best-epoch
    validation AUC of the trial's last result, maximised (the leaderboard's
    ranking column, so the study and the board hold the same number). Several: a multi-objective study over the ``OBJECTIVES``
    columns (``best_val_auc`` maximised, ``peak_mem_mb`` / ``learnable_params``
    minimised; Optuna's TPESampler and RandomSampler both handle several
    directions), told the values of each trial's last result, which are the
    leaderboard's columns, so ``study.best_trials`` is the exported Pareto front once collapsed trials
    (told like any other, never selected) are left out.

    ``sampler_seed`` (default ``--seed``): ``medsweep extend`` seeds each extension differently, so
    its sampler does not replay the draws the sweep's own sampler made.

    The recommended points are enqueued only into an empty study (:func:`points_to_enqueue`): OptunaSearch
    enqueues its ``points_to_evaluate`` every time it is built, and a study
    that already holds trials (a sweep interrupted before Tune saved any
    state, started again by ``medsweep resume``) still has the first copies
    waiting in its journal, which ``ask()`` hands out first.

    ``cohort_sizes`` (fused method -> members per cohort): trials of those methods come in runs sharing
    their shape keys (:class:`~medsweep.search.cohort_pins.CohortPins`).
    """
    fixed = {
        method: {
            **fixed_config(settings, spec, method),
            "store_key": stores[method].store.key,
            "gpus_per_trial": shared.gpus[method],
        }
        for method in settings.methods
    }
    space, points = build_search(settings.methods, fixed, dataset=spec.name, ranges=settings.search_ranges)
    storage = study_storage(settings.out)
    seed = settings.seed if sampler_seed is None else sampler_seed
    metric: str | list[str]
    mode: str | list[str]
    if settings.multi_objective:
        metric, mode = [c for c, _ in settings.objective_columns()], [d for _, d in settings.objective_columns()]
    else:
        metric, mode = METRIC, "max"
    searcher = SweepSearch(
        space=space,
        metric=metric,
        mode=mode,
        points_to_evaluate=points_to_enqueue(storage, points),
        sampler=(
            TPESampler(seed=seed, n_startup_trials=tpe_startup_trials(settings.trials, len(points)))
            if settings.search == "tpe"
            else RandomSampler(seed=seed)
        ),
        study_name=STUDY_NAME,
        storage=storage,
    )
    searcher.pins = cohort_pins(settings.methods, cohort_sizes or {})
    return searcher


def cohort_pins(methods: list[str], cohort_sizes: dict[str, int]) -> CohortPins | None:
    """The searcher's pins for a sweep of ``methods`` whose fused ones have ``cohort_sizes`` (None: none fuses)."""
    fused = {method: size for method, size in cohort_sizes.items() if size > 1}
    if not fused:
        return None
    single = methods[0] if len(methods) == 1 else None  # a one-method space's params carry no prefix
    return CohortPins(fused, {method: shape_keys(method) for method in fused}, single)


def build_scheduler(settings: SweepSettings) -> ASHAScheduler | None:
    """ASHA on the loop's own ``epoch`` (Tune's iteration counter restarts when a trial is restored).

    Always on :data:`METRIC` (best validation AUC so far), with its own ``metric``/``mode``, also in a
    multi-objective sweep (ASHA ranks trials on one metric): ``TuneConfig``
    is given neither, so Tune leaves the searcher's list and the scheduler's
    metric as they are (it refuses only a ``TuneConfig`` metric that conflicts).
    """
    if not settings.early_stopping:
        return None
    return ASHAScheduler(
        time_attr="epoch",
        metric=METRIC,
        mode="max",
        max_t=settings.max_epochs,
        grace_period=min(settings.grace_period, settings.max_epochs),
        reduction_factor=2,
    )


def build_callbacks(settings: SweepSettings, spec: DatasetSpec, console: SweepConsole, cohorts: Cohorts | None = None) -> list[Callback]:
    """Console lines per trial event, curves kept whole across a trial's restart (:class:`CurvesSurviveRestarts`),
    and one run per trial in ``--tracker``: W&B (under ``<out>/wandb``,
    unless ``--wandb disabled``), MLflow (:mod:`medsweep.search.tracking`) or none; with ``cohorts``,
    :class:`CohortLeaves`."""
    out = Path(settings.out).resolve()
    total = settings.trials  # None: no total (time budget)
    callbacks: list[Callback] = [ConsoleCallback(console, total), CurvesSurviveRestarts()]
    if cohorts is not None:
        callbacks.append(CohortLeaves(router_name(out)))
    if settings.tracker == "mlflow":
        callbacks.append(SweepMlflowCallback(dataset=spec.name, tracking_uri=mlflow_uri(out), experiment_name=mlflow_experiment(out)))
    mode = wandb_mode(settings.wandb)
    if settings.tracker == "wandb" and mode != "disabled":
        callbacks.append(
            SweepWandbCallback(
                dataset=spec.name,
                project=WANDB_PROJECT,
                group=out.name,
                mode=mode,
                dir=str(out),  # W&B writes its runs under <dir>/wandb/
                upload_timeout=60,  # Ray's default waits 30 min at the end for runs that cannot upload
                excludes=["status"],
                resume="allow",  # a trial restored by `medsweep resume` continues its W&B run (same id)
            )
        )
    return callbacks


def run_tuner(
    settings: SweepSettings,
    spec: DatasetSpec,
    stores: dict[str, PreloadResult],
    console: SweepConsole,
    name: str | None = None,
    sampler_seed: int | None = None,
) -> tune.ResultGrid:
    """A fresh search: recommended points first, then the sampler; ``--trials`` trials in all, or,
    with ``--budget-hours``, until the time budget ends (Tune's ``time_budget_s``; without
    ``--trials`` the number of samples is unbounded, ``num_samples=-1``). When the budget ends,
    running trials are stopped and kept with what they reported.

    ``name``: the experiment's folder under ``<out>/ray`` (default ``tune``, the one ``medsweep
    resume`` restores; ``medsweep extend`` runs each extension in its own); ``sampler_seed``: see
    :func:`build_searcher`."""
    shared = share_data(settings, stores, console, spec)
    with sweep_cohorts(settings, shared, stores, console) as cohorts:
        tuner = Tuner(
            build_trainable(settings, shared, cohorts),
            tune_config=TuneConfig(
                search_alg=build_searcher(settings, spec, stores, shared, sampler_seed, cohorts.sizes if cohorts else None),
                scheduler=build_scheduler(settings),
                num_samples=settings.trials if settings.trials is not None else -1,
                time_budget_s=settings.budget_hours * 3600 if settings.budget_hours else None,
                trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
                reuse_actors=True,  # see trials_pending_at_once
                max_concurrent_trials=cohorts.max_concurrent_trials if cohorts else None,  # members wait in a cohort, not in Tune's queue
            ),
            run_config=RunConfig(
                name=name or experiment_dir(settings.out).name,
                storage_path=str(experiment_dir(settings.out).parent),
                storage_filesystem=atomic_local_filesystem(),  # a killed driver leaves no half-written snapshot
                callbacks=build_callbacks(settings, spec, console, cohorts),
                failure_config=FailureConfig(max_failures=2),
                # Two, not one: Tune deletes the checkpoint beyond num_to_keep as it registers a new one and
                # only then rewrites its experiment snapshot, so a driver killed in between left a snapshot
                # naming a deleted checkpoint, and `medsweep resume` failed that trial ("does not exist on
                # storage anymore", seen in tests/test_faults.py). The snapshot's checkpoint now survives.
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                verbose=0,
            ),
        )
        return _fit(settings, console, cohorts, tuner)


def _fit(settings: SweepSettings, console: SweepConsole, cohorts: Cohorts | None, tuner: Tuner) -> tune.ResultGrid:
    """Run a built or restored Tuner, as many trials pending at once as there are trial slots, under the live table,
    each experiment snapshot copied whole from a staging folder no snapshot rewrites meanwhile."""
    snapshots_wait_for_their_copy()
    with trials_pending_at_once(settings), console.live_trials(total=settings.trials), unreported_trials_unlogged():
        return tuner.fit()


def unreported_trials_unlogged() -> contextlib.AbstractContextManager[None]:
    """Tune's reading of an experiment's results (its result grid, a restore) without its warning for each trial that
    reported nothing: one pending or starting when ``--budget-hours`` ended the search or the driver stopped. The
    sweep says what became of those itself (the study's never-run trials marked FAIL; a resume continues them)."""
    return dropping(logging.getLogger("ray.tune.analysis.experiment_analysis"), "Failed to fetch metrics")


def earlier_stores(out: Path, stores: dict[str, PreloadResult], data: dict[str, StoreData]) -> dict[str, StoreData]:
    """The stores the sweep's earlier runs read, by their keys, as this run's store of the same method: a trial
    restored with an earlier key (the dataset's files changed since: ``medsweep.search.manifest.check_same_dataset``)
    reads the store rebuilt from them."""
    return {key: data[stores[method].store.key] for key, method in store_keys_used(out).items() if method in stores and key not in data}


def can_resume(settings: SweepSettings) -> bool:
    """Whether Tune saved the sweep's experiment: its ``tuner.pkl`` (written when the Tuner is built)
    and an experiment snapshot (written once the search runs). Either is missing if the driver died
    before the search started."""
    path = experiment_dir(settings.out)
    return Tuner.can_restore(str(path)) and any(path.glob("experiment_state-*.json"))


def resume_tuner(
    settings: SweepSettings,
    stores: dict[str, PreloadResult],
    console: SweepConsole,
) -> tune.ResultGrid:
    """Continue the saved search: finished trials are kept as they are, unfinished and errored
    ones continue from their last checkpoint, and new trials are suggested until the sweep
    holds ``num_samples`` (the restored searcher keeps its counter).

    A ``--budget-hours`` sweep is restored with its saved ``TuneConfig`` (``tuner.pkl``), so
    ``time_budget_s`` is honoured, but Tune does not save the time already spent (its
    ``TimeoutStopper`` is built afresh from ``time_budget_s`` by every ``fit``): a resumed
    sweep gets the whole budget again, counted from the resume."""
    shared = share_data(settings, stores, console)
    shared.stores.update(earlier_stores(settings.out, stores, shared.stores))
    with sweep_cohorts(settings, shared, stores, console) as cohorts:
        with unreported_trials_unlogged():
            tuner = Tuner.restore(
                str(experiment_dir(settings.out)),
                trainable=build_trainable(settings, shared, cohorts),
                resume_unfinished=True,
                resume_errored=True,
                storage_filesystem=atomic_local_filesystem(),
            )
        return _fit(settings, console, cohorts, tuner)
