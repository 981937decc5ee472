"""``medsweep resume DIR``: finish a sweep whose driver died (SIGKILL, a lost head node, a closed session).

What a resume reuses and what it redoes:

* ``sweep.json`` gives back the same :class:`SweepSettings`; the dataset and
  the preload stores are loaded the same way as by ``medsweep sweep`` (the
  stores are found by cache key and reused, nothing is preloaded twice);
* the stores are materialized again: the dead driver's object references are
  gone with it;
* Tune restores the experiment in ``<out>/ray/tune``: finished trials keep
  their results and are never run again; unfinished and errored trials start
  again from their last checkpoint (the loop restores it through
  ``ray.tune.get_checkpoint``); the restored searcher continues the same
  Optuna study and its sample counter, so the sweep ends with exactly
  ``--trials`` trials (see :mod:`medsweep.search.tuning` for why the searcher
  is restored by Tune rather than rebuilt);
* if the driver died before Tune saved its experiment, the search starts
  afresh on the same study, whose recommended points are already waiting in
  its journal and are not enqueued a second time.
* a damaged snapshot (an empty or truncated file that Tune's restore would
  meet, log, and answer by running the whole search again without its
  finished trials) is refused in one line before anything starts
  (:func:`check_snapshot`).

A sweep that had finished (``final.json`` written) resumes to the same answer: its leaderboard and report are
written again, and its ``final`` retrain stands unless the best trial changed
(``final_of`` of :func:`~medsweep.search.sweep.write_answer`).

A sweep stopped by Ctrl-C or SIGTERM (:mod:`medsweep.search.interrupts`) is
resumed the same way; Tune saved its experiment as it stopped, and the Optuna
trials of its unfinished Tune trials are still RUNNING in the study, so the
restored searcher tells them their values when they finish here. A resume can
be interrupted and resumed again the same way.

Optuna trials that the dead driver had asked for after Tune's last
experiment snapshot are unknown to the restored experiment and would stay
``RUNNING`` in the study for ever; once the resumed search is over they are
marked ``FAIL`` so that the dashboard and the sampler see no phantom trials.

``sweep.json`` holds absolute paths of the dataset and the preload cache,
so a sweep resumes from any working directory. Tune's saved experiment also
records absolute paths (the study file inside the pickled searcher, the W&B
folder inside the pickled callback): resume the folder where it was written,
not a moved or copied one.
"""

from __future__ import annotations

import argparse
import json
import pickletools
import shutil
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from medsweep.errors import ConfigError
from medsweep.search.interrupts import InterruptGuard
from medsweep.search.settings import QUIET_HELP, load_settings, sweep_dataset
from medsweep.search.study import BEST_YAML, FINAL_JSON, experiment_dir

if TYPE_CHECKING:
    from medsweep.search.console import SweepConsole

# medsweep.search.sweep (torch, transformers), the console (rich) and Ray are imported inside the
# functions: `medsweep --help` builds this module's parser and must not pay for them.


# What Tune's restore reads (the newest file of each name) inside a ``try`` that, on any error, logs
# "Restarting experiment" and runs the whole search again without its finished trials. Tune names its
# search generator's pickle ``.json``.
SNAPSHOT_FILES = {
    "experiment_state-*.json": "json",
    "search_gen_state-*.json": "pickle",
    "searcher-state-*.pkl": "pickle",
    "callback-states-*.pkl": "pickle",
}


def check_snapshot(experiment: Path) -> None:
    """Refuse to resume from a damaged experiment snapshot rather than let Tune silently start the search
    over. Read only, nothing unpickled: a pickle is whole when its opcodes run to STOP. Today's sweeps write
    their snapshots whole (:mod:`medsweep.search.atomic_storage`); a disk that filled up, or an older
    medsweep killed at the wrong moment, can still leave a truncated one."""
    for pattern, kind in SNAPSHOT_FILES.items():
        saved = sorted(experiment.glob(pattern))
        if not saved:
            continue
        newest, damage = saved[-1], None
        data = newest.read_bytes()
        try:
            if not data:
                damage = "an empty file"
            elif kind == "json":
                json.loads(data)
            else:
                deque(pickletools.genops(data), maxlen=0)  # raises unless the opcodes run to STOP
        except ValueError as error:
            damage = str(error).splitlines()[0]
        if damage:
            raise ConfigError(
                f"{newest} is damaged ({damage}), so Tune cannot restore this sweep's search; "
                "start it again with `medsweep sweep` and --overwrite (or another --out)"
            )


def mend_lost_checkpoints(experiment: Path) -> list[str]:
    """Give back each trial the checkpoints Tune's newest snapshot knows, where Tune deleted them; returns one line
    per trial whose restore point was mended.

    Tune deletes a trial's checkpoints beyond ``num_to_keep`` as it registers new ones, and copies its experiment
    snapshot to the sweep's folder in the background (forced every ``num_to_keep`` checkpoints of a trial, but the
    copy can lag). A driver that ends before the copy lands (SIGKILL, or a SIGTERM to its whole process group)
    leaves a snapshot whose trials know checkpoints already deleted. Two failures followed, both seen in the
    interrupt test: the restore of a trial whose latest known checkpoint was gone ("does not exist on storage
    anymore"), and, at the resumed trial's next checkpoint, Tune's deletion of an older one that was gone
    (``FileNotFoundError`` in ``_process_trial_save``). So the trial's newest complete checkpoint, which the
    snapshot never heard of, takes the lost latest one's name (the loop reads its epoch from it: no epoch is run
    twice), the other checkpoints the snapshot never heard of are removed, and each older known one that is gone
    becomes an empty folder for Tune to delete in its turn."""
    import pickle

    from medsweep.trainables.loop import CHECKPOINT_FILE

    saved = sorted(experiment.glob("experiment_state-*.json"))
    if not saved:
        return []
    mended = []
    for _, metadata in json.loads(saved[-1].read_text())["trial_data"]:
        pickled = json.loads(metadata).get("checkpoint_manager")
        manager = pickle.loads(bytes.fromhex(pickled["value"])) if pickled else None
        latest = manager.latest_checkpoint_result if manager is not None else None
        if latest is None or not Path(latest.checkpoint.path).parent.is_dir():
            continue
        lost = Path(latest.checkpoint.path)
        if not lost.exists():
            unknown = sorted(p for p in lost.parent.glob("checkpoint_*") if p.name > lost.name)
            complete = [p for p in unknown if (p / CHECKPOINT_FILE).is_file()]  # not one a killed trial was writing
            if not complete:
                continue
            complete[-1].rename(lost)
            for stale in unknown:
                if stale != complete[-1]:
                    shutil.rmtree(stale, ignore_errors=True)
            mended.append(f"{lost.parent.name}: {lost.name}, which the saved search restores, was deleted; going on from {complete[-1].name}")
        for known in getattr(manager, "_checkpoint_results", []):  # Tune's list of the checkpoints it keeps
            Path(known.checkpoint.path).mkdir(parents=True, exist_ok=True)
    return mended


def resume_sweep(out: Path, console: SweepConsole | None = None) -> Path:
    """Continue the sweep in ``out`` to its planned number of trials, then write its answer."""
    settings = load_settings(out)
    check_snapshot(experiment_dir(out))
    from medsweep.search import tuning  # Ray imports only once the folder is known to hold a sweep
    from medsweep.search.console import SweepConsole
    from medsweep.search.extend import all_results, best_trial, experiment_dirs
    from medsweep.search.manifest import check_same_dataset, write_manifest
    from medsweep.search.sweep import prepare_stores, write_answer

    console = console or SweepConsole()
    spec = sweep_dataset(settings)
    console.dataset(spec)
    changed = check_same_dataset(out, spec, settings.dataset)  # refused here (before Ray) if its images or labels differ
    if changed:
        console.console.print(f"[bold]resume[/] {changed}")
    with InterruptGuard(settings.out) as guard:
        guard.lock_out()  # refused while the sweep's own driver still runs
        # final.json comes after the search and best.yaml: with it the sweep had finished (resumed by mistake, or
        # to be sure), and its final retrain stands unless the best trial changes.
        previous_best = best_trial(out) if (out / FINAL_JSON).is_file() and (out / BEST_YAML).is_file() else None
        tuning.start_ray(settings)
        guard.install()  # ray.init sets its own SIGTERM handler
        stores = prepare_stores(settings, spec, console)
        write_manifest(settings, spec, stores)  # appends this resume's record; the sweep's own stays
        with guard.tune_stops_gracefully():
            if tuning.can_resume(settings):
                console.console.print(f"[bold]resume[/] restoring the search saved in {experiment_dir(out)}")
                for line in mend_lost_checkpoints(experiment_dir(out)):
                    console.console.print(f"[bold]resume[/] trial {line}")
                grid = tuning.resume_tuner(settings, stores, console)
            else:
                console.console.print("[bold]resume[/] the search had not started; starting it on the sweep's study")
                grid = tuning.run_tuner(settings, spec, stores, console)
        # An extended sweep's answer is built from the extensions' trials too (medsweep.search.extend).
        write_answer(all_results(out) if experiment_dirs(out)[1:] else grid, settings, spec, console, final_of=previous_best)
    return settings.out


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``medsweep resume DIR [--quiet]``."""
    parser = subparsers.add_parser(
        "resume",
        help="continue an interrupted sweep: finished trials are kept, unfinished ones restart from their last checkpoint",
    )
    parser.add_argument("dir", type=Path, help="the sweep's output folder (the one holding sweep.json)")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def run(args: argparse.Namespace) -> int:
    from medsweep.search.console import SweepConsole

    resume_sweep(args.dir, SweepConsole(quiet=args.quiet))
    return 0
