"""``manifest.json``: what a sweep ran with, so its numbers can be reproduced or questioned later.

Written by ``medsweep sweep`` once Ray is up and every preload store is known
(the store keys are the manifest's point: they name the exact tensors the
trials read), before the search starts, so an interrupted sweep has one too.
It holds the medsweep version (and the git commit when medsweep runs from a
checkout), Python and the versions of the packages that change results, the
devices (the Ray cluster's CPUs and GPUs, the driver's CUDA devices), the
dataset's manifest hash (its files) and membership hash (its images and
labels), split sizes and the classes a split's AUC leaves out, each method's
store key, the seeds and the command line.

``medsweep resume`` and ``extend`` compare the dataset with it
(:func:`check_same_dataset`): other files rebuild the stores, other images or
labels are refused; ``medsweep final`` retrains on the dataset as it is and
says how it differs.

``medsweep resume`` keeps the original and appends a record of its own to
``resumes`` (when, command line, versions, devices, store keys): a resume may
run on other machines or after an upgrade, and the first run's record must
not be lost. ``medsweep report`` shows a compact "Reproducibility" section
from it (:mod:`medsweep.search.report`).
"""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from medsweep.datasets.spec import SPLITS, DatasetSpec
from medsweep.datasets.store import read_json, write_atomically
from medsweep.errors import ConfigError
from medsweep.search.settings import SweepSettings
from medsweep.search.study import MANIFEST_JSON

# The packages whose versions change what a sweep computes or records.
PACKAGES = ("torch", "ray", "optuna", "transformers", "peft", "pyarrow", "wandb", "mlflow-skinny")  # mlflow: only with --tracker mlflow


def write_manifest(settings: SweepSettings, spec: DatasetSpec, stores: dict[str, Any]) -> Path:
    """Write ``manifest.json`` in ``settings.out`` (``stores``: {method: PreloadResult}); a resume appends to ``resumes``.

    Returns its path.
    """
    path = settings.out / MANIFEST_JSON
    run = _run_record(stores)
    previous = read_json(path) if path.is_file() else None
    if previous is not None:
        document = {**previous, "resumes": [*previous.get("resumes", []), run]}
    else:
        document = {
            **run,
            "dataset": {
                "name": spec.name,
                "root": str(spec.root),
                "task": spec.task,
                "classes": list(spec.classes),
                "manifest_hash": spec.manifest_hash(),
                "membership_hash": spec.membership_hash(),
                "splits": {split: len(spec.splits.get(split, [])) for split in SPLITS},
                "auc_notes": spec.auc_notes(),  # classes a split's AUC leaves out
            },
            "seeds": {
                "search": settings.seed,
                "final": list(range(settings.seed, settings.seed + settings.final_seeds)),
            },
            "resumes": [],
        }
    write_atomically(path, json.dumps(document, indent=2, default=str))
    return path


FILES_CHANGED = (
    "the dataset's files changed since the sweep started (sizes or modification times: edited, or copied "
    "without their times); its stores are rebuilt from them"
)


def dataset_change(out: Path, spec: DatasetSpec) -> tuple[bool, str] | None:
    """How ``spec`` differs from the dataset the sweep in ``out`` started on (its ``manifest.json``): None when
    it is the same (or the sweep has no manifest); else whether its images and labels are the same (only their
    files' sizes or times changed: an edit in place, a copy without file times), and what differs."""
    then = (read_manifest(out) or {}).get("dataset") or {}
    if not then.get("manifest_hash") or then["manifest_hash"] == spec.manifest_hash():
        return None
    counts = {split: len(spec.splits.get(split, [])) for split in SPLITS}
    if "membership_hash" in then:
        same_images = then["membership_hash"] == spec.membership_hash()
    else:  # a manifest from before membership hashes: its classes and split sizes
        same_images = then.get("classes") == spec.classes and then.get("splits") == counts
    if same_images:
        return True, "the same images and labels in files of other sizes or times"
    if then.get("classes") != spec.classes:
        return False, f"classes {', '.join(then.get('classes') or [])} then, {', '.join(spec.classes)} now"
    sizes = then.get("splits") or {}
    moved = [f"{split} {sizes[split]} images then, {n} now" for split, n in counts.items() if split in sizes and sizes[split] != n]
    return False, ", ".join(moved) or "as many images, but other files or labels"


def check_same_dataset(out: Path, spec: DatasetSpec, dataset_arg: str) -> str | None:
    """For ``medsweep resume`` and ``extend``, which add trials to the sweep's: None when the dataset is the one
    the sweep started on; a notice when only its files changed (the stores are rebuilt and the sweep's trials go
    on with them); a one-line :class:`ConfigError` when its images, labels or classes differ, since new trials
    could not be compared with the sweep's."""
    change = dataset_change(out, spec)
    if change is None:
        return None
    same_images, what = change
    if same_images:
        return f"{FILES_CHANGED} and the sweep's trials go on with them"
    raise ConfigError(
        f"the dataset {dataset_arg} is not the one this sweep started on ({what}): its trials were scored on the "
        f"images as they were; put those back, or start a new sweep on it (`--warm-start {shlex.quote(str(out))}` begins from this one's trials)"
    )


def store_keys_used(out: Path) -> dict[str, str]:
    """Every preload store key the sweep's runs (its start and each resume) read, to its method."""
    manifest = read_manifest(out) or {}
    runs = [manifest, *manifest.get("resumes", [])]
    return {key: method for run in runs for method, key in (run.get("stores") or {}).items()}


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The sweep's manifest, or None (a sweep from before manifests, or an unreadable file)."""
    path = Path(out) / MANIFEST_JSON
    return read_json(path) if path.is_file() else None


def _run_record(stores: dict[str, Any]) -> dict[str, Any]:
    """What one run of the driver (a sweep or a resume) ran with."""
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
        "medsweep": {"version": _version("medsweep"), **_git_commit()},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "devices": _devices(),
        "stores": {method: result.store.key for method, result in stores.items()},
    }


def package_versions() -> dict[str, str | None]:
    """The installed version of each of :data:`PACKAGES` (None: not installed)."""
    return {name: _version(name) for name in PACKAGES}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> dict[str, Any]:
    """``{"git_commit": ..., "git_dirty": ...}`` when medsweep runs from a git checkout, else nothing.

    Asked only of the folder holding the package: the user's working directory
    may be some other repository, and an installed wheel has no commit to give.
    """
    package = Path(__file__).resolve().parents[1]  # medsweep/, wherever it was imported from
    if not (package.parent / ".git").exists():  # a worktree's .git is a file, a clone's a folder
        return {}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=package, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):  # no git on PATH, a broken checkout: no commit, no error
        return {}
    return {"git_commit": commit.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def _devices() -> dict[str, Any]:
    """The Ray cluster's CPUs and GPUs per node (with each node's accelerator type) and the driver's CUDA devices."""
    import ray  # the sweep has started Ray by now
    import torch

    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        accelerators = [key.removeprefix("accelerator_type:") for key in resources if key.startswith("accelerator_type:")]
        nodes.append(
            {
                "host": node.get("NodeManagerHostname"),
                "cpus": resources.get("CPU", 0),
                "gpus": resources.get("GPU", 0),
                "accelerator": accelerators[0] if accelerators else None,
            }
        )
    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"nodes": nodes, "driver_cuda": cuda}
