"""Run a sweep: preload once, share the data, search with Optuna TPE + ASHA, export the answer.

Steps (each a function below, called in order by :func:`run_sweep`):

1. resolve the dataset and check every setting before anything starts: the
   settings' bounds, the dataset's layout, each method built once from its
   fixed values without weights (backbone, image size against its patch size,
   every ``--set`` value; :func:`check_methods`), and, by the CLI, ``--out``
   (:func:`check_out`);
2. start or join Ray (a bounded wait for ``--address``), with SIGINT and
   SIGTERM held by :class:`medsweep.search.interrupts.InterruptGuard`; only
   then is ``--out`` created and ``sweep.json`` written (:func:`prepare_out`);
3. preload each method's store (reused when its cache key matches) and
   materialize its train/val splits with Ray Data once, so every trial gets
   the same blocks and no read task competes with trials for CPUs (the
   deadlock measured on 2 cores when reads stay lazy);
4. ``Tuner`` over :func:`medsweep.search.trial.run_trial` with ``OptunaSearch``
   (seeded TPE, recommended points first, a file-backed study; one objective,
   or several with ``--objective auc,memory,params``) and ``ASHAScheduler`` on
   validation AUC by epoch; ``--trials`` trials and/or until ``--budget-hours``;
   each trial reserves its CPU and its method's GPU fraction (``auto``: sized
   from a probe of the method's step memory); W&B logs every trial from the driver;
5. leaderboard, ``best.yaml`` and, with several objectives, the Pareto front
   ``pareto.csv`` (:mod:`medsweep.search.export`).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

from medsweep.datasets import load_dataset
from medsweep.datasets.images import check_image_headers
from medsweep.datasets.spec import DatasetSpec
from medsweep.errors import ConfigError
from medsweep.search.console import SweepConsole
from medsweep.search.interrupts import InterruptGuard
from medsweep.trainables.config import TrainConfig
from medsweep.trainables.methods import build_method, get_method
from medsweep.trainables.preload import check_precision

DEFAULT_METHODS = ("fpt_plus", "linear")
DEFAULT_TRIALS = 8
DEMO_BACKBONE = "vit-small-demo"
# The demo backbone is 64 wide, 12x narrower than ViT-B: the official side
# reduction of 8 would leave an 8-wide side network that barely trains in a few
# epochs; 2 keeps it 32 wide. Applied only to the demo backbone, only if unset.
DEMO_FIXED = {"side_reduction": 2}
STUDY_NAME = "medsweep"
STUDY_FILE = "optuna-study.log"
# --objective name -> (result / leaderboard column, direction). The loop reports all three in every
# result, under the same names as the leaderboard's columns, so the study's values are the board's.
OBJECTIVES = {"auc": ("best_val_auc", "max"), "memory": ("peak_mem_mb", "min"), "params": ("learnable_params", "min")}
# Largest --image-size accepted: 4096 px is beyond every published recipe (512 px), while a typo such as
# 100000 would ask a ViT for ~40 GB of position embeddings before anything else failed.
MAX_IMAGE_SIZE = 4096
MIN_IMAGE_SIZE = 8
# What a sweep writes into its --out folder; --overwrite deletes these (and only these) first.
SWEEP_OUTPUTS = (
    "sweep.json", STUDY_FILE, "leaderboard.csv", "leaderboard.parquet", "best.yaml", "pareto.csv",
    "final.yaml", "final.json", "final", "report", "ray", "train", "wandb",
)  # fmt: skip


@dataclass
class SweepSettings:
    """Everything a sweep needs; saved as ``sweep.json`` in its output folder.

    ``trials=None`` is an unbounded search, ended by ``budget_hours`` (Tune's
    ``time_budget_s``); with both, whichever comes first. ``gpus_per_trial=None``
    is ``auto`` (each method's fraction sized from its probed memory, see
    :func:`medsweep.search.tuning.gpu_fraction`). ``objective`` lists the
    ``OBJECTIVES`` the study optimises; more than one makes it multi-objective.
    """

    dataset: str = "synthetic"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    trials: int | None = DEFAULT_TRIALS
    max_epochs: int = 6
    backbone: str = DEMO_BACKBONE
    image_size: int = 128
    gpus_per_trial: float | None = None
    cpus_per_trial: float = 1.0
    workers: int = 1
    wandb: str = "auto"
    seed: int = 0
    out: Path | None = None
    cache_dir: Path = Path(".medsweep-cache")
    address: str | None = None
    grace_period: int = 2
    fraction: float | None = None
    preload_features: bool = True
    final_seeds: int = 0
    skip_bad_images: bool = False
    search: str = "tpe"
    early_stopping: bool = True
    fixed: dict[str, Any] = field(default_factory=dict)
    objective: list[str] = field(default_factory=lambda: ["auc"])
    budget_hours: float | None = None
    connect_timeout: float = 45.0
    precision: str = "auto"
    preload_batch_size: int | None = None  # None: probed on each frozen-pass actor's device

    def __post_init__(self) -> None:
        self.out = Path(self.out) if self.out else Path("sweeps") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        # Absolute in sweep.json, so `medsweep resume DIR` finds the data and stores from any directory.
        self.cache_dir = Path(self.cache_dir).resolve()
        if self.dataset != "synthetic" and Path(self.dataset).exists():
            self.dataset = str(Path(self.dataset).resolve())
        if self.trials is not None and self.trials < 1:
            raise ConfigError(f"--trials must be at least 1, got {self.trials}")
        if self.budget_hours is not None and not (0 < self.budget_hours < math.inf):
            raise ConfigError(f"--budget-hours must be a number of hours > 0 (e.g. 0.5), got {self.budget_hours}")
        if self.trials is None and self.budget_hours is None:
            raise ConfigError("give --trials N or --budget-hours H (or both): an unbounded search needs a time budget")
        if isinstance(self.objective, str):
            self.objective = [part.strip() for part in self.objective.split(",") if part.strip()]
        self.objective = list(self.objective)
        unknown_objectives = [name for name in self.objective if name not in OBJECTIVES]
        if unknown_objectives or not self.objective:
            raise ConfigError(
                f"--objective takes a comma-separated list of {', '.join(OBJECTIVES)} (e.g. auc,memory), got {','.join(self.objective)!r}"
            )
        if len(set(self.objective)) != len(self.objective) or "auc" not in self.objective:
            raise ConfigError(f"--objective must name auc once, with memory and/or params at most once each (e.g. auc,memory), got {','.join(self.objective)!r}")
        if self.max_epochs < 1:
            raise ConfigError(f"--max-epochs must be at least 1, got {self.max_epochs}")
        if not self.methods:
            raise ConfigError("give at least one --method")
        for method in self.methods:
            get_method(method)  # unknown name -> ConfigError listing the known ones
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"--method given twice: {self.methods}")
        if self.gpus_per_trial is not None and self.gpus_per_trial < 0:
            raise ConfigError(f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial}")
        if self.cpus_per_trial <= 0:
            raise ConfigError(f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.wandb not in ("auto", "online", "offline", "disabled"):
            raise ConfigError(f"--wandb must be online, offline, disabled or auto, got {self.wandb!r}")
        if self.final_seeds < 0:
            raise ConfigError(f"--final-seeds must be >= 0 (0 skips the final retrain), got {self.final_seeds}")
        if self.search not in ("tpe", "random"):
            raise ConfigError(f"--search must be tpe or random, got {self.search!r}")
        if self.fraction is not None and not 0 < self.fraction <= 100:
            raise ConfigError(f"--fraction is a percentage of the training set in (0, 100], got {self.fraction}")
        unknown = [key for key in self.fixed if not any(key in _settable_keys(m) for m in self.methods)]
        if unknown:
            raise ConfigError(
                f"--set {unknown[0]}: no selected method ({', '.join(self.methods)}) has this setting; "
                f"see `medsweep spaces show METHOD` for each method's keys"
            )
        if self.grace_period < 1:
            raise ConfigError(f"--grace-period must be at least 1, got {self.grace_period}")
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(f"--image-size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels, got {self.image_size}")
        check_precision(self.precision)
        if self.preload_batch_size is not None and self.preload_batch_size < 1:
            raise ConfigError(f"--preload-batch-size must be at least 1, got {self.preload_batch_size}")
        if not 0 < self.connect_timeout < math.inf:
            raise ConfigError(f"--connect-timeout must be a number of seconds > 0 (e.g. 45), got {self.connect_timeout}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    @property
    def multi_objective(self) -> bool:
        return len(self.objective) > 1

    def objective_columns(self) -> list[tuple[str, str]]:
        """(result / leaderboard column, ``max`` or ``min``) of each objective, in ``--objective`` order."""
        return [OBJECTIVES[name] for name in self.objective]


def _settable_keys(method: str) -> set[str]:
    """Keys a ``--set`` may fix for ``method``: its config fields and the training fields."""
    return get_method(method).config_cls.field_names() | set(TrainConfig.__dataclass_fields__)


def fixed_config(settings: SweepSettings, spec: DatasetSpec, method: str) -> dict[str, Any]:
    """Values a trial does not search: data shape, backbone, budget, resources, ``--set`` values.

    A side network's input size is derived from the frozen input size (FPT+:
    a quarter) rather than taken from the published 512 px recipe's 128 px.
    """
    keys = _settable_keys(method)
    derived = {"side_image_size": 0} if "side_image_size" in keys else {}
    if "stage1_epochs" in keys:  # the published stage lengths (25-100 epochs) exceed a sweep's budget
        derived["stage1_epochs"] = max(1, settings.max_epochs // 2)
    demo = DEMO_FIXED if settings.backbone == DEMO_BACKBONE else {}
    user = {k: v for k, v in {**demo, **settings.fixed}.items() if k in keys}
    return {
        **derived,
        "method": method,
        "backbone": settings.backbone,
        "image_size": settings.image_size,
        "num_classes": spec.num_classes,
        "task": spec.task,
        "epochs": settings.max_epochs,
        "seed": settings.seed,
        "workers": settings.workers if method == "full" else 1,
        "cpus_per_trial": settings.cpus_per_trial,
        **user,
    }


def wandb_mode(requested: str) -> str:
    """``auto``: online only with an API key (never hang waiting for a network), else offline files."""
    if requested != "auto":
        return requested
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def prepare_stores(
    settings: SweepSettings,
    spec: DatasetSpec,
    console: SweepConsole,
) -> dict[str, Any]:
    """Preload (or reuse) one store per method, the frozen pass on the cluster; returns {method: PreloadResult}."""
    from medsweep.search.frozen_pass import preload_on_cluster  # Ray Data: only once a sweep really starts

    results = {}
    for method_name in settings.methods:
        result = preload_on_cluster(
            spec,
            fixed_config(settings, spec, method_name),
            settings.cache_dir,
            batch_size=settings.preload_batch_size,
            precision=settings.precision,
            progress=console.progress,
            with_features=settings.preload_features,
            skip_bad_images=settings.skip_bad_images,
            on_wait=console.preload_waiting,
        )
        console.store_ready(method_name, result)
        results[method_name] = result
    return results


def sweep_dataset(settings: SweepSettings) -> DatasetSpec:
    """The sweep's dataset with its fixed split (loaded the same way by ``medsweep resume``)."""
    return load_dataset(
        settings.dataset,
        cache_dir=settings.cache_dir,
        seed=settings.seed,
        fraction=settings.fraction / 100 if settings.fraction is not None else None,  # percent on the CLI
        synthetic_size=settings.image_size,
    )


def check_methods(settings: SweepSettings, spec: DatasetSpec) -> None:
    """Build each method once from its fixed values, as its trials will, before Ray starts.

    An unknown backbone, a method that does not fit the backbone, an image size
    below the backbone's patch size, or a ``--set`` value out of the method's or
    the training config's bounds would otherwise surface only during the
    preload, after Ray's 20-50 s start. Everything is built on the meta device:
    shapes and checks, no weights (CDTM's token-mixing matrices at 512 px would
    be gigabytes).
    """
    import torch

    from medsweep.trainables.backbones import build_backbone, frozen_weights_unused

    with torch.device("meta"), frozen_weights_unused():
        backbone = build_backbone(settings.backbone, settings.image_size, settings.seed)
        patch = getattr(backbone.config, "patch_size", None)
        if isinstance(patch, int) and settings.image_size < patch:
            raise ConfigError(
                f"--image-size {settings.image_size} is smaller than one patch of {settings.backbone} ({patch} px); "
                f"pass at least {patch} (a multiple of {patch})"
            )
        for method in settings.methods:
            config = fixed_config(settings, spec, method)
            TrainConfig.from_dict(config)
            build_method(method, config)


def check_out(out: Path, overwrite: bool = False) -> None:
    """Refuse an ``--out`` that would mix two sweeps or someone's files; writes nothing.

    A folder holding a sweep (its ``sweep.json`` or study) is continued with
    ``medsweep resume``: a second sweep there mixed the two studies. Anything
    else found there was not written by medsweep. ``overwrite`` accepts both
    (:func:`prepare_out` then deletes the previous sweep's files).
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; pass a new or empty folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries or overwrite:
        return
    if any(name in entries for name in ("sweep.json", STUDY_FILE)):
        raise ConfigError(
            f"--out {out} already holds a sweep; continue it with `medsweep resume {out}`, "
            "or pass another folder (or --overwrite to replace it)"
        )
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise ConfigError(
        f"--out {out} holds files medsweep did not write ({shown}); pass a new or empty folder, or --overwrite to write into it"
    )


def prepare_out(settings: SweepSettings, overwrite: bool = False) -> None:
    """Create the checked ``--out`` and write ``sweep.json``; with ``overwrite``, first delete a
    previous sweep's files (:data:`SWEEP_OUTPUTS`, nothing else). Called once Ray is up, so a
    sweep that could not start (a cluster that does not answer) leaves no folder to resume."""
    out = settings.out
    for name in SWEEP_OUTPUTS if overwrite else ():
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(settings.to_json())


def run_sweep(settings: SweepSettings, console: SweepConsole | None = None, overwrite: bool = False) -> Path:
    """Run a whole sweep; returns its output folder.

    ``settings.out`` is not refused here: ``medsweep sweep`` calls :func:`check_out`
    first, while a caller of this function may prepare the folder itself (the
    benchmarks enqueue points into its study). Raises
    :class:`medsweep.search.interrupts.SweepInterrupted` on SIGINT/SIGTERM, with
    the search saved for ``medsweep resume`` and no answer written."""
    from medsweep.search import tuning  # Ray imports only once a sweep really starts
    from medsweep.search.frozen_pass import frozen_pass_precision

    console = console or SweepConsole()
    spec = sweep_dataset(settings)
    check_methods(settings, spec)
    if not settings.skip_bad_images:  # with it, unreadable images are the preload's to skip
        check_image_headers(sample.path for samples in spec.splits.values() for sample in samples)
    console.dataset(spec)
    with InterruptGuard(settings.out) as guard:
        tuning.start_ray(settings)
        guard.install()  # ray.init sets its own SIGTERM handler
        # Resolved where the frozen pass runs, so sweep.json names the stores' precision for resume and final.
        settings.precision = frozen_pass_precision(settings.precision)
        prepare_out(settings, overwrite)
        stores = prepare_stores(settings, spec, console)
        with guard.tune_stops_gracefully():
            grid = tuning.run_tuner(settings, spec, stores, console)
        write_answer(grid, settings, spec, console)
    return settings.out


def write_answer(grid, settings: SweepSettings, spec: DatasetSpec, console: SweepConsole) -> None:
    """Close the study, then leaderboard and best.yaml from a finished Tune run (fresh or resumed), the table,
    the final retrain and the report."""
    from medsweep.search import export

    from medsweep.search import final, report

    orphans = fail_orphaned_trials(settings.out)
    if orphans:
        console.console.print(
            f"[bold]study[/] {orphans} Optuna trial(s) asked for but never run (by an interrupted driver, "
            "or pending when --budget-hours ended the search) marked FAIL"
        )
    board = export.leaderboard(grid, settings)
    export.write_outputs(board, settings, spec, settings.out)
    console.leaderboard(board, settings.out)
    if settings.final_seeds:
        final.retrain_best(settings.out, spec, settings, seeds=settings.final_seeds, console=console)
    page = report.write_report(settings.out)
    console.console.print(f"report: {page}")


def study_storage(out: Path) -> optuna.storages.JournalStorage:
    """The sweep's file-backed Optuna storage (the searcher writes it, ``medsweep dashboard`` reads it)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(Path(out).resolve() / STUDY_FILE)))


def load_study(out: Path) -> optuna.Study:
    """The sweep's Optuna study from its file-backed storage."""
    return optuna.load_study(study_name=STUDY_NAME, storage=study_storage(out))


def fail_orphaned_trials(out: Path) -> int:
    """Mark the study's trials still ``RUNNING`` after the search ended as ``FAIL``; returns how many.

    Such a trial was asked of the study but never ran: by a driver killed after Tune's last
    snapshot (``medsweep resume``), or pending when ``--budget-hours`` ended the search. Left
    RUNNING, the dashboard would show it running and the sampler treat it as pending."""
    study = load_study(out)
    orphans = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in orphans:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return len(orphans)


ProgressFactory = Callable[[str, int], Callable[[int], None]]
