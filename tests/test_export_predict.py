"""Take the model home: ``medsweep export`` -> ``medsweep.load_model`` / ``medsweep predict``.

Each method is retrained by the real ``final`` step (``retrain_best`` over a hand-made best.yaml, no
Ray), exported with the real command, loaded back with no sweep folder in reach, and compared with
what the final retrain itself computes on the test split. The stores hold images only (no preloaded
features), so the final's test logits come from the same float32 forward as the loaded model's:
they agree to 1e-5 (merged LoRA: 1e-4, the merge adds ``B A`` into ``W`` in another order).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import medsweep
from medsweep.cli import main
from medsweep.datasets.store import INDEX, decode_columns
from medsweep.errors import ConfigError
from medsweep.search.final import retrain_best
from medsweep.search.predict import Prediction, write_csv
from medsweep.search.settings import SweepSettings, load_settings
from medsweep.search.study import FINAL_JSON
from medsweep.spaces import recommended
from medsweep.trainables.backbones import build_backbone
from medsweep.trainables.loop import load_trained, predict
from medsweep.trainables.methods import build_method
from medsweep.trainables.metrics import classification_metrics
from medsweep.trainables.model_dir import write_model_dir
from medsweep.trainables.preload import preload
from medsweep.trainables.store_io import StoreIO

EXACT = 1e-5  # same float32 forward on the same pixels
MERGED = 1e-4  # LoRA folded into W: the same sums in another order
METHODS = ("fpt_plus", "lora", "linear", "cdtm")


def _config(method: str) -> dict:
    config = {**recommended(method), "method": method, "backbone": "vit-tiny", "image_size": 64, "seed": 0}
    config.update(epochs=2, lr=0.01, warmup_epochs=0, batch_size=16)
    if method == "fpt_plus":
        config["side_reduction"] = 2  # vit-tiny's 32 wide, 4 heads
    return config


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def finals(tmp_path_factory, synthetic_spec, cache) -> dict[str, Path]:
    """One finished sweep folder per method: best.yaml by hand, then the real final retrain (1 seed)."""
    folders = {}
    for method in METHODS:
        folder = tmp_path_factory.mktemp(f"sweep-{method}")
        entry = {"trial_id": f"{method}0001", "config": _config(method), "validation": {"best_val_auc": 0.7}}
        best = {"task": synthetic_spec.task, "classes": synthetic_spec.classes, "best_method": method, "best": entry, "per_method": {method: entry}}
        (folder / "best.yaml").write_text(yaml.safe_dump({synthetic_spec.name: best}))
        settings = SweepSettings(methods=[method], backbone="vit-tiny", image_size=64, out=folder, cache_dir=cache, preload_features=False)
        retrain_best(folder, synthetic_spec, settings, seeds=1)
        folders[method] = folder
    return folders


def _final_test(folder: Path, synthetic_spec, cache: Path):
    """The final retrain's test logits for its seed, the test images as its store holds them, and their paths."""
    document = json.loads((folder / FINAL_JSON).read_text())[synthetic_spec.name]
    method = document["best_method"]
    seed = document["methods"][method]["seeds"][0]
    checkpoint = folder / seed["checkpoint"]
    config = json.loads((checkpoint.parent / "config.json").read_text())
    trained = load_trained(method, config, checkpoint)
    store = preload(synthetic_spec, trained, cache, with_features=False).store  # the store final used (reused)
    _, logits, _ = predict(trained, StoreIO(store), "test")
    images: dict[str, list[np.ndarray]] = {}
    order: list[int] = []
    for arrays in StoreIO(store).batches("test", 64, epoch=0, shuffle=False):
        decoded = decode_columns(arrays, store.columns)
        order.extend(int(i) for i in arrays[INDEX])
        for name in trained.image_inputs():
            images.setdefault(name, []).append(decoded[name])
    pictures = {name: torch.from_numpy(np.concatenate(parts)).float() / 255.0 for name, parts in images.items()}
    paths = [synthetic_spec.splits["test"][i].path for i in order]
    return logits, pictures, paths, seed


def _export(folder: Path, out: Path, *flags: str) -> Path:
    assert main(["export", str(folder), "--out", str(out), *flags]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_exported_model_gives_the_final_retrains_test_logits(method, finals, synthetic_spec, cache, tmp_path):
    logits, pictures, paths, _ = _final_test(finals[method], synthetic_spec, cache)
    model_dir = _export(finals[method], tmp_path / "model")
    moved = shutil.move(finals[method], tmp_path / "elsewhere")  # no sweep folder in reach
    try:
        model = medsweep.load_model(model_dir)
        assert isinstance(model, torch.nn.Module) and model.class_names == synthetic_spec.classes
        with torch.no_grad():
            loaded = model(pictures).numpy()
            from_files = model({n: torch.stack([model.read_image(p)[n] for p in paths]) for n in pictures}).numpy()
        tolerance = MERGED if method == "lora" else EXACT
        np.testing.assert_allclose(loaded, logits, atol=tolerance, rtol=0)
        np.testing.assert_allclose(from_files, logits, atol=tolerance, rtol=0)  # files decode to the stored pixels
    finally:
        shutil.move(moved, finals[method])


@pytest.mark.slow
def test_lora_adapter_and_merged_exports_agree(finals, synthetic_spec, cache, tmp_path):
    logits, pictures, _, _ = _final_test(finals["lora"], synthetic_spec, cache)
    merged = medsweep.load_model(_export(finals["lora"], tmp_path / "merged"))
    adapter = medsweep.load_model(_export(finals["lora"], tmp_path / "adapter", "--keep-adapter"))
    assert json.loads((tmp_path / "merged" / "model.json").read_text())["adapters"] == "merged"
    assert not any("lora_" in name for name in merged.state_dict()) and any("lora_" in name for name in adapter.state_dict())
    with torch.no_grad():
        np.testing.assert_allclose(adapter(pictures).numpy(), logits, atol=EXACT, rtol=0)
        np.testing.assert_allclose(merged(pictures).numpy(), adapter(pictures).numpy(), atol=MERGED, rtol=0)


@pytest.mark.slow
def test_with_backbone_the_folder_needs_no_backbone_reference(finals, synthetic_spec, cache, tmp_path):
    """--with-backbone: the frozen weights travel in the folder and are what the model reads."""
    logits, pictures, _, _ = _final_test(finals["fpt_plus"], synthetic_spec, cache)
    model_dir = _export(finals["fpt_plus"], tmp_path / "model", "--with-backbone")
    info = json.loads((model_dir / "model.json").read_text())
    assert info["backbone"] == {"kind": "registered", "name": "vit-tiny", "included": "backbone"}
    final = json.loads((finals["fpt_plus"] / FINAL_JSON).read_text())[synthetic_spec.name]["methods"]["fpt_plus"]
    assert info["metrics"]["test"] == final["seeds"][0]["test"]
    with torch.no_grad():
        np.testing.assert_allclose(medsweep.load_model(model_dir)(pictures).numpy(), logits, atol=EXACT, rtol=0)


@pytest.mark.slow
def test_predict_csv_on_the_test_split_gives_final_json_auc(finals, synthetic_spec, synthetic_root, tmp_path):
    model_dir = _export(finals["linear"], tmp_path / "model")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(model_dir), "--dataset", str(synthetic_root), "--split", "test", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    classes = synthetic_spec.classes
    assert list(rows[0]) == ["path", *(f"prob_{c}" for c in classes), "predicted", "error"]
    assert [r["path"] for r in rows] == [str(s.path) for s in synthetic_spec.splits["test"]]
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert [r["predicted"] for r in rows] == [classes[i] for i in probs.argmax(axis=1)]
    labels = np.array([s.label for s in synthetic_spec.splits["test"]])
    auc = classification_metrics(np.log(probs), labels, synthetic_spec.task)["auc"]
    final = json.loads((finals["linear"] / FINAL_JSON).read_text())[synthetic_spec.name]["methods"]["linear"]["seeds"][0]["test"]["auc"]
    assert auc == pytest.approx(final, abs=1e-6)


@pytest.mark.slow
def test_predict_reports_a_bad_image_per_row_or_stops_with_strict(finals, synthetic_spec, tmp_path, capsys):
    model_dir = _export(finals["linear"], tmp_path / "model")
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(synthetic_spec.splits["test"][0].path, folder / "good.png")
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(model_dir), "--images", str(folder), "--out", str(out)]) == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert rows["good.png"]["error"] == "" and rows["good.png"]["predicted"] in synthetic_spec.classes
    assert "broken.png" in rows["broken.png"]["error"] and rows["broken.png"]["predicted"] == ""
    capsys.readouterr()
    assert main(["predict", str(model_dir), "--images", str(folder), "--out", str(out), "--strict"]) == 2
    assert "broken.png" in capsys.readouterr().err
    # An --out that cannot be written: one line before predicting (a folder, a path under a file), or after it
    # where only the file system says no (/proc); the CSV written before is left as it was.
    written = out.read_bytes()
    for bad, needle in ((tmp_path, "is a folder; pass the name of the file to write"), (out / "p.csv", "is a file, not a folder")):
        assert main(["predict", str(model_dir), "--images", str(folder), "--out", str(bad)]) == 2
        assert needle in capsys.readouterr().err
    if Path("/proc/self").is_dir():
        assert main(["predict", str(model_dir), "--images", str(folder), "--out", "/proc/medsweep-preds.csv"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot write --out /proc/medsweep-preds.csv" in err
    assert out.read_bytes() == written


def test_a_folder_that_is_not_a_model_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "--images", str(tmp_path), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a medsweep model folder" in err and "medsweep export" in err
    with pytest.raises(ConfigError, match="not a medsweep model folder"):
        medsweep.load_model(tmp_path)


def test_export_refuses_an_out_it_cannot_make_before_reading_the_sweep(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export", str(tmp_path / "no-sweep"), "--out", str(tmp_path / "notes.txt" / "model")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.txt is a file, not a folder; pass another --out" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_export_names_the_methods_there_are(tmp_path, capsys):
    document = {"synthetic": {"task": "multiclass", "classes": ["a", "b"], "best_method": "linear", "methods": {"linear": {"seeds": []}}}}
    (tmp_path / FINAL_JSON).write_text(json.dumps(document))
    assert main(["export", str(tmp_path), "--method", "lora", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "no method 'lora'" in err and "available: linear" in err


@pytest.mark.slow
def test_without_final_the_best_trials_checkpoint_is_exported(tiny_sweep, synthetic_root, synthetic_spec, tmp_path):
    """A sweep whose final step was skipped: the best trial's best epoch, from its Tune checkpoint. Its
    validation AUC is best.yaml's up to the float16 features the trial trained on (the export computes
    them in float32), hence the tolerance."""
    out, _, _ = tiny_sweep
    entry = next(iter(yaml.safe_load((out / "best.yaml").read_text()).values()))
    model_dir = _export(out, tmp_path / "model")
    info = json.loads((model_dir / "model.json").read_text())
    assert info["source"]["from"] == "best trial" and info["method"] == entry["best_method"]
    preds = tmp_path / "val.csv"
    assert main(["predict", str(model_dir), "--dataset", str(synthetic_root), "--split", "val", "--out", str(preds)]) == 0
    rows = list(csv.DictReader(preds.open()))
    probs = np.array([[float(r[f"prob_{c}"]) for c in entry["classes"]] for r in rows])
    labels = np.array([s.label for s in synthetic_spec.splits["val"]])  # the CSV keeps the split's order
    auc = classification_metrics(np.log(probs), labels, entry["task"])["auc"]
    assert auc == pytest.approx(entry["per_method"][entry["best_method"]]["validation"]["best_val_auc"], abs=0.01)
    # The model records the sweep's dataset arguments: `--dataset synthetic` makes the set at the sweep's size and seed.
    settings = load_settings(out)
    assert info["source"]["dataset_arguments"] == {"seed": settings.seed, "synthetic_size": settings.image_size}
    synthetic = tmp_path / "synthetic.csv"
    assert main(["predict", str(model_dir), "--dataset", "synthetic", "--cache-dir", str(tmp_path / "cache"), "--out", str(synthetic)]) == 0
    made = tmp_path / "cache" / f"synthetic-s{settings.seed}-{settings.image_size}px"
    assert all(Path(r["path"]).is_relative_to(made) for r in csv.DictReader(synthetic.open()))


def test_multilabel_rows_name_every_label_above_one_half(tmp_path):
    rows = [Prediction(Path("a.png"), [0.9, 0.2, 0.7]), Prediction(Path("b.png"), [0.1, 0.2, 0.3]), Prediction(Path("c.png"), None, "cannot read")]
    write_csv(tmp_path / "p.csv", rows, ["effusion", "nodule", "mass"], "multilabel")
    read = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["predicted"] for r in read] == ["effusion|mass", "", ""]
    assert read[0]["prob_nodule"] == "0.2" and read[2]["error"] == "cannot read"


def test_importing_medsweep_stays_cheap():
    """``medsweep.load_model`` imports torch when called, not when medsweep is imported."""
    code = "import sys, medsweep; assert callable(medsweep.load_model); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_local_backbone_is_referenced_by_hash_and_a_changed_one_refused(tmp_path):
    """A backbone folder is not copied without --with-backbone: the model reads it where it was, and
    refuses it, in one line, once its files differ from the export's."""
    folder = tmp_path / "vit"
    build_backbone("vit-tiny", 64).model.save_pretrained(str(folder))
    config = {**_config("linear"), "backbone": str(folder), "num_classes": 3, "task": "multiclass"}
    method = build_method("linear", config).eval()
    write_model_dir(tmp_path / "model", method, config, ["a", "b", "c"], metrics={}, source={}, epochs_run=0)
    assert json.loads((tmp_path / "model" / "model.json").read_text())["backbone"]["kind"] == "folder"
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = method({"pixel_values": (images - 0.5) / 0.5})
        np.testing.assert_allclose(medsweep.load_model(tmp_path / "model")(images).numpy(), expected.numpy(), atol=EXACT, rtol=0)
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("{", '{"note": 1,', 1))
    with pytest.raises(ConfigError, match=r"changed since model .* was exported"):
        medsweep.load_model(tmp_path / "model")
