"""Dataset layouts to DatasetSpec: ImageFolder, k-fold CSV, list files, YAML, label fractions, the entry point."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsweep.datasets import (
    DatasetSpec,
    Sample,
    apply_label_fraction,
    load_csv,
    load_dataset,
    load_dataset_yaml,
    load_imagefolder,
    load_list_files,
)
from medsweep.errors import DatasetError


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (len(path.name) * 9 % 256, 0, 0)).save(path)
    return path


def _imagefolder(root: Path, classes: tuple[str, ...] = ("benign", "malignant"), per_class: int = 2) -> Path:
    for split in ("train", "val", "test"):
        for name in classes:
            for i in range(per_class):
                _image(root / split / name / f"{split}_{name}_{i}.png")
    return root


def _fold_csv(root: Path, rows: list[dict[str, object]], name: str = "folds.csv") -> Path:
    for row in rows:
        _image(root / str(row["image_path"]))
    path = root / name
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _five_fold_rows() -> list[dict[str, object]]:
    """4 classes x 5 folds x 2 images; patient = class + fold, so groups never cross folds."""
    labels = ["adenosis", "fibroadenoma", "ductal", "lobular"]
    return [
        {"image_path": f"img/{label}_{fold}_{i}.png", "label": label, "fold": fold, "patient": f"{label}-{fold}"}
        for fold in range(5)
        for label in labels
        for i in range(2)
    ]


def _list_files(root: Path, lines: dict[str, list[str]], images_dir: str = "all_classes") -> Path:
    for split_lines in lines.values():
        for line in split_lines:
            _image(root / images_dir / line.split()[0])
    for file_name, split_lines in lines.items():
        (root / file_name).write_text("\n".join(split_lines) + "\n")
    return root


NIH_LINES = {
    "train_list.txt": [f"tr{i}.png {i % 2} {(i // 2) % 2} {int(i == 0)}" for i in range(10)],
    "val_list.txt": ["va0.png 1 0 0", "va1.png 0 1 1"],
    "test_list.txt": ["te0.png 0 0 1", "te1.png 1 1 0"],
}


# ---------------------------------------------------------------- ImageFolder


def test_imagefolder_reads_classes_labels_and_absolute_paths(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path / "isic")
    _image(root / "train" / "malignant" / "nested" / "deep.png")
    (root / "train" / "benign" / "._junk.png").write_bytes(b"AppleDouble")  # hidden: skipped
    (root / "train" / "benign" / "notes.txt").write_text("not an image")
    spec = load_imagefolder(root)
    assert spec.name == "isic" and spec.task == "multiclass" and spec.classes == ["benign", "malignant"]
    assert [len(spec.splits[s]) for s in ("train", "val", "test")] == [5, 4, 4]
    assert Counter(s.label for s in spec.splits["train"]) == {0: 2, 1: 3}
    assert all(s.path.is_absolute() and s.path.is_file() for s in spec.splits["train"])
    assert spec.root == root.resolve()
    assert spec.summary() == "isic: multiclass, 2 classes, train 5, val 4, test 4 images"


def test_imagefolder_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nowhere.*not found"):
        load_imagefolder(tmp_path / "nowhere")


def test_imagefolder_missing_splits_are_named(tmp_path: Path) -> None:
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"expected train/, val/, test/ under .*d: val/, test/ missing"):
        load_imagefolder(tmp_path / "d")


def test_imagefolder_empty_class_in_a_split(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path / "d")
    for image in (root / "val" / "malignant").iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match=r"class folder .*val/malignant is empty"):
        load_imagefolder(root)


def test_imagefolder_class_missing_from_train(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path / "d")
    _image(root / "test" / "melanoma" / "x.png")
    with pytest.raises(DatasetError, match=r"test has class folders not in train/: melanoma"):
        load_imagefolder(root)


def test_imagefolder_single_class(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path / "d", classes=("only",))
    with pytest.raises(DatasetError, match=r"only one class \(only\)"):
        load_imagefolder(root)


# ------------------------------------------------------------------------ CSV


def test_csv_fold_selection(tmp_path: Path) -> None:
    csv_path = _fold_csv(tmp_path, _five_fold_rows())
    spec = load_csv(csv_path, val_fold=1, test_fold="2")
    assert [len(spec.splits[s]) for s in ("train", "val", "test")] == [24, 8, 8]
    assert spec.classes == ["adenosis", "ductal", "fibroadenoma", "lobular"]  # strings sorted
    assert all("_1_" in s.path.name for s in spec.splits["val"])
    assert all("_2_" in s.path.name for s in spec.splits["test"])
    assert {s.path.name.split("_")[0] for s in spec.splits["train"] if s.label == 1} == {"ductal"}
    assert spec.splits["val"][0].path == (tmp_path / "img" / "adenosis_1_0.png").resolve()


def test_csv_integer_labels_and_class_names(tmp_path: Path) -> None:
    rows = [{"image_path": f"i{f}{c}.png", "label": c, "fold": f} for f in range(4) for c in (0, 1)]
    csv_path = _fold_csv(tmp_path, rows)
    spec = load_csv(csv_path, val_fold=0, test_fold=3)
    assert spec.classes == ["0", "1"] and {s.label for s in spec.splits["train"]} == {0, 1}
    named = load_csv(csv_path, val_fold=0, test_fold=3, classes=["normal", "cancer"])
    assert named.classes == ["normal", "cancer"]
    assert [s.label for s in named.splits["val"]] == [0, 1]


def test_csv_missing_fold_names_the_folds_present(tmp_path: Path) -> None:
    csv_path = _fold_csv(tmp_path, _five_fold_rows())
    with pytest.raises(DatasetError, match=r"test_fold 7 is not in column fold of .*folds present: 0, 1, 2, 3, 4"):
        load_csv(csv_path, val_fold=0, test_fold=7)
    with pytest.raises(DatasetError, match="pick two different folds"):
        load_csv(csv_path, val_fold=2, test_fold=2)


def test_csv_missing_column(tmp_path: Path) -> None:
    csv_path = _fold_csv(tmp_path, _five_fold_rows())
    columns = "image_path, label, fold, patient"
    with pytest.raises(DatasetError, match=rf"lacks column\(s\) split; its columns are {columns}"):
        load_csv(csv_path, val_fold=0, test_fold=1, fold_col="split")


def test_csv_group_leak_is_detected(tmp_path: Path) -> None:
    rows = _five_fold_rows()
    assert load_csv(_fold_csv(tmp_path, rows), val_fold=0, test_fold=1, group_col="patient").num_classes == 4
    rows[0]["fold"] = 3  # patient adenosis-0 now has images in val (fold 0) and train (fold 3)
    csv_path = _fold_csv(tmp_path, rows, name="leaky.csv")
    with pytest.raises(DatasetError, match=r"leaky\.csv: group 'adenosis-0' \(column patient\) is in train and val"):
        load_csv(csv_path, val_fold=0, test_fold=1, group_col="patient")


def test_csv_missing_images_and_class_absent_from_a_fold(tmp_path: Path) -> None:
    rows = _five_fold_rows()
    csv_path = _fold_csv(tmp_path, rows)
    (tmp_path / "img" / "lobular_4_1.png").unlink()
    with pytest.raises(DatasetError, match=r"folds\.csv names 1 image\(s\) missing under .*first .*lobular_4_1\.png"):
        load_csv(csv_path, val_fold=0, test_fold=1)
    thin = [r for r in rows if not (r["fold"] == 1 and r["label"] == "lobular")]
    thin_csv = _fold_csv(tmp_path, thin, name="thin.csv")
    with pytest.raises(DatasetError, match=r"class\(es\) lobular have no rows in val \(fold 1\)"):
        load_csv(thin_csv, val_fold=1, test_fold=0)


def test_csv_paths_relative_to_root(tmp_path: Path) -> None:
    rows = _five_fold_rows()
    _fold_csv(tmp_path / "data", rows)
    csv_path = tmp_path / "meta" / "folds.csv"
    csv_path.parent.mkdir()
    csv_path.write_text((tmp_path / "data" / "folds.csv").read_text())
    spec = load_csv(csv_path, val_fold=0, test_fold=1, root=tmp_path / "data")
    assert spec.root == (tmp_path / "data").resolve() and spec.splits["train"][0].path.is_file()


# ----------------------------------------------------------------- list files


def test_list_files_multilabel_vectors(tmp_path: Path) -> None:
    root = _list_files(tmp_path / "nih", NIH_LINES)
    spec = load_list_files(root, class_names=["Atelectasis", "Effusion", "Hernia"])
    assert spec.task == "multilabel" and spec.classes == ["Atelectasis", "Effusion", "Hernia"]
    assert spec.splits["val"] == [
        Sample((root / "all_classes" / "va0.png").resolve(), (1, 0, 0)),
        Sample((root / "all_classes" / "va1.png").resolve(), (0, 1, 1)),
    ]
    assert spec.splits["train"][3].label == (1, 1, 0)
    assert load_list_files(root).classes == ["label0", "label1", "label2"]


def test_list_files_missing_images_are_counted(tmp_path: Path) -> None:
    root = _list_files(tmp_path / "nih", NIH_LINES)
    for name in ("tr3.png", "tr7.png"):
        (root / "all_classes" / name).unlink()
    message = r"train_list\.txt names 2 image\(s\) missing under .*all_classes, first .*tr3\.png"
    with pytest.raises(DatasetError, match=message):
        load_list_files(root)


def test_list_files_bad_lines(tmp_path: Path) -> None:
    root = _list_files(tmp_path / "nih", {**NIH_LINES, "val_list.txt": ["va0.png 1 0", "va1.png 0 1 1"]})
    with pytest.raises(DatasetError, match=r"val_list\.txt: .*va0\.png has 2 labels, expected 3"):
        load_list_files(root)
    (root / "val_list.txt").write_text("va0.png 1 0 -1\n")
    with pytest.raises(DatasetError, match=r"val_list\.txt:1: labels must be 0 or 1"):
        load_list_files(root)


def test_list_files_label_fraction_file(tmp_path: Path) -> None:
    root = _list_files(tmp_path / "nih", {**NIH_LINES, "train_10.txt": NIH_LINES["train_list.txt"][:2]})
    spec = load_list_files(root, fraction=0.1)
    assert len(spec.splits["train"]) == 2 and spec.extra["label_fraction_file"] == "train_10.txt"
    assert "label_fraction_file" not in load_list_files(root, fraction=0.01).extra  # no train_1.txt


# -------------------------------------------------------------- label fraction


def _multiclass_spec(counts: tuple[int, ...]) -> DatasetSpec:
    train = [Sample(Path(f"/d/{c}_{i}.png"), c) for c, n in enumerate(counts) for i in range(n)]
    val = [Sample(Path(f"/d/v{c}.png"), c) for c in range(len(counts))]
    classes = [str(c) for c in range(len(counts))]
    return DatasetSpec("d", Path("/d"), "multiclass", classes, {"train": train, "val": val, "test": val})


def test_label_fraction_is_stratified_and_seeded() -> None:
    spec = _multiclass_spec((70, 20, 10))
    tenth = apply_label_fraction(spec, 0.1, seed=0)
    assert Counter(s.label for s in tenth.splits["train"]) == {0: 7, 1: 2, 2: 1}
    assert tenth.splits["val"] is spec.splits["val"] and len(spec.splits["train"]) == 100
    assert apply_label_fraction(spec, 0.1, seed=0).splits == tenth.splits
    assert apply_label_fraction(spec, 0.1, seed=1).splits["train"] != tenth.splits["train"]
    assert tenth.extra["label_fraction"] == 0.1
    half = apply_label_fraction(spec, 0.5, seed=0)
    assert Counter(s.label for s in half.splits["train"]) == {0: 35, 1: 10, 2: 5}


def test_label_fraction_keeps_every_class() -> None:
    tiny = apply_label_fraction(_multiclass_spec((70, 20, 10)), 0.01, seed=0)
    assert Counter(s.label for s in tiny.splits["train"]) == {0: 1, 1: 1, 2: 1}
    labels = [(1, 0, 0)] * 50 + [(0, 1, 0)] * 45 + [(1, 0, 1)] * 5  # label 2 only ever second
    train = [Sample(Path(f"/x/{i}.png"), label) for i, label in enumerate(labels)]
    spec = DatasetSpec("x", Path("/x"), "multilabel", ["a", "b", "c"], {"train": train, "val": [], "test": []})
    subset = apply_label_fraction(spec, 0.02, seed=3).splits["train"]
    assert np.array([s.label for s in subset]).sum(axis=0).min() >= 1
    with pytest.raises(DatasetError, match=r"label fraction must be in \(0, 1\]"):
        apply_label_fraction(spec, 1.5, seed=0)


def test_the_classes_an_auc_leaves_out_are_named_per_split() -> None:
    """A label no validation image has (or every one has) has no AUC there: the split's macro AUC averages the other
    labels, which the sweep's dataset line says (seen on a list-file set whose rare label was absent from val)."""
    train = [Sample(Path(f"/x/t{i}.png"), (i % 2, 1 - i % 2, 1)) for i in range(4)]
    val = [Sample(Path(f"/x/v{i}.png"), (i % 2, 0, 1)) for i in range(4)]
    test = [Sample(Path(f"/x/s{i}.png"), (i % 2, 1 - i % 2, i % 2)) for i in range(4)]
    spec = DatasetSpec("x", Path("/x"), "multilabel", ["a", "b", "c"], {"train": train, "val": val, "test": test})
    assert spec.class_counts("val") == [2, 0, 4]
    assert spec.classes_without_auc("val") == ["b", "c"] and spec.classes_without_auc("test") == []
    assert spec.auc_notes() == ["val: no image has b; every image has c; its AUC is a's alone"]

    classes = _multiclass_spec((3, 3, 3))
    classes.splits["test"] = [sample for sample in classes.splits["val"] if sample.label != 1]
    assert classes.auc_notes() == ["test: no image of 1; its AUC averages the other 2 classes"]
    assert _multiclass_spec((3, 3)).auc_notes() == []


# ------------------------------------------------------------------- YAML


def test_yaml_imagefolder_relative_path_and_recommendations(tmp_path: Path) -> None:
    _imagefolder(tmp_path / "data" / "isic2016")
    yaml_path = tmp_path / "configs" / "isic2016.yaml"
    yaml_path.parent.mkdir()
    yaml_path.write_text(
        "name: isic2016\nlayout: imagefolder\npath: ../data/isic2016\nimage_size: 512\n"
        "learning_rate: 5e-3\nclasses: [malignant, benign]\nmean: [0.5, 0.5, 0.5]\n"
    )
    spec = load_dataset_yaml(yaml_path)
    assert spec.name == "isic2016" and spec.image_size == 512 and spec.learning_rate == 0.005
    assert spec.classes == ["malignant", "benign"]  # the YAML's order
    assert all(s.label == 1 for s in spec.splits["val"] if s.path.parent.name == "benign")
    assert spec.extra["mean"] == [0.5, 0.5, 0.5]


def test_yaml_in_fpt_spelling_loads(tmp_path: Path) -> None:
    _imagefolder(tmp_path / "messidor2", classes=("0", "1", "2"))
    yaml_path = tmp_path / "messidor2.yaml"
    yaml_path.write_text(
        "name: messidor2\ndata_path: messidor2\npreload_path: ./preload_data/messidor2\nsave_path: ./runs/m\n"
        "input_size: 512\nnum_classes: 3\nmean: auto\nstd: auto\nlearning_rate: 0.0002\n"
    )
    spec = load_dataset_yaml(yaml_path)
    assert (spec.num_classes, spec.image_size, spec.learning_rate) == (3, 512, 0.0002)
    yaml_path.write_text("data_path: messidor2\nnum_classes: 5\n")
    with pytest.raises(DatasetError, match="num_classes is 5 but the data has 3"):
        load_dataset_yaml(yaml_path)


def test_yaml_unknown_keys_are_named(tmp_path: Path) -> None:
    yaml_path = tmp_path / "d.yaml"
    yaml_path.write_text("path: x\nlayout: imagefolder\nval_fold: 1\nbatchsize: 3\n")
    with pytest.raises(DatasetError, match=r"d\.yaml: unknown key\(s\) batchsize, val_fold for layout imagefolder"):
        load_dataset_yaml(yaml_path)


def test_yaml_csv_and_listfiles_layouts(tmp_path: Path) -> None:
    _fold_csv(tmp_path / "breakhis", _five_fold_rows())
    (tmp_path / "breakhis.yaml").write_text(
        "layout: csv\npath: breakhis/folds.csv\nval_fold: 3\ntest_fold: 4\ngroup_col: patient\n"
    )
    spec = load_dataset_yaml(tmp_path / "breakhis.yaml")
    assert spec.name == "breakhis" and len(spec.splits["test"]) == 8 and spec.extra["test_fold"] == "4"
    (tmp_path / "nofold.yaml").write_text("path: breakhis/folds.csv\n")  # layout inferred from .csv
    with pytest.raises(DatasetError, match="needs val_fold"):
        load_dataset_yaml(tmp_path / "nofold.yaml")
    _list_files(tmp_path / "nih", {**NIH_LINES, "train_1.txt": NIH_LINES["train_list.txt"][:1]}, images_dir="images")
    # the folder alone (`--dataset nih`) looks in all_classes/: the error names the YAML that fixes it
    with pytest.raises(DatasetError, match=r"all_classes not found: .*`layout: listfiles` and `images_dir: "):
        load_dataset(str(tmp_path / "nih"), cache_dir=tmp_path)
    (tmp_path / "nih.yaml").write_text("path: nih\nimages_dir: images\nclasses: [a, b, c]\n")
    assert load_dataset_yaml(tmp_path / "nih.yaml", fraction=0.01).splits["train"][0].label == (0, 0, 1)


# ----------------------------------------------------------------- entry point


def test_load_dataset_synthetic_is_cached_per_seed_and_size(tmp_path: Path) -> None:
    spec = load_dataset("synthetic", cache_dir=tmp_path, synthetic_size=32)
    assert spec.name == "synthetic" and spec.num_classes == 3 and len(spec.splits["train"]) == 360
    assert spec.root == (tmp_path / "synthetic-s0-32px").resolve() and spec.image_size == 32
    assert all(s.path.is_absolute() for s in spec.splits["val"])
    reused = load_dataset("synthetic", cache_dir=tmp_path, synthetic_size=32)
    assert reused.manifest_hash() == spec.manifest_hash()  # same files, untouched
    tenth = load_dataset("synthetic", cache_dir=tmp_path, synthetic_size=32, fraction=0.1)
    assert Counter(s.label for s in tenth.splits["train"]) == {0: 12, 1: 12, 2: 12}


def test_load_dataset_dispatches_on_what_it_is_given(tmp_path: Path) -> None:
    folder = _imagefolder(tmp_path / "derm", per_class=5)
    assert load_dataset(str(folder), cache_dir=tmp_path).name == "derm"
    assert len(load_dataset(str(folder), cache_dir=tmp_path, fraction=0.2, seed=1).splits["train"]) == 2
    nih = _list_files(tmp_path / "nih", NIH_LINES)
    assert load_dataset(str(nih), cache_dir=tmp_path).task == "multilabel"
    (tmp_path / "derm.yml").write_text("path: derm\n")
    assert load_dataset(str(tmp_path / "derm.yml"), cache_dir=tmp_path).name == "derm"
    csv_path = _fold_csv(tmp_path, _five_fold_rows())
    with pytest.raises(DatasetError, match=r"is a CSV: write a dataset YAML .*val_fold"):
        load_dataset(str(csv_path), cache_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"dataset .*nothing not found: pass 'synthetic', an ImageFolder"):
        load_dataset(str(tmp_path / "nothing"), cache_dir=tmp_path)
