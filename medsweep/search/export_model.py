"""``medsweep export``: a finished sweep's model as a standalone folder (:mod:`medsweep.trainables.model_dir`).

The weights are the final retrain's (``final.json``: the chosen seed's best-validation
checkpoint), or, where ``final`` was skipped, the search's best trial's: its Tune
checkpoint holds the last epoch, and the loop state inside it the best epoch's
learnable weights, which are what the leaderboard ranked.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from medsweep.errors import ConfigError
from medsweep.search.out_paths import check_out_path, write_error
from medsweep.search.settings import load_settings
from medsweep.search.study import BEST_YAML, FINAL_JSON, SETTINGS_FILE, experiment_dir, not_finished


def add_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="write a finished sweep's model as a standalone folder (medsweep.load_model, medsweep predict)")
    export.add_argument("dir", type=Path, help="output folder of a finished sweep")
    export.add_argument("--out", type=Path, required=True, help="the model folder to write")
    export.add_argument("--method", default=None, help="default: the final retrain's (else the search's) best method")
    export.add_argument("--seed", type=int, default=None, help="which final seed's weights (default: the first usable one)")
    export.add_argument("--with-backbone", action="store_true", help="copy the frozen backbone's weights into the folder (else a reference)")
    export.add_argument("--keep-adapter", action="store_true", help="LoRA: keep the adapter beside the backbone instead of merging it in")


def _single_dataset(document: dict[str, Any], file: Path) -> tuple[str, dict[str, Any]]:
    if len(document) != 1:
        raise ConfigError(f"{file} holds {len(document)} datasets ({', '.join(document) or 'none'}); export expects one")
    return next(iter(document.items()))


def _pick_method(entry: dict[str, Any], methods: dict[str, Any], wanted: str | None, file: Path) -> str:
    name = wanted or entry["best_method"]
    if name not in methods:
        raise ConfigError(f"{file} has no method {name!r}; available: {', '.join(methods) or 'none'} (--method)")
    return name


def dataset_arguments(sweep: Path) -> dict[str, Any]:
    """The arguments that load the sweep's dataset with its own split (``load_dataset``'s ``seed`` and
    ``synthetic_size``), so ``medsweep predict --dataset`` on the model reads the images the sweep
    tested; empty for a folder without ``sweep.json``."""
    if not (sweep / SETTINGS_FILE).is_file():
        return {}
    settings = load_settings(sweep)
    return {"seed": settings.seed, "synthetic_size": settings.image_size}


def from_final(sweep: Path, method: str | None, seed: int | None) -> dict[str, Any]:
    """What to export from final.json: config, checkpoint folder, classes, metrics."""
    file = sweep / FINAL_JSON
    dataset, entry = _single_dataset(json.loads(file.read_text()), file)
    name = _pick_method(entry, entry["methods"], method, file)
    seeds = [s for s in entry["methods"][name]["seeds"] if s.get("checkpoint")]
    chosen = [s for s in seeds if seed is None or s["seed"] == seed]
    if not chosen:
        raise ConfigError(f"{file}: method {name!r} has no usable checkpoint for seed {seed}; seeds with one: {[s['seed'] for s in seeds]} (--seed)")
    run = chosen[0]
    checkpoint = sweep / run["checkpoint"]
    config = json.loads((checkpoint.parent / "config.json").read_text())  # the run's own: seed, num_classes, task
    return {
        "dataset": dataset,
        "config": config,
        "checkpoint": checkpoint,
        "classes": entry["classes"],
        "metrics": {"val": run["val"], "test": run["test"]},
        "source": {"sweep": str(sweep.resolve()), "from": "final", "seed": run["seed"], "checkpoint": run["checkpoint"]},
    }


def from_best_trial(sweep: Path, method: str | None) -> dict[str, Any]:
    """What to export from best.yaml when final was skipped: the best trial's Tune checkpoint."""
    from medsweep.search.export import read_best

    file = sweep / BEST_YAML
    dataset, entry = _single_dataset(read_best(sweep), file)
    name = _pick_method(entry, entry["per_method"], method, file)
    item = entry["per_method"][name]
    trial_dir = experiment_dir(sweep) / f"trial-{item['trial_id']}"
    checkpoints = sorted(trial_dir.glob("checkpoint_*"))
    if not checkpoints:
        again = f"run `medsweep final {shlex.quote(str(sweep))}` and export again"
        raise ConfigError(f"trial {item['trial_id']} of {sweep} has no checkpoint under {trial_dir}; {again}")
    config = {**item["config"], "num_classes": len(entry["classes"]), "task": entry["task"]}
    return {
        "dataset": dataset,
        "config": config,
        "checkpoint": checkpoints[-1],
        "classes": entry["classes"],
        "metrics": {"val": item["validation"], "test": None},
        "source": {"sweep": str(sweep.resolve()), "from": "best trial", "trial_id": item["trial_id"], "checkpoint": str(checkpoints[-1].relative_to(sweep))},
    }


def export_model(sweep: Path, out: Path, method: str | None = None, seed: int | None = None, with_backbone: bool = False, keep_adapter: bool = False) -> Path:
    """Write the model folder ``out`` from the finished sweep at ``sweep``; returns ``out``."""
    import torch

    from medsweep.trainables.loop import CHECKPOINT_FILE, load_trained
    from medsweep.trainables.model_dir import write_model_dir

    sweep = Path(sweep)
    if (sweep / FINAL_JSON).is_file():
        chosen = from_final(sweep, method, seed)
    elif (sweep / BEST_YAML).is_file():
        if seed is not None:
            raise ConfigError(f"{sweep} has no final retrain ({FINAL_JSON}), so no seeds; drop --seed or run `medsweep final {shlex.quote(str(sweep))}`")
        chosen = from_best_trial(sweep, method)
    else:
        raise not_finished(sweep, BEST_YAML)
    config = chosen["config"]
    trained = load_trained(config["method"], config, chosen["checkpoint"])
    state = torch.load(Path(chosen["checkpoint"]) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)["state"]
    if chosen["source"]["from"] == "best trial" and state.best_state:  # a Tune checkpoint is the last epoch's
        trained.load_state_dict(state.best_state, strict=False)
    try:
        return write_model_dir(
            out,
            trained,
            config,
            chosen["classes"],
            metrics=chosen["metrics"],
            source={**chosen["source"], "dataset": chosen["dataset"], "dataset_arguments": dataset_arguments(sweep)},
            epochs_run=state.epoch,
            with_backbone=with_backbone,
            keep_adapter=keep_adapter,
        )
    except OSError as error:  # a full or read-only disk: each file in the folder is whole or absent (write_model_dir)
        raise write_error(error, out) from None


def run(args: argparse.Namespace) -> int:
    check_out_path(args.out)  # before loading anything
    out = export_model(args.dir, args.out, args.method, args.seed, args.with_backbone, args.keep_adapter)
    print(f"model written to {out}; load it with medsweep.load_model({str(out)!r}) or run `medsweep predict {shlex.quote(str(out))} --images PATH`")
    return 0
