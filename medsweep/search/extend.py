"""``medsweep extend DIR --trials N`` (and/or ``--budget-hours H``): more trials for a finished sweep.

The sibling of :mod:`medsweep.search.resume`: ``resume`` finishes the trials a
sweep planned, ``extend`` adds new ones to a sweep that has finished them.

* The extension is a new Tune experiment, ``<out>/ray/tune-extend-<k>``
  (``ray/tune`` stays the sweep's own, restorable by ``resume``), whose
  searcher is built on the *same* Optuna study: TPE models every trial the
  sweep (and earlier extensions) finished, so the new trials are suggested
  with everything learnt, not drawn afresh. The recommended points are not
  enqueued again. The sampler is seeded with ``--seed`` plus the number of
  trials already in the study, so an extension never replays the random
  draws of the sweep's own sampler, and two extensions differ.
* The preload stores are found by cache key and reused, as by ``resume``.
* The leaderboard, ``best.yaml`` and the report are rebuilt from every
  experiment under ``<out>/ray`` (the sweep's and each extension's trials);
  ``final`` runs again (with the sweep's ``--final-seeds``) only if the best
  trial changed, since otherwise its answer stands.
* ``sweep.json``'s ``trials`` becomes the total run.

Refused with one line: a folder without a sweep, a sweep that has not
finished (no leaderboard: ``medsweep resume`` it first), a sweep whose driver
still runs (its lock, :mod:`medsweep.search.lock`), a count below 1. An
interrupted extension is not resumable: its finished trials are kept (they
are on the next leaderboard), its unfinished Optuna trials are marked FAIL,
and ``medsweep extend`` runs a new extension.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsweep.errors import ConfigError
from medsweep.search.interrupts import InterruptGuard
from medsweep.search.settings import QUIET_HELP, SweepSettings, load_settings, sweep_dataset
from medsweep.search.study import BEST_YAML, LEADERBOARD_CSV, RAY_DIR, SETTINGS_FILE, experiment_dir, not_finished

if TYPE_CHECKING:
    from medsweep.search.console import SweepConsole

# Ray, torch and the console are imported inside the functions: `medsweep --help` builds this parser.

EXTENSION_PREFIX = "tune-extend-"


def check_extendable(out: Path, trials: int | None, budget_hours: float | None) -> SweepSettings:
    """The sweep's settings once ``out`` is known to hold a finished sweep and the request is valid."""
    settings = load_settings(out)
    if trials is None and budget_hours is None:
        raise ConfigError("give --trials N or --budget-hours H (or both): how far to extend the sweep")
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if budget_hours is not None and not 0 < budget_hours < math.inf:
        raise ConfigError(f"--budget-hours must be a number of hours > 0 (e.g. 0.5), got {budget_hours}")
    if not ((out / LEADERBOARD_CSV).is_file() and (out / BEST_YAML).is_file()):
        raise not_finished(out, LEADERBOARD_CSV)
    return settings


def experiment_dirs(out: Path) -> list[Path]:
    """The sweep's Tune experiments, in the order they ran: ``ray/tune``, then each extension."""
    ray_dir = Path(out).resolve() / RAY_DIR
    extensions = sorted(ray_dir.glob(f"{EXTENSION_PREFIX}*"), key=lambda p: int(p.name.removeprefix(EXTENSION_PREFIX)))
    return [p for p in [experiment_dir(out), *extensions] if p.is_dir()]


def next_extension(out: Path) -> str:
    done = [int(p.name.removeprefix(EXTENSION_PREFIX)) for p in experiment_dirs(out)[1:]]
    return f"{EXTENSION_PREFIX}{max(done, default=0) + 1}"


def all_results(out: Path) -> list[Any]:
    """Every Tune trial result of the sweep and its extensions (what the leaderboard is built from)."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    from medsweep.search.tuning import unreported_trials_unlogged

    with unreported_trials_unlogged():
        grids = [ResultGrid(ExperimentAnalysis(str(path))) for path in experiment_dirs(out)]
    return [grid[i] for grid in grids for i in range(len(grid))]


def best_trial(out: Path) -> str | None:
    """The id of the trial ``best.yaml`` names as the sweep's best (None: no usable trial)."""
    from medsweep.search.export import read_best

    best = next(iter(read_best(out).values()))["best"]
    return best["trial_id"] if best else None


def extend_sweep(
    out: Path,
    trials: int | None,
    budget_hours: float | None = None,
    console: SweepConsole | None = None,
) -> Path:
    """Run ``trials`` more trials (and/or ``budget_hours`` more search) on the finished sweep in ``out``."""
    out = Path(out)
    settings = check_extendable(out, trials, budget_hours)
    from medsweep.search import tuning  # Ray only once the folder is known to hold a finished sweep
    from medsweep.search.console import SweepConsole
    from medsweep.search.manifest import check_same_dataset
    from medsweep.search.study import fail_orphaned_trials, load_study
    from medsweep.search.sweep import prepare_stores, write_answer

    console = console or SweepConsole()
    with InterruptGuard(settings.out) as guard:
        guard.lock_out()  # refused while the sweep (or another extension) still runs
        spec = sweep_dataset(settings)
        console.dataset(spec)
        changed = check_same_dataset(out, spec, settings.dataset)  # refused if its images or labels differ
        if changed:
            console.console.print(f"[bold]extend[/] {changed}")
        previous_best = best_trial(out)
        fail_orphaned_trials(out)  # trials an interrupted extension asked for: not pending for the sampler
        tuning.start_ray(settings)
        guard.install()  # ray.init sets its own SIGTERM handler
        stores = prepare_stores(settings, spec, console)
        name, seed = next_extension(out), settings.seed + len(load_study(out).trials)
        extension = dataclasses.replace(settings, trials=trials, budget_hours=budget_hours)
        console.console.print(f"[bold]extend[/] {name}: sampler seed {seed}, on the sweep's study")
        with guard.tune_stops_gracefully():
            grid = tuning.run_tuner(extension, spec, stores, console, name=name, sampler_seed=seed)
        if settings.trials is not None:
            settings.trials += len(grid)
            (out / SETTINGS_FILE).write_text(settings.to_json())
        write_answer(all_results(out), settings, spec, console, final_of=previous_best)
    return settings.out


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``medsweep extend DIR --trials N [--budget-hours H] [--quiet]``."""
    parser = subparsers.add_parser(
        "extend",
        help="add trials to a finished sweep: the searcher continues from every trial it has seen, the answer is rebuilt",
    )
    parser.add_argument("dir", type=Path, help="the finished sweep's output folder (the one holding sweep.json)")
    parser.add_argument("--trials", type=int, default=None, help="number of new trials")
    parser.add_argument("--budget-hours", type=float, default=None, help="time budget of the extension in hours (with --trials: whichever comes first)")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def run(args: argparse.Namespace) -> int:
    from medsweep.search.console import SweepConsole

    extend_sweep(args.dir, args.trials, args.budget_hours, SweepConsole(quiet=args.quiet))
    return 0
