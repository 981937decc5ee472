"""A sweep's settings: :class:`SweepSettings`, their checks and defaults, and what a trial does not search.

The bottom of :mod:`medsweep.search` with :mod:`medsweep.search.study`: the
sweep, the tuner, the final retrain, the report and ``medsweep resume`` read
their settings from here, and the CLI's defaults are this dataclass's
(:func:`setting_default`), so each default has one home. A sweep saves its
settings as ``sweep.json``; :func:`load_settings` reads them back.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsweep.errors import ConfigError
from medsweep.search.study import SETTINGS_FILE
from medsweep.trainables.config import TrainConfig

if TYPE_CHECKING:
    from medsweep.datasets.spec import DatasetSpec

# medsweep.trainables.methods and .preload (torch, transformers) and medsweep.datasets are imported
# inside the functions: the CLI builds its parser from these defaults, and `medsweep --help` must
# not pay seconds for torch.

DEFAULT_METHODS = ("fpt_plus", "linear")
DEFAULT_TRIALS = 8
DEMO_BACKBONE = "vit-small-demo"
# The demo backbone is 64 wide, 12x narrower than ViT-B: the official side
# reduction of 8 would leave an 8-wide side network that barely trains in a few
# epochs; 2 keeps it 32 wide. Applied only to the demo backbone, only if unset.
DEMO_FIXED = {"side_reduction": 2}
# --objective name -> (result / leaderboard column, direction). The loop reports all three in every
# result, under the same names as the leaderboard's columns, so the study's values are the board's.
OBJECTIVES = {"auc": ("best_val_auc", "max"), "memory": ("peak_mem_mb", "min"), "params": ("learnable_params", "min")}
# Largest --image-size accepted: 4096 px is beyond every published recipe (512 px), while a typo such as
# 100000 would ask a ViT for ~40 GB of position embeddings before anything else failed.
MAX_IMAGE_SIZE = 4096
MIN_IMAGE_SIZE = 8
# Seeds are unsigned 32-bit for NumPy and Optuna; a sweep's final retrains and extensions add to its seed.
MAX_SEED = 2**31 - 1
WANDB_MODES = ("auto", "online", "offline", "disabled")
QUIET_HELP = "print only the answer: the leaderboard, the final test and where the files are"  # every --quiet
# Where each trial's run is logged (medsweep.search.tracking): W&B (its mode is --wandb), an MLflow
# store, or nowhere but the sweep folder's own files (hospital clusters that may use neither).
TRACKERS = ("wandb", "mlflow", "none")
SEARCHES = ("tpe", "random")  # Optuna's sampler after the recommended points


@dataclass
class SweepSettings:
    """Everything a sweep needs; saved as ``sweep.json`` in its output folder.

    ``trials=None`` is an unbounded search, ended by ``budget_hours`` (Tune's
    ``time_budget_s``); with both, whichever comes first. ``gpus_per_trial=None``
    is ``auto`` (each method's fraction sized from its probed memory, see
    :func:`medsweep.search.tuning.gpu_fraction`). ``objective`` lists the
    ``OBJECTIVES`` the study optimises; more than one makes it multi-objective.
    ``final_seeds``: the best configuration is retrained with this many seeds and
    tested once when the search ends (0 skips it); ``final_top``: the best
    trials (by best validation AUC) retrained as candidates, the one with the
    best mean validation AUC over the seeds is the answer (see :mod:`medsweep.search.final`).
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
    wandb: str = "auto"  # W&B's mode; applies only with tracker "wandb"
    tracker: str = "wandb"
    seed: int = 0
    # None (the CLI without --out) becomes sweeps/<date-time> in __post_init__: a Path once built.
    out: Path = None  # type: ignore[assignment]
    cache_dir: Path = Path(".medsweep-cache")
    address: str | None = None
    grace_period: int = 2
    fraction: float | None = None
    preload_features: bool = True
    final_seeds: int = 3
    final_top: int = 3
    skip_bad_images: bool = False
    search: str = "tpe"
    early_stopping: bool = True
    fixed: dict[str, Any] = field(default_factory=dict)
    objective: list[str] = field(default_factory=lambda: ["auc"])
    budget_hours: float | None = None
    connect_timeout: float = 45.0
    precision: str = "auto"
    # The trials' precision, resolved from --precision where they run (see resolve_trial_precision); None until a sweep starts.
    trial_precision: str | None = None
    preload_batch_size: int | None = None  # None: probed on each frozen-pass actor's device
    warm_start: str | None = None  # an earlier sweep's folder whose finished trials seed the study (medsweep.search.warm)
    # Per method, changes of its searched keys: {method: {key: {low, high[, log]} | {choices} | {fixed} | "drop"}}
    # (a sweep file's, see medsweep.spaces._overrides); checked here, applied by the space builder.
    search_ranges: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Trials of a preloaded method trained together per cohort server (medsweep.search.cohorts); 1: one per
    # trial as before cohorts; None: auto (as many as fit in the method's GPU fraction, or the CPU default).
    cohort_size: int | None = None

    def __post_init__(self) -> None:
        from medsweep.trainables.methods import get_method
        from medsweep.trainables.precision import check_precision

        self.out = Path(self.out) if self.out else Path("sweeps") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        # Absolute in sweep.json, so `medsweep resume DIR` finds the data and stores from any directory.
        self.cache_dir = Path(self.cache_dir).resolve()
        if self.dataset != "synthetic" and Path(self.dataset).exists():
            self.dataset = str(Path(self.dataset).resolve())
        if self.warm_start is not None:
            self.warm_start = str(Path(self.warm_start).resolve())
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
            raise ConfigError(
                f"--objective must name auc once, with memory and/or params at most once each (e.g. auc,memory), got {','.join(self.objective)!r}"
            )
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
        ddp = [method for method in self.methods if get_method(method).model_cls.ddp]
        if ddp and self.workers > 1 and self.gpus_per_trial and self.gpus_per_trial != self.workers:
            # Ray would pack fractional workers onto one GPU, and NCCL refuses two ranks on one device.
            raise ConfigError(
                f"--gpus-per-trial {self.gpus_per_trial:g} over --workers {self.workers} gives each DDP worker of {ddp[0]} "
                f"{self.gpus_per_trial / self.workers:g} GPU; DDP needs one whole GPU per worker: pass --gpus-per-trial {self.workers}, "
                "or leave it out (DDP methods then get whole GPUs)"
            )
        if self.wandb not in WANDB_MODES:
            raise ConfigError(f"--wandb must be online, offline, disabled or auto, got {self.wandb!r}")
        if self.tracker not in TRACKERS:
            raise ConfigError(f"--tracker must be {', '.join(TRACKERS[:-1])} or {TRACKERS[-1]}, got {self.tracker!r}")
        if seed_problem(self.seed):
            raise ConfigError(f"--seed {seed_problem(self.seed)}")
        if self.final_seeds < 0:
            raise ConfigError(f"--final-seeds must be >= 0 (0 skips the final retrain), got {self.final_seeds}")
        if self.final_top < 1:
            raise ConfigError(f"--final-top must be at least 1 (1: retrain only the search's best trial), got {self.final_top}")
        if self.search not in SEARCHES:
            raise ConfigError(f"--search must be tpe or random, got {self.search!r}")
        if self.fraction is not None and not 0 < self.fraction <= 100:
            raise ConfigError(f"--fraction is a percentage of the training set in (0, 100], got {self.fraction}")
        if "precision" in self.fixed:
            raise ConfigError("--set precision: the precision is a run setting of the whole sweep (frozen pass and trials); use --precision")
        unknown = [key for key in self.fixed if not any(key in _settable_keys(m) for m in self.methods)]
        if unknown:
            raise ConfigError(
                f"--set {unknown[0]}: no selected method ({', '.join(self.methods)}) has this setting; "
                f"see `medsweep spaces show METHOD` for each method's keys"
            )
        self._check_search_ranges()
        if self.cohort_size is not None and self.cohort_size < 1:
            raise ConfigError(f"--cohort-size must be at least 1 (1: every trial alone), got {self.cohort_size}")
        if self.grace_period < 1:
            raise ConfigError(f"--grace-period must be at least 1, got {self.grace_period}")
        if image_size_problem(self.image_size):
            raise ConfigError(f"--image-size {image_size_problem(self.image_size)}")
        check_precision(self.precision)
        if self.preload_batch_size is not None and self.preload_batch_size < 1:
            raise ConfigError(f"--preload-batch-size must be at least 1, got {self.preload_batch_size}")
        if not 0 < self.connect_timeout < math.inf:
            raise ConfigError(f"--connect-timeout must be a number of seconds > 0 (e.g. 45), got {self.connect_timeout}")

    def _check_search_ranges(self) -> None:
        """Refuse a change of a method's search in one line (an unselected method, a key it lacks, bad bounds)."""
        from medsweep.spaces import check_overrides

        if not isinstance(self.search_ranges, dict):
            raise ConfigError(f"search_ranges maps each method to its changed keys (method: {{key: change}}), got {self.search_ranges!r}")
        for method, changes in self.search_ranges.items():
            if method not in self.methods:
                raise ConfigError(f"search_ranges.{method}: {method} is not among the sweep's methods ({', '.join(self.methods)})")
            if not isinstance(changes, dict):
                raise ConfigError(f"search_ranges.{method} maps keys to changes ({{key: {{low: X, high: Y}}}}), got {changes!r}")
            check_overrides(method, changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    @property
    def multi_objective(self) -> bool:
        return len(self.objective) > 1

    def objective_columns(self) -> list[tuple[str, str]]:
        """(result / leaderboard column, ``max`` or ``min``) of each objective, in ``--objective`` order."""
        return [OBJECTIVES[name] for name in self.objective]


def seed_problem(seed: int) -> str | None:
    """What is wrong with a ``--seed`` (the flag's parser and a sweep file's value share it), or None."""
    return None if 0 <= seed <= MAX_SEED else f"must be between 0 and {MAX_SEED}, got {seed} (NumPy's and Optuna's seeds are unsigned)"


def image_size_problem(size: int) -> str | None:
    """What is wrong with an ``--image-size`` (the flag's parser and a sweep file's value share it), or None."""
    return None if MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE else f"must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels, got {size}"


def setting_default(name: str) -> Any:
    """The default of the :class:`SweepSettings` field ``name`` (a fresh copy of a list or dict).

    The CLI's options take their defaults from here, so a default is written once."""
    spec = next(f for f in fields(SweepSettings) if f.name == name)
    return spec.default_factory() if spec.default_factory is not MISSING else spec.default


def load_settings(out: Path) -> SweepSettings:
    """The settings a sweep saved in ``sweep.json``, with ``out`` set to where the folder is now.

    A setting this medsweep does not know is refused rather than dropped: the sweep was
    written by another version, and silently ignoring one of its settings would resume or
    retrain a different sweep."""
    path = Path(out) / SETTINGS_FILE
    if not path.is_file():
        raise ConfigError(f"{out} has no {SETTINGS_FILE}; pass the --out folder of a sweep started with `medsweep sweep`")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error.msg}, line {error.lineno}); repair it, or run the sweep again with `medsweep sweep`") from None
    unknown = sorted(set(saved) - {f.name for f in fields(SweepSettings)})
    if unknown:
        raise ConfigError(f"{path} has settings this medsweep does not know ({', '.join(unknown)}); use the version of medsweep that wrote it")
    return SweepSettings(**{**saved, "out": Path(out)})


def resolve_trial_precision(requested: str, frozen: str, gpus_per_trial: float | None) -> str:
    """The trials' precision from ``--precision``: as named, or for ``auto`` the frozen pass's resolution
    (``frozen``, made on a GPU of the cluster when it has one) when trials take GPUs, fp32 when they run on CPUs
    (``--gpus-per-trial 0``; a cluster without GPUs resolves the frozen pass to fp32 too)."""
    if requested != "auto":
        return requested
    return frozen if gpus_per_trial != 0 else "fp32"


def _settable_keys(method: str) -> set[str]:
    """Keys a ``--set`` may fix for ``method``: its config fields and the training fields."""
    from medsweep.trainables.methods import get_method

    return get_method(method).config_cls.field_names() | set(TrainConfig.__dataclass_fields__)


def run_defaults(method: str, backbone: str, epochs: int) -> dict[str, Any]:
    """Values every run of ``method`` takes unless set: a sweep's trials (:func:`fixed_config`) and one run of
    ``medsweep train``, ``params`` or ``probe``, so that those reproduce the sweep's recommended trial.

    A side network's input size is derived from the frozen input size (FPT+: a quarter) rather than
    taken from the published 512 px recipe's 128 px; a staged method's first stage is half the epoch
    budget (the published 25-100 epochs exceed it); the demo backbone gets :data:`DEMO_FIXED`.
    """
    keys = _settable_keys(method)
    derived: dict[str, Any] = {"side_image_size": 0} if "side_image_size" in keys else {}
    if "stage1_epochs" in keys:
        derived["stage1_epochs"] = max(1, epochs // 2)
    demo = DEMO_FIXED if backbone == DEMO_BACKBONE else {}
    return {**derived, **{k: v for k, v in demo.items() if k in keys}}


def fixed_config(settings: SweepSettings, spec: DatasetSpec, method: str) -> dict[str, Any]:
    """Values a trial does not search: data shape, backbone, budget, resources, :func:`run_defaults`, ``--set``
    values and the method's ``fixed`` values of ``search_ranges`` (these win over ``--set``: they name the method)."""
    from medsweep.spaces import fixed_values
    from medsweep.trainables.methods import runs_ddp

    keys = _settable_keys(method)
    user = {k: v for k, v in {**settings.fixed, **fixed_values(settings.search_ranges.get(method))}.items() if k in keys}
    return {
        **run_defaults(method, settings.backbone, settings.max_epochs),
        "method": method,
        "backbone": settings.backbone,
        "image_size": settings.image_size,
        "num_classes": spec.num_classes,
        "task": spec.task,
        "epochs": settings.max_epochs,
        "seed": settings.seed,
        "workers": settings.workers if runs_ddp(method) else 1,
        "cpus_per_trial": settings.cpus_per_trial,
        "precision": settings.trial_precision or settings.precision,  # auto (before a sweep resolves it) resolves in the loop
        **user,
    }


def wandb_mode(requested: str) -> str:
    """``auto``: online only with an API key (never hang waiting for a network), else offline files."""
    if requested != "auto":
        return requested
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def sweep_dataset(settings: SweepSettings) -> DatasetSpec:
    """The sweep's dataset with its fixed split (loaded the same way by ``medsweep resume`` and ``medsweep final``)."""
    from medsweep.datasets import load_dataset

    return load_dataset(
        settings.dataset,
        cache_dir=settings.cache_dir,
        seed=settings.seed,
        fraction=settings.fraction / 100 if settings.fraction is not None else None,  # percent on the CLI
        synthetic_size=settings.image_size,
    )
