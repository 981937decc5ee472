"""The ``medsweep`` command.

Subcommands: ``sweep`` (the main job; no arguments runs the built-in demo),
``best`` (the answer of a finished sweep), ``train`` (one run of one config,
the same loop as a trial), ``preload`` (build or list preload stores),
``params`` and ``probe`` (what a method costs), ``spaces show`` (a method's
space and recommended point).

Bad input raises :class:`medsweep.errors.MedsweepError` somewhere below; it is
printed here as one line and the command exits with code 2. A sweep or resume
stopped by SIGINT/SIGTERM raises :class:`medsweep.search.interrupts.SweepInterrupted`:
one line naming ``medsweep resume``, exit code 130 or 143.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medsweep.errors import ConfigError, MedsweepError
from medsweep.search.interrupts import SweepInterrupted
from medsweep.search.settings import (
    DEFAULT_METHODS,
    DEFAULT_TRIALS,
    QUIET_HELP,
    SEARCHES,
    TRACKERS,
    WANDB_MODES,
    SweepSettings,
    image_size_problem,
    seed_problem,
    setting_default,
)
from medsweep.spaces import METHODS, PRECISION_NAMES
from medsweep.spaces.tables import FPT_LEARNING_RATES, LORA_DATASETS

# Ray's raylet warns on the driver's console each time the worker processes it started on a node pass another
# multiple of its startup concurrency (the node's CPUs): "N PYTHON worker processes have been started on node ...".
# A fused sweep starts one light client process per member on purpose (16 on 2 cores, BENCHMARKS.md figure 11; W&B
# adds a logging actor per trial), so every such sweep printed that line a dozen times, naming nothing a user could
# fix. Ray's documented filter for forwarded log lines drops it. Ray reads the filter when it is imported, so it is
# set here, before any command imports Ray; a user's own RAY_DEDUP_LOGS_SKIP_REGEX wins.
RAY_LINES_NOT_SHOWN = "PYTHON worker processes have been started on node"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit code 2) instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"medsweep: error: {message} (see `{self.prog} --help`)\n")


def _whole_number(text: str) -> int:
    """An integer option's value, or argparse's one-line error naming it (not the parsing function's name)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _checked(problem: Callable[[int], str | None]) -> Callable[[str], int]:
    """An argparse type: a whole number that ``problem`` (the settings' own check) finds nothing wrong with."""

    def parse(text: str) -> int:
        value = _whole_number(text)
        if problem(value):
            raise argparse.ArgumentTypeError(str(problem(value)))
        return value

    return parse


FINAL_TOP_HELP = (
    "retrain the N best trials with the final seeds and answer with the best mean validation AUC "
    "(guards against one lucky seed; 1: only the search's best)"
)


def _batch_or_auto(text: str) -> int | None:
    """``--preload-batch-size``: ``auto`` (None: probed from the frozen pass's device memory) or a positive count."""
    if text.strip().lower() == "auto":
        return None
    try:
        int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto or a whole number >= 1, got {text!r}") from None
    return _positive_int(text)


def _gpus(text: str) -> float | None:
    """``--gpus-per-trial``: ``auto`` (None: sized per method from its probed memory) or a number."""
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto or a number (e.g. 0.25), got {text!r}") from None


def _scalar(text: str) -> Any:
    """A ``--set`` value: int, then float (``1e-4``, which YAML 1.1 reads as a string), then YAML."""
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def _set_pairs(pairs: list[str]) -> dict[str, Any]:
    """``--set key=value`` overrides (numbers, booleans, strings)."""
    fixed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MedsweepError(f"--set expects key=value, got {pair!r}")
        fixed[key.strip()] = _scalar(value)
    return fixed


# Every option that is also a sweep setting takes its default from SweepSettings (setting_default),
# whichever command it belongs to, so `medsweep train --backbone` and `medsweep sweep --backbone`
# cannot drift apart; the options of one training config (--lr, --batch-size) default to the
# sweep's recommended trial (_run_config).
DATASET_HELP = "'synthetic', an ImageFolder folder, a list-file folder or a dataset YAML"
METHOD_HELP = f"one of {', '.join(METHODS)}"
SPACES_DATASET_HELP = (
    f"a dataset with a published recommendation: FPT/FPT+ {', '.join(FPT_LEARNING_RATES)}; LoRA-medical {', '.join(LORA_DATASETS)}"
)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default=setting_default("backbone"), help="registered name, save_pretrained folder or hub id")
    image_size, seed = _checked(image_size_problem), _checked(seed_problem)
    parser.add_argument("--image-size", type=image_size, default=setting_default("image_size"), help="input size of the backbone / frozen path")
    parser.add_argument("--cache-dir", type=Path, default=setting_default("cache_dir"), help="where preload stores and the synthetic set live")
    parser.add_argument("--seed", type=seed, default=setting_default("seed"), help="seeds data generation, weights and shuffling (a sweep's TPE too)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fix a method or training value (repeatable)")
    parser.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images in the preload (counted), instead of stopping")


def _add_cluster(parser: argparse.ArgumentParser) -> None:
    """Options of the commands that run on Ray: where, and how the frozen pass runs there."""
    parser.add_argument("--address", default=setting_default("address"), help="Ray cluster address (e.g. auto); default a local Ray")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=setting_default("connect_timeout"),
        metavar="SECONDS",
        help="how long to wait for the --address cluster to answer",
    )
    parser.add_argument(
        "--precision",
        default=setting_default("precision"),
        choices=PRECISION_NAMES,
        help="compute precision of the frozen pass (part of the store's key) and of every trial's training step; "
        "auto: bf16 on GPUs that have it, fp16 on other GPUs, fp32 on CPUs",
    )
    parser.add_argument(
        "--preload-batch-size",
        type=_batch_or_auto,
        default=setting_default("preload_batch_size"),
        metavar="N|auto",
        help="images per frozen forward in the preload; auto: the most that fit 80%% of a GPU's free memory (probed on each actor), 16 on CPUs",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="medsweep", description="Find the best PETL method and hyperparameters for a medical image dataset.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sweep = sub.add_parser("sweep", help="run a sweep (no arguments: the built-in synthetic demo)")
    sweep.add_argument("--dataset", default=setting_default("dataset"), help=DATASET_HELP)
    sweep.add_argument("--method", action="append", dest="methods", help=f"method to sweep (repeatable); default {' and '.join(DEFAULT_METHODS)}")
    # None here, DEFAULT_TRIALS in cmd_sweep: without --trials, --budget-hours alone is an unbounded search.
    sweep.add_argument(
        "--trials",
        type=int,
        default=None,
        help=f"number of trials (recommended points first, then TPE); default {DEFAULT_TRIALS}, unbounded with --budget-hours",
    )
    sweep.add_argument(
        "--budget-hours",
        type=float,
        default=setting_default("budget_hours"),
        help="time budget of the search in hours; ends it (with --trials: whichever comes first)",
    )
    sweep.add_argument(
        "--objective",
        default=",".join(setting_default("objective")),
        help="auc, or auc with memory and/or params (e.g. auc,memory): a multi-objective search with a Pareto front",
    )
    sweep.add_argument("--max-epochs", type=int, default=setting_default("max_epochs"), help="epoch budget per trial (ASHA stops weak trials sooner)")
    sweep.add_argument("--fraction", type=float, default=setting_default("fraction"), help="label fraction of the training set in percent (1, 10, 100...)")
    sweep.add_argument("--grace-period", type=int, default=setting_default("grace_period"), help="epochs every trial runs before ASHA may stop it")
    sweep.add_argument(
        "--gpus-per-trial",
        type=_gpus,
        default=setting_default("gpus_per_trial"),
        help="GPU fraction each trial reserves, for every method; default auto: sized per method from its probed memory (0 without GPUs)",
    )
    sweep.add_argument("--cpus-per-trial", type=float, default=setting_default("cpus_per_trial"), help="CPUs each trial (or cohort) reserves")
    sweep.add_argument("--workers", type=int, default=setting_default("workers"), help="DDP workers for full fine-tuning trials")
    sweep.add_argument(
        "--cohort-size",
        type=int,
        default=setting_default("cohort_size"),
        help=(
            "trials of a method on preloaded features trained together as one cohort; 1: each trial alone; "
            "default auto (fill the method's GPU fraction; 1 on CPUs, measured faster)"
        ),
    )
    sweep.add_argument(
        "--wandb",
        default=setting_default("wandb"),
        choices=WANDB_MODES,
        help="W&B mode (with --tracker wandb); auto: online with WANDB_API_KEY, else offline files",
    )
    sweep.add_argument(
        "--tracker",
        default=setting_default("tracker"),
        metavar="{" + ",".join(TRACKERS) + "}",  # checked by SweepSettings: one line, also for a --config file's value
        help="where each trial's run is logged: W&B, MLflow (<out>/mlflow.db, or MLFLOW_TRACKING_URI) or none (the sweep folder only)",
    )
    sweep.add_argument("--out", type=Path, default=None, help="output folder (default sweeps/<date-time>)")
    sweep.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --out: a previous sweep's files there are deleted first, other files kept"
    )
    sweep.add_argument("--search", default=setting_default("search"), choices=SEARCHES, help="Optuna sampler after the recommended points")
    sweep.add_argument("--no-early-stopping", action="store_true", help="run every trial to --max-epochs (no ASHA)")
    sweep.add_argument("--no-preload", action="store_true", help="store images only; every trial runs the frozen backbone itself")
    sweep.add_argument(
        "--final-seeds", type=int, default=setting_default("final_seeds"), help="retrain the best config with N seeds and test it once (0: skip)"
    )
    sweep.add_argument("--final-top", type=int, default=setting_default("final_top"), help=FINAL_TOP_HELP)
    sweep.add_argument(
        "--warm-start",
        type=Path,
        default=setting_default("warm_start"),
        metavar="DIR",
        help="add the finished trials of an earlier sweep (same dataset and methods) to the new study before it starts, so TPE begins from them",
    )
    sweep.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    sweep.add_argument(
        "--config", type=Path, default=None, metavar="FILE", help="a sweep file (YAML or JSON, e.g. a sweep's sweep.json); flags given here override it"
    )
    sweep.add_argument("--print-config", action="store_true", help="print the resolved settings as a sweep file and exit without starting anything")
    _add_common(sweep)
    _add_cluster(sweep)

    best = sub.add_parser("best", help="print the best configuration per dataset and method of a finished sweep")
    best.add_argument("dir", type=Path, help="output folder of a finished sweep")
    best.add_argument("--json", action="store_true", help="print best.yaml's content as JSON")

    train = sub.add_parser("train", help="train one configuration (the loop a trial runs), without a sweep")
    train.add_argument("--dataset", default=setting_default("dataset"), help=DATASET_HELP)
    train.add_argument("--method", required=True, help=METHOD_HELP)
    train.add_argument("--epochs", type=_positive_int, default=setting_default("max_epochs"), help="default: a sweep's --max-epochs")
    train.add_argument("--lr", type=float, default=None, help="default: the method's recommended learning rate")
    train.add_argument("--batch-size", type=_positive_int, default=None, help="images per optimizer step; default: the method's recommended")
    train.add_argument("--out", type=Path, default=None, help="where to write metrics.jsonl, config.json, checkpoints")
    train.add_argument(
        "--precision",
        default=setting_default("precision"),
        choices=PRECISION_NAMES,
        help="compute precision of the frozen pass and the training step; auto: bf16 on GPUs that have it, fp16 on other GPUs, fp32 on CPUs",
    )
    _add_common(train)

    pre = sub.add_parser("preload", help="build the preload store of a method over a dataset, or list stores")
    pre.add_argument("--dataset", default=setting_default("dataset"), help=DATASET_HELP)
    pre.add_argument("--method", default="fpt_plus", help=METHOD_HELP)
    pre.add_argument("--list", action="store_true", help="list stores in the cache with their sizes")
    _add_common(pre)
    _add_cluster(pre)

    params = sub.add_parser("params", help="total and learnable parameters of a method at its recommended values (as train runs it)")
    params.add_argument("--method", required=True, help=METHOD_HELP)
    params.add_argument("--num-classes", type=_positive_int, default=5, help="outputs of the classification head")
    params.add_argument("--json", action="store_true", help="print one JSON object")
    _add_common(params)

    probe = sub.add_parser("probe", help="peak memory of one training step at the method's recommended values (as train runs it)")
    probe.add_argument("--method", required=True, help=METHOD_HELP)
    probe.add_argument("--batch-size", type=_positive_int, default=None, help="images in the probed step; default: the method's recommended")
    probe.add_argument("--num-classes", type=_positive_int, default=5, help="outputs of the classification head")
    probe.add_argument("--json", action="store_true", help="print one JSON object")
    _add_common(probe)

    spaces = sub.add_parser("spaces", help="search spaces and recommended points")
    spaces_sub = spaces.add_subparsers(dest="spaces_command", required=True, parser_class=_Parser)
    show = spaces_sub.add_parser("show", help="print a method's space and recommended starting point")
    show.add_argument("method", help=METHOD_HELP)
    show.add_argument("--dataset", default=None, help=SPACES_DATASET_HELP)
    show.add_argument("--fraction", type=float, default=None, help="label fraction in percent (1, 10, 100)")
    show.add_argument("--weights", default=None, help="LoRA-medical pretrained weights: mrm or cxr_mae")
    show.add_argument("--json", action="store_true", help="print one JSON object")

    final = sub.add_parser("final", help="retrain a finished sweep's best configuration with several seeds and test it once")
    final.add_argument("dir", type=Path, help="output folder of a finished sweep")
    final.add_argument("--seeds", type=int, default=setting_default("final_seeds"), help="number of seeds (seed, seed+1, ...)")
    final.add_argument("--top", type=int, default=None, help=FINAL_TOP_HELP + " (default: the sweep's --final-top)")
    final.add_argument("--per-method", action="store_true", help="also retrain each other method's best configuration")
    final.add_argument("--cache-dir", type=Path, default=None, help="preload cache (default: the sweep's)")

    report = sub.add_parser("report", help="write a report (Markdown or HTML with plots) of a finished sweep")
    report.add_argument("dir", type=Path, help="output folder of a finished sweep")
    report.add_argument("--format", choices=["md", "html"], default="md", help="Markdown or HTML; either shows the PNG plots written beside it")

    for name in ("resume", "extend", "dashboard", "sync", "export", "predict"):  # these modules import nothing heavy at the top
        importlib.import_module(MODULE_COMMANDS[name]).add_parser(sub)
    return parser


# Commands whose code lives beside what they drive: module.run(args), imported only when used
# (importing torch and Ray costs seconds; `medsweep --help` should not).
MODULE_COMMANDS = {
    "final": "medsweep.search.final",
    "report": "medsweep.search.report",
    "resume": "medsweep.search.resume",
    "extend": "medsweep.search.extend",
    "dashboard": "medsweep.search.dashboard",
    "sync": "medsweep.search.sync",
    "export": "medsweep.search.export_model",
    "predict": "medsweep.search.predict",
}


def _method_config(args: argparse.Namespace, method: str, **extra: Any) -> dict[str, Any]:
    return {"method": method, "backbone": args.backbone, "image_size": args.image_size, "seed": args.seed, **extra, **_set_pairs(args.set)}


def _run_config(args: argparse.Namespace, method: str, dataset: str | None = None, **extra: Any) -> dict[str, Any]:
    """The flat config ``train``, ``params`` and ``probe`` run: the sweep's recommended trial (the method's
    recommended values, the centre of its sweep space, with the sweep's :func:`run_defaults`), then the
    command's flags and ``--set`` values."""
    from medsweep.search.settings import run_defaults
    from medsweep.spaces import recommended

    epochs = getattr(args, "epochs", setting_default("max_epochs"))
    return {**recommended(method, dataset=dataset), **run_defaults(method, args.backbone, epochs), **_method_config(args, method, **extra)}


# `sweep` options whose dest is not the SweepSettings field they set; every other dest is the field's name.
_SWEEP_DESTS = {"preload_features": "no_preload", "early_stopping": "no_early_stopping", "fixed": "set"}


def _given_dests(argv: list[str] | None) -> set[str]:
    """The dests of the ``sweep`` options given on the command line (not defaulted): these override a ``--config`` file."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in subparsers.choices["sweep"]._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line parsed; for ``sweep``, ``args.given`` holds the dests given explicitly."""
    args = build_parser().parse_args(argv)
    if args.command == "sweep":
        args.given = _given_dests(argv)
    return args


def settings_from_args(args: argparse.Namespace) -> SweepSettings:
    """The sweep's settings: the ``--config`` file's, then every flag given on the command line
    (``--set`` values are added to the file's ``fixed``), then the defaults."""
    from medsweep.search.sweep_file import read_sweep_file

    cli: dict[str, Any] = dict(
        dataset=args.dataset,
        methods=args.methods or list(DEFAULT_METHODS),
        trials=args.trials,
        budget_hours=args.budget_hours,
        objective=args.objective,
        max_epochs=args.max_epochs,
        backbone=args.backbone,
        image_size=args.image_size,
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_trial=args.cpus_per_trial,
        workers=args.workers,
        cohort_size=args.cohort_size,
        wandb=args.wandb,
        tracker=args.tracker,
        seed=args.seed,
        out=args.out,
        cache_dir=args.cache_dir,
        address=args.address,
        grace_period=args.grace_period,
        fraction=args.fraction,
        preload_features=not args.no_preload,
        final_seeds=args.final_seeds,
        final_top=args.final_top,
        skip_bad_images=args.skip_bad_images,
        search=args.search,
        early_stopping=not args.no_early_stopping,
        fixed=_set_pairs(args.set),
        connect_timeout=args.connect_timeout,
        precision=args.precision,
        preload_batch_size=args.preload_batch_size,
        warm_start=args.warm_start,
    )
    given: set[str] = getattr(args, "given", set())  # set by parse_args
    if args.config is None:
        values = {key: value for key, value in cli.items() if key != "trials" or value is not None}
    else:
        values = read_sweep_file(args.config)
        overrides = {key: value for key, value in cli.items() if _SWEEP_DESTS.get(key, key) in given}
        values = {**values, **overrides, "fixed": {**values.get("fixed", {}), **overrides.get("fixed", {})}}
    if "trials" not in values:  # without --trials, --budget-hours alone is an unbounded search
        values["trials"] = DEFAULT_TRIALS if values.get("budget_hours") is None else None
    return SweepSettings(**values)


def cmd_sweep(args: argparse.Namespace) -> int:
    from medsweep.search.console import SweepConsole
    from medsweep.search.sweep import check_out, run_sweep  # torch and transformers: only for a sweep
    from medsweep.search.sweep_file import sweep_file_text

    settings = settings_from_args(args)
    if args.print_config:
        print(sweep_file_text(settings), end="")
        return 0
    check_out(settings.out, args.overwrite)  # before the dataset and Ray: refusing must write nothing
    run_sweep(settings, SweepConsole(quiet=args.quiet), overwrite=args.overwrite)
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    from medsweep.search.export import read_best
    from medsweep.trainables.config import NOT_HYPERPARAMETERS  # data, backbone, budget, placement

    best = read_best(args.dir)
    if args.json:
        print(json.dumps(best, indent=2, default=str))
        return 0
    for dataset, entry in best.items():
        print(f"{dataset}: best method {entry['best_method']}")
        for method, item in entry["per_method"].items():
            val, config = item["validation"], item["config"]
            searched = {k: v for k, v in config.items() if k not in NOT_HYPERPARAMETERS}
            print(f"  {method:<10} val AUC {val['best_val_auc']:.4f}  learnable {val.get('learnable_pct', float('nan')):.3g}%  trial {item['trial_id']}")
            # Every value at full precision, as `--set KEY=VALUE` (and a sweep file's `fixed`) take it.
            pairs = (f"{key}={json.dumps(value, separators=(',', ':')) if isinstance(value, list | dict) else value}" for key, value in searched.items())
            print(" " * 13 + " ".join(pairs))
        for method, statuses in entry.get("no_usable_trial", {}).items():
            print(f"  {method:<10} no usable trial ({statuses})")
        if entry.get("pareto_front"):
            trials = ", ".join(f"{item['trial_id']} {item['config'].get('method', '?')}" for item in entry["pareto_front"])
            print(f"  pareto front of {', '.join(entry.get('objectives', []))}: {trials}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:

    from medsweep.datasets import load_dataset
    from medsweep.search.console import SweepConsole, best_epoch_note, one_class_note
    from medsweep.search.out_paths import check_out_path
    from medsweep.trainables.loop import device_for_trial
    from medsweep.trainables.precision import resolve_precision
    from medsweep.trainables.runner import train_once

    if "precision" in _set_pairs(args.set):
        raise ConfigError("--set precision: the precision is a run setting; use --precision auto|fp32|bf16|fp16")
    if args.out is not None:
        check_out_path(args.out)  # before the dataset and the preload
    console = SweepConsole()
    spec = load_dataset(args.dataset, cache_dir=args.cache_dir, seed=args.seed, synthetic_size=args.image_size)
    console.dataset(spec)
    config = _run_config(args, args.method, dataset=spec.name)
    # Resolved here, on the device the loop trains on, so config.json records the precision that ran.
    precision = resolve_precision(args.precision, device_for_trial())
    given = {"batch_size": args.batch_size, "lr": args.lr}
    config.update(epochs=args.epochs, precision=precision, **{key: value for key, value in given.items() if value is not None})
    out = args.out or Path("runs") / f"{args.method}-{dt.datetime.now():%Y%m%d-%H%M%S}"

    def on_epoch(m: dict[str, Any]) -> None:
        console.console.print(
            f"epoch {m['epoch']:>3}  train_loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}  "
            f"val_auc {m['val_auc']:.4f}{one_class_note(m)}  val_acc {m['val_accuracy']:.3f}  ({m['epoch_seconds']:.1f} s)"
        )

    reports = train_once(spec, config, args.cache_dir, out, console.progress, lambda r: console.store_ready(args.method, r), on_epoch, args.skip_bad_images)
    last = reports[-1]  # its best: the best epoch that did not predict one class (not the highest AUC shown)
    console.console.print(f"best val_auc {last['best_val_auc']:.4f}{best_epoch_note(last)}; config, metrics.jsonl and checkpoints in {out}")
    return 0


def store_line(store: Any) -> str:
    """One line of ``medsweep preload --list``: what tells stores apart (method, dataset, backbone, image size,
    precision of the frozen pass: every part of the key a user chooses) and when it was written."""
    head = f"{store.key}  {store.size_bytes() / 2**20:8.1f} MB"
    if store.is_damaged():
        return f"{head}  damaged (the next `medsweep preload` or sweep of the same inputs repairs it)"
    if not store.is_complete():
        return f"{head}  incomplete (resume with `medsweep preload`)"
    meta = store.meta
    parts = meta.get("key_parts", {})
    rows = sum(s["rows"] for s in meta["splits"].values())
    size = parts.get("method_frozen_path", {}).get("image_size")
    stored = "".join(f" + {name.removesuffix('_pixel_values')} {px} px" for name, px in parts.get("images", {}).items())
    written = dt.datetime.fromtimestamp(store.meta_path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    return (
        f"{head}  {meta.get('method')} on {meta.get('dataset')} (manifest {parts.get('dataset', '?')}, {rows} images), "
        f"{parts.get('backbone', '?')}" + (f" at {size} px" if size else "") + f"{stored}, {parts.get('frozen_precision', '?')}, "
        f"{store.bytes_per_image() / 1024:.1f} KiB/image, written {written}"
    )


def cmd_preload(args: argparse.Namespace) -> int:
    from medsweep.datasets.store import list_stores

    if args.list:
        stores = list_stores(args.cache_dir)
        if not stores:
            print(f"no preload stores under {args.cache_dir}")
        for store in stores:
            print(store_line(store))
        if stores:
            print(f"a store no sweep needs any more can be deleted: rm -r {Path(args.cache_dir) / 'stores'}/KEY")
        return 0
    from medsweep.datasets import load_dataset
    from medsweep.search.console import SweepConsole
    from medsweep.search.frozen_pass import preload_on_cluster
    from medsweep.search.tuning import join_ray
    from medsweep.trainables.preload import check_cache_dir

    console = SweepConsole()
    spec = load_dataset(args.dataset, cache_dir=args.cache_dir, seed=args.seed, synthetic_size=args.image_size)
    console.dataset(spec)
    config = {"method": args.method, **_method_config(args, args.method, num_classes=spec.num_classes, task=spec.task)}
    check_cache_dir(args.cache_dir)  # before Ray: an unwritable cache is one line at once
    join_ray(args.address, args.connect_timeout)
    result = preload_on_cluster(
        spec,
        config,
        args.cache_dir,
        batch_size=args.preload_batch_size,
        precision=args.precision,
        progress=console.progress,
        skip_bad_images=args.skip_bad_images,
        on_wait=console.preload_waiting,
    )
    console.store_ready(args.method, result)
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from medsweep.trainables.methods import build_method

    method = build_method(args.method, _run_config(args, args.method, num_classes=args.num_classes))
    learnable, total = method.parameter_counts()
    report = {
        "method": args.method,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "learnable": learnable,
        "total": total,
        "learnable_pct": 100 * learnable / total,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.method} on {args.backbone} at {args.image_size} px: {learnable:,} learnable of {total:,} parameters ({report['learnable_pct']:.3f}%)")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from medsweep.trainables.probe import probe_memory

    config = _run_config(args, args.method, num_classes=args.num_classes)
    batch_size = args.batch_size or int(config["batch_size"])
    report = probe_memory(config, batch_size)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.method} on {args.backbone} at {args.image_size} px, batch {batch_size}: peak {report['peak_mb']:.3g} MB ({report['device']})")
    return 0


def cmd_spaces(args: argparse.Namespace) -> int:
    from medsweep.spaces import describe, format_describe

    desc = describe(args.method, dataset=args.dataset, fraction=args.fraction, weights=args.weights)
    print(json.dumps(desc, indent=2, default=str) if args.json else format_describe(desc))
    return 0


COMMANDS = {
    "sweep": cmd_sweep,
    "best": cmd_best,
    "train": cmd_train,
    "preload": cmd_preload,
    "params": cmd_params,
    "probe": cmd_probe,
    "spaces": cmd_spaces,
}


# OS errors that mean "this folder cannot take what medsweep writes": the user's to fix, not a bug.
UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def unwritable_line(error: OSError) -> str:
    """One line for a folder medsweep cannot write (an output folder, a log): which file, why, and the fix."""
    fix = "free space there" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a folder you can write to"
    return f"cannot write {error.filename or 'a file'}: {error.strerror}; {fix} (--out, --cache-dir), then run again"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", RAY_LINES_NOT_SHOWN)
    try:
        if args.command in MODULE_COMMANDS:
            return importlib.import_module(MODULE_COMMANDS[args.command]).run(args)
        return COMMANDS[args.command](args)
    except MedsweepError as error:
        print(f"medsweep: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in UNWRITABLE:
            raise
        print(f"medsweep: error: {unwritable_line(error)}", file=sys.stderr)
        return 2
    except SweepInterrupted as interrupted:
        print(f"medsweep: {interrupted}", file=sys.stderr)
        if interrupted.ray_lost:  # Ray's shutdown at exit would wait 60 s on its lost GCS, then abort
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(interrupted.exit_code)
        return interrupted.exit_code
    except KeyboardInterrupt:
        print("medsweep: interrupted; finished work is kept (preload shards, trial checkpoints)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
