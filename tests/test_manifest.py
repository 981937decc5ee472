"""manifest.json: what a real sweep ran with, a resume's record appended, and the report's section from it."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest

from medsweep.datasets.spec import DatasetSpec, Sample
from medsweep.datasets.store import PreloadStore
from medsweep.errors import ConfigError
from medsweep.search.manifest import PACKAGES, check_same_dataset, dataset_change, read_manifest, store_keys_used, write_manifest
from medsweep.search.report import reproducibility_blocks, write_report
from medsweep.search.settings import load_settings, sweep_dataset
from medsweep.search.study import MANIFEST_JSON
from medsweep.trainables.preload import PreloadResult


@pytest.mark.slow
def test_a_sweep_writes_a_manifest_of_versions_devices_data_stores_seeds_and_command(tiny_sweep):
    out, settings, _ = tiny_sweep
    manifest = json.loads((out / MANIFEST_JSON).read_text())
    assert {"started", "command", "medsweep", "python", "platform", "packages", "devices", "stores", "dataset", "seeds"} <= set(manifest)
    assert manifest["packages"] == {name: metadata.version(name) for name in PACKAGES}
    assert manifest["medsweep"]["version"] == metadata.version("medsweep")
    checkout = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True, check=True).stdout.strip()
    assert manifest["medsweep"]["git_commit"] == head  # the tests run from a checkout
    assert manifest["python"] == ".".join(map(str, sys.version_info[:3]))
    assert manifest["command"] == shlex.join(sys.argv)
    assert manifest["devices"]["nodes"] and all(node["cpus"] > 0 for node in manifest["devices"]["nodes"])
    spec = sweep_dataset(settings)
    assert manifest["dataset"]["manifest_hash"] == spec.manifest_hash()
    assert manifest["dataset"]["splits"] == {split: len(samples) for split, samples in spec.splits.items()}
    assert manifest["dataset"]["auc_notes"] == spec.auc_notes() == []  # every synthetic class in every split
    assert manifest["seeds"] == {"search": settings.seed, "final": []}  # the tiny sweep skips the final retrain
    assert manifest["resumes"] == []
    # The store keys are the ones the trials read (Tune's record of each trial's config), and the stores are in the cache.
    params = [json.loads(path.read_text()) for path in (out / "ray" / "tune").glob("trial-*/params.json")]
    used = {config["method"]: config["store_key"] for config in params}
    assert len(params) == settings.trials and set(used) == set(pd.read_parquet(out / "leaderboard.parquet")["method"])
    assert set(manifest["stores"]) == set(settings.methods) and {m: manifest["stores"][m] for m in used} == used
    assert all(PreloadStore(settings.cache_dir / "stores" / key).is_complete() for key in used.values())


@pytest.mark.slow
def test_a_resume_appends_its_record_and_keeps_the_sweeps(tiny_sweep, tmp_path):
    source, _, _ = tiny_sweep
    shutil.copy(source / MANIFEST_JSON, tmp_path / MANIFEST_JSON)
    shutil.copy(source / "sweep.json", tmp_path / "sweep.json")
    settings = load_settings(tmp_path)
    settings.out = tmp_path
    first = read_manifest(tmp_path)
    assert first is not None
    stores = {method: PreloadResult(PreloadStore(settings.cache_dir / "stores" / key), True, 0.0, 0) for method, key in first["stores"].items()}
    write_manifest(settings, sweep_dataset(settings), stores)
    write_manifest(settings, sweep_dataset(settings), stores)
    second = read_manifest(tmp_path)
    assert second is not None
    assert {k: v for k, v in second.items() if k != "resumes"} == {k: v for k, v in first.items() if k != "resumes"}
    assert len(second["resumes"]) == 2
    assert second["resumes"][0]["stores"] == first["stores"] and second["resumes"][0]["command"] == shlex.join(sys.argv)


@pytest.mark.slow
def test_the_report_shows_the_manifest(tiny_sweep):
    out, _, _ = tiny_sweep
    manifest = json.loads((out / MANIFEST_JSON).read_text())
    text = write_report(out).read_text()
    section = text[text.index("## Reproducibility") :]
    assert manifest["dataset"]["manifest_hash"] in section
    assert all(key in section for key in manifest["stores"].values())
    assert f"torch {manifest['packages']['torch']}" in section and manifest["medsweep"]["git_commit"][:12] in section


def test_a_sweep_without_a_manifest_says_so_in_the_report(tmp_path):
    heading, note = reproducibility_blocks(tmp_path)
    assert heading.text == "Reproducibility" and f"No readable {MANIFEST_JSON}" in note.text


def test_the_report_names_the_classes_a_splits_auc_leaves_out(tmp_path):
    note = "val: no image has effusion; its AUC averages the other 13 labels"
    dataset = {"name": "nih", "manifest_hash": "0123abcd", "splits": {"train": 9, "val": 3, "test": 3}, "auc_notes": [note]}
    (tmp_path / MANIFEST_JSON).write_text(json.dumps({"dataset": dataset, "seeds": {"search": 0, "final": []}}))
    table = reproducibility_blocks(tmp_path)[-1].table
    assert table is not None
    assert dict(zip(table[""], table["value"], strict=True))["dataset"] == f"nih: manifest hash 0123abcd, train 9, val 3, test 3; {note}"


def _spec(root: Path, labels: dict[str, list[int]], classes: tuple[str, ...] = ("a", "b")) -> DatasetSpec:
    splits = {split: [Sample(root / f"{split}{i}.png", label) for i, label in enumerate(values)] for split, values in labels.items()}
    for sample in (sample for samples in splits.values() for sample in samples):
        if not sample.path.exists():
            sample.path.write_bytes(b"png")
    return DatasetSpec("d", root, "multiclass", list(classes), splits)


def _started_on(out: Path, spec: DatasetSpec, manifest_hash: str, legacy: bool = False) -> None:
    """The manifest of a sweep started on ``spec`` when its files hashed to ``manifest_hash`` (``legacy``: written
    before manifests held a membership hash)."""
    entry = {"classes": spec.classes, "manifest_hash": manifest_hash, "splits": {split: len(samples) for split, samples in spec.splits.items()}}
    if not legacy:
        entry["membership_hash"] = spec.membership_hash()
    (out / MANIFEST_JSON).write_text(json.dumps({"dataset": entry, "stores": {"linear": "k1"}, "resumes": [{"stores": {"linear": "k2"}}]}))


def test_a_resume_goes_on_over_files_that_changed_and_refuses_other_images_or_labels(tmp_path):
    """A resume once failed every restored trial with a KeyError after an image was edited (the store key changed),
    and would have mixed trials of two datasets after one was added or relabeled."""
    root, out = tmp_path / "data", tmp_path / "sweep"
    root.mkdir(), out.mkdir()
    labels = {"train": [0, 1, 0, 1], "val": [0, 1], "test": [1, 0]}
    spec = _spec(root, labels)
    first_files = spec.manifest_hash()
    _started_on(out, spec, first_files)
    assert check_same_dataset(out, spec, "data") is None
    assert check_same_dataset(tmp_path / "no-manifest", spec, "data") is None
    assert store_keys_used(out) == {"k1": "linear", "k2": "linear"}

    (root / "val0.png").write_bytes(b"edited png")
    assert "files changed since the sweep started" in str(check_same_dataset(out, _spec(root, labels), "data"))
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)  # a copy elsewhere: other paths (and times, copied without them), the same images below its root
    assert "files changed" in str(check_same_dataset(out, _spec(moved, labels), "data"))

    with pytest.raises(ConfigError, match=r"^the dataset data is not the one this sweep started on \(val 2 images then, 3 now\): .*--warm-start"):
        check_same_dataset(out, _spec(root, {**labels, "val": [0, 1, 1]}), "data")
    assert dataset_change(out, _spec(root, {**labels, "val": [1, 0, 1]})) == (False, "val 2 images then, 3 now")  # what final says
    with pytest.raises(ConfigError, match=r"\(as many images, but other files or labels\)"):
        check_same_dataset(out, _spec(root, {**labels, "train": [1, 1, 0, 1]}), "data")
    with pytest.raises(ConfigError, match=r"\(classes a, b then, a, c now\)"):
        check_same_dataset(out, _spec(root, labels, ("a", "c")), "data")
    _started_on(out, spec, first_files, legacy=True)  # a manifest from before membership hashes: sizes and classes
    assert "files changed" in str(check_same_dataset(out, _spec(root, labels), "data"))
    with pytest.raises(ConfigError, match=r"val 2 images then, 1 now"):
        check_same_dataset(out, _spec(root, {**labels, "val": [0]}), "data")
