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
   deadlock measured on 2 cores when reads stay lazy); with the store keys
   known, write ``manifest.json`` (:mod:`medsweep.search.manifest`);
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

import shlex
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from medsweep.datasets.images import check_image_headers
from medsweep.datasets.spec import DatasetSpec
from medsweep.datasets.store import write_atomically
from medsweep.errors import ConfigError
from medsweep.search import export, final, report, warm
from medsweep.search.console import SweepConsole
from medsweep.search.interrupts import InterruptGuard
from medsweep.search.manifest import write_manifest
from medsweep.search.out_paths import check_out_path, write_error
from medsweep.search.settings import SweepSettings, fixed_config, resolve_trial_precision, sweep_dataset
from medsweep.search.study import SETTINGS_FILE, STUDY_FILE, SWEEP_OUTPUTS, fail_orphaned_trials
from medsweep.trainables.backbones import build_backbone, frozen_weights_unused
from medsweep.trainables.config import TrainConfig
from medsweep.trainables.methods import build_method


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


def check_methods(settings: SweepSettings, spec: DatasetSpec) -> None:
    """Build each method once from its fixed values, as its trials will, before Ray starts.

    An unknown backbone, a method that does not fit the backbone, an image size
    below the backbone's patch size, or a ``--set`` value out of the method's or
    the training config's bounds (or a ``layer_decay`` on a backbone without ViT
    blocks) would otherwise surface only during the
    preload, after Ray's 20-50 s start. Everything is built on the meta device:
    shapes and checks, no weights (CDTM's token-mixing matrices at 512 px would
    be gigabytes).
    """
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
            train = TrainConfig.from_dict(config)
            # The optimizer's groups: a --set layer_decay on a backbone without ViT blocks is refused here.
            build_method(method, config).param_groups(train.weight_decay, train.decay, train.layer_decay)


def check_out(out: Path, overwrite: bool = False) -> None:
    """Refuse an ``--out`` that would mix two sweeps or someone's files; writes nothing.

    A folder holding a sweep (its ``sweep.json`` or study) is continued with
    ``medsweep resume``: a second sweep there mixed the two studies. Anything
    else found there was not written by medsweep. ``overwrite`` accepts both
    (:func:`prepare_out` then deletes the previous sweep's files).
    """
    check_out_path(out)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries or overwrite:
        return
    if any(name in entries for name in (SETTINGS_FILE, STUDY_FILE)):
        raise ConfigError(
            f"--out {out} already holds a sweep; continue it with `medsweep resume {shlex.quote(str(out))}`, "
            "or pass another folder (or --overwrite to replace it)"
        )
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise ConfigError(
        f"--out {out} holds files medsweep did not write ({shown}); pass a new or empty folder, or --overwrite to write into it"
    )


def prepare_out(settings: SweepSettings, overwrite: bool = False) -> None:
    """Create the checked ``--out`` and write ``sweep.json``; with ``overwrite``, first delete a
    previous sweep's files (:data:`medsweep.search.study.SWEEP_OUTPUTS`, nothing else). Called once
    Ray is up, so a sweep that could not start (a cluster that does not answer) leaves no folder to resume."""
    out = settings.out
    for name in SWEEP_OUTPUTS if overwrite else ():
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    try:  # check_out saw what permissions say; the file system may still refuse (/proc, a full or read-only disk)
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / SETTINGS_FILE, settings.to_json())  # never a half-written sweep.json to resume
    except OSError as error:
        raise write_error(error, out) from None


def run_sweep(settings: SweepSettings, console: SweepConsole | None = None, overwrite: bool = False) -> Path:
    """Run a whole sweep; returns its output folder.

    ``settings.out`` is not refused here: ``medsweep sweep`` calls :func:`check_out`
    first, while a caller of this function may prepare the folder itself (the
    benchmarks enqueue points into its study). Raises
    :class:`medsweep.search.interrupts.SweepInterrupted` on SIGINT/SIGTERM, with
    the search saved for ``medsweep resume`` and no answer written."""
    # Ray (tuning) and Ray Data (frozen_pass) are imported only once a sweep really starts.
    from medsweep.search import tuning
    from medsweep.search.frozen_pass import frozen_pass_precision

    console = console or SweepConsole()
    spec = sweep_dataset(settings)
    check_methods(settings, spec)
    warm.check_warm_start(settings)
    if not settings.skip_bad_images:  # with it, unreadable images are the preload's to skip
        check_image_headers(sample.path for samples in spec.splits.values() for sample in samples)
    console.dataset(spec)
    with InterruptGuard(settings.out) as guard:
        tuning.start_ray(settings)
        guard.install()  # ray.init sets its own SIGTERM handler
        # Resolved where the frozen pass runs, so sweep.json names the stores' precision for resume and final.
        requested, settings.precision = settings.precision, frozen_pass_precision(settings.precision)
        settings.trial_precision = resolve_trial_precision(requested, settings.precision, settings.gpus_per_trial)
        prepare_out(settings, overwrite)
        guard.lock_out()
        if settings.warm_start:
            added = warm.add_earlier_trials(settings)
            console.console.print(f"[bold]warm start[/] {added} finished trial(s) of {settings.warm_start} added to the study")
        stores = prepare_stores(settings, spec, console)
        write_manifest(settings, spec, stores)
        with guard.tune_stops_gracefully():
            grid = tuning.run_tuner(settings, spec, stores, console)
        write_answer(grid, settings, spec, console)
    return settings.out


def write_answer(grid, settings: SweepSettings, spec: DatasetSpec, console: SweepConsole, final_of: str | None = None) -> None:
    """Close the study, then leaderboard and best.yaml from a finished Tune run (fresh or resumed), the table,
    the final retrain and the report.

    ``final_of``: the best trial whose retrain ``final.json`` already holds (a finished sweep extended or resumed):
    ``final`` runs again only if the best trial is now another, since a retrain costs a seed's training per
    candidate (GPU-hours for a full fine-tuning)."""
    orphans = fail_orphaned_trials(settings.out)
    if orphans:
        console.console.print(
            f"[bold]study[/] {orphans} Optuna trial(s) asked for but never run (by an interrupted driver, "
            "or pending when --budget-hours ended the search) marked FAIL"
        )
    board = export.leaderboard(grid, settings)
    export.write_outputs(board, settings, spec, settings.out)
    console.leaderboard(board, settings.out, objectives=settings.objective)
    if board.empty:  # e.g. a --budget-hours that ended before any trial reported an epoch
        console.result(
            f"[bold]no trial reported a result[/]: nothing to retrain or report; give the search more time with "
            f"`medsweep extend {shlex.quote(str(settings.out))} --trials N` (or --budget-hours H)"
        )
        return
    if settings.final_seeds and board["status"].isin(export.UNUSABLE).all():
        console.console.print(
            "[bold]final[/] skipped: no trial ended usable (each failed, diverged or predicted one class for every "
            "validation image); see the report, then sweep again with more epochs or other learning rates"
        )
    elif settings.final_seeds and final_of is not None and _best_trial_id(board, spec) == final_of:
        console.console.print(f"[bold]final[/] not rerun: the best trial is still {final_of}")
    elif settings.final_seeds:
        final.retrain_best(settings.out, spec, settings, seeds=settings.final_seeds, console=console)
    page = report.write_report(settings.out)
    console.result(f"report: {page}")


def _best_trial_id(board: pd.DataFrame, spec: DatasetSpec) -> str | None:
    """The id of the trial ``best.yaml`` names as the sweep's best (None: no usable trial)."""
    best = export.best_configs(board, spec)[spec.name]["best"]
    return best["trial_id"] if best else None
