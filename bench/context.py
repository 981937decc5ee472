"""What every benchmark shares: the mode's sizes, the folders, one Ray instance, the machine.

Why one context: the figures draw on the same few sweeps (the 16-trial FPT+
sweep feeds the compute floor, the overhead and the search figures), and the
issue asks for ratios measured side by side in one run on one Ray instance.
The context starts Ray once, runs each named sweep once and hands the same
record to every figure that asks for it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"  # one folder per mode: results/full, results/quick
MODES = ("full", "quick")  # the report takes each figure from the first mode that has it
RAY_CPUS = 2
RAY_OBJECT_STORE_BYTES = 2 << 30


@dataclass(frozen=True)
class Plan:
    """The sizes of one mode; ``full`` is the issue's settings, ``quick`` a smoke run of every figure."""

    name: str
    main_trials: int  # the FPT+ sweep of figures 1, 3 and 5 (TPE + ASHA, default epochs)
    main_epochs: int
    tiny_epochs: int  # the small-task sweeps of figures 2 and 7
    scaling_trials: tuple[int, ...]
    reuse_trials: int  # figure 2, default setting
    heavy_trials: int  # figure 2, frozen-dominated setting
    heavy_epochs: int
    heavy_split: tuple[int, int, int]  # train/val/test images of the frozen-dominated set
    grid_lrs: tuple[float, ...]  # figure 5's grid (its total epochs are every search's budget there)
    grid_keep_ratios: tuple[float, ...]
    search_seeds: tuple[int, ...]  # figure 5: the seeds each config-drawing search runs with
    fpt_memory_batches: tuple[int, ...]
    full_memory_batches: tuple[int, ...]
    image_sizes: tuple[int, ...]
    size_split: tuple[int, int, int]
    datapath_passes: int
    worker_fits: int  # figure 3: one-worker TorchTrainer fits (each starts a worker group)
    reuse_whatif: bool  # figure 3: rerun figure 2's default sweep with Ray Tune's defaults (no actor reuse, one pending trial)


FULL = Plan(
    name="full",
    main_trials=16,
    main_epochs=6,
    tiny_epochs=2,
    scaling_trials=(4, 16, 64),
    reuse_trials=16,
    heavy_trials=16,
    heavy_epochs=2,
    heavy_split=(24, 8, 8),
    grid_lrs=(1.5e-4, 5e-4, 1.5e-3, 5e-3),
    grid_keep_ratios=(0.1, 0.2, 0.4),
    search_seeds=(0, 1, 2),
    fpt_memory_batches=(16,),
    full_memory_batches=(2, 4),
    image_sizes=(224, 384, 512),
    size_split=(32, 8, 8),
    datapath_passes=15,
    worker_fits=2,
    reuse_whatif=True,
)

# Quick: the main sweep doubles as figure 2's default arm and figure 7's 4-trial point, and
# figure 7 stops at 8 trials (each trial costs seconds of worker start-up here, see figure 3).
QUICK = Plan(
    name="quick",
    main_trials=4,
    main_epochs=2,
    tiny_epochs=2,
    scaling_trials=(4, 8),
    reuse_trials=4,
    heavy_trials=4,
    heavy_epochs=1,
    heavy_split=(8, 4, 4),
    grid_lrs=(5e-4, 1.5e-3),
    grid_keep_ratios=(0.2,),
    search_seeds=(0,),
    fpt_memory_batches=(2,),
    full_memory_batches=(1,),
    image_sizes=(224, 384, 512),
    size_split=(8, 4, 4),
    datapath_passes=5,
    worker_fits=1,
    reuse_whatif=False,
)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, load: the numbers only compare on the machine they were taken on."""
    import torch

    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(mem_kib / 2**20, 1),
        "loadavg": list(os.getloadavg()),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


@dataclass
class Context:
    """Shared state of one ``bench.run`` invocation."""

    plan: Plan
    work: Path  # caches and sweep outputs (large, not kept)
    command: str
    ray_start_seconds: float | None = None
    sweeps: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def results(self) -> Path:
        return RESULTS / self.plan.name

    @property
    def cache_dir(self) -> Path:
        return self.work / "cache"

    def ray(self) -> float:
        """Start the one Ray instance (idempotent); returns how long ``ray.init`` took."""
        if self.ray_start_seconds is None:
            import logging

            import ray

            from medsweep.search.tuning import quiet_ray_data

            os.environ["WANDB_MODE"] = "disabled"
            # As medsweep's start_ray: per-epoch checkpoints of short trials force state snapshots on purpose.
            os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
            start = time.perf_counter()
            ray.init(
                address="local",  # our own instance, never a cluster another job on this machine started
                num_cpus=RAY_CPUS,
                object_store_memory=RAY_OBJECT_STORE_BYTES,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
                runtime_env={"env_vars": {"WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}},
            )
            self.ray_start_seconds = time.perf_counter() - start
            quiet_ray_data()
        return self.ray_start_seconds

    def fresh_stores(self) -> None:
        """Drop every preload store so the next sweep pays its own preload (images are kept)."""
        shutil.rmtree(self.cache_dir / "stores", ignore_errors=True)

    def sweep(self, label: str = "", points: list[dict[str, Any]] | None = None, **settings: Any) -> dict[str, Any]:
        """Run the sweep with these settings once per invocation (see :mod:`bench.sweeps`).

        Sweeps are identified by their settings, so two figures asking for the
        same sweep (in quick mode the main sweep is also figure 2's and 7's
        smallest) share one run. A sweep given its own ``points`` to run first
        (figure 5's grid) needs a ``label`` that names them.
        """
        if points and not label:
            raise ValueError("a sweep with its own points needs a label")
        name = sweep_name(settings) + (f"-{label}" if label else "")
        if name not in self.sweeps:
            from bench.sweeps import timed_sweep

            self.sweeps[name] = timed_sweep(self, name, points=points, **settings)
            save_json(self.results / "sweeps" / f"{name}.json", self.sweeps[name])
        return self.sweeps[name]


def sweep_name(settings: dict[str, Any]) -> str:
    """A readable, unique name: ``t16-e6`` plus every other setting (``-search-random``...)."""
    parts = [f"t{settings['trials']}", f"e{settings['max_epochs']}"]
    for key in sorted(set(settings) - {"trials", "max_epochs"}):
        value = Path(str(settings[key])).name if key == "dataset" else settings[key]
        parts.append(f"{key}-{value}")
    return "-".join(parts)


def save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_plain))


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _plain(value: Any) -> Any:
    """numpy scalars, paths and dataclasses to JSON."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)
