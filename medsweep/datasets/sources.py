"""Turn every supported dataset layout into a :class:`DatasetSpec`.

Layouts, one per source work:

* ImageFolder ``train/ val/ test/ <class>/`` (FPT);
* a CSV with ``image_path,label,fold`` and k folds, one named the validation
  fold and one the test fold (cross-domain fine-tuning: BreakHis 5 folds,
  HCRF 4 folds);
* list files ``<relative path> <0/1> <0/1> ...`` per split with multi-label
  vectors and pre-made label-fraction files (LoRA on medical foundation
  models: NIH ChestX-ray14, CheXpert, RSNA);
* the built-in synthetic set (see :mod:`medsweep.datasets.synthetic`);
* a dataset YAML naming any of the above plus the dataset's recommended
  resolution and learning rate (FPT's ``configs/dataset/*.yaml``).

Everything is checked here, once, before a sweep spends GPU time: missing
folders, empty classes, folds that do not exist, images named but absent,
groups (patients) leaking across splits. Each problem is one
:class:`DatasetError` whose message names the offending path and the fix.

Sample paths are absolute, with their folders resolved (symlinks, ``..``);
the file name itself is kept as written, so a symlinked image keeps its
``.png`` name and its class folder in messages and caches.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import yaml

from medsweep.datasets.spec import SPLITS, DatasetSpec, Sample, Task
from medsweep.datasets.synthetic import make_synthetic
from medsweep.errors import DatasetError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"})
IMAGE_EXTENSIONS_SORTED = sorted(IMAGE_EXTENSIONS)
YAML_SUFFIXES = (".yaml", ".yml")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------- ImageFolder


def load_imagefolder(root: Path | str, name: str | None = None) -> DatasetSpec:
    """Read ``root/{train,val,test}/<class>/**/<image>``; classes are train's folders, sorted.

    Every split must have every class (a class missing from val makes its
    one-vs-rest AUC undefined), and no split may have a class train lacks
    (its label index would not exist). Hidden files (macOS ``._x.png``) are
    skipped: they carry image suffixes but are not images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} not found; pass a folder holding train/, val/ and test/")
    root = root.resolve()
    missing = [f"{split}/" for split in SPLITS if not (root / split).is_dir()]
    if missing:
        raise DatasetError(
            f"expected train/, val/, test/ under {root}: {', '.join(missing)} missing; "
            "create them with one sub-folder per class"
        )
    classes = _class_folders(root / "train")
    if not classes:
        raise DatasetError(f"no class folders under {root / 'train'}; put each class's images in train/<class>/")
    if len(classes) < 2:
        raise DatasetError(
            f"only one class ({classes[0]}) under {root / 'train'}; a classifier needs at least two class folders"
        )
    splits = {split: _imagefolder_split(root / split, classes) for split in SPLITS}
    return DatasetSpec(name=name or _default_name(root), root=root, task="multiclass", classes=classes, splits=splits)


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _imagefolder_split(split_dir: Path, classes: list[str]) -> list[Sample]:
    extra = sorted(set(_class_folders(split_dir)) - set(classes))
    if extra:
        raise DatasetError(
            f"{split_dir} has class folders not in train/: {', '.join(extra)}; add them to train/ or remove them"
        )
    samples: list[Sample] = []
    for index, class_name in enumerate(classes):
        images = _images_under(split_dir / class_name)
        if not images:
            raise DatasetError(
                f"class folder {split_dir / class_name} is empty or missing; "
                f"every split needs images of every class ({', '.join(IMAGE_EXTENSIONS_SORTED)})"
            )
        samples.extend(Sample(path, index) for path in images)
    return samples


def _images_under(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


# ------------------------------------------------------------------------ CSV


def load_csv(
    csv_path: Path | str,
    *,
    val_fold: int | str,
    test_fold: int | str,
    image_col: str = "image_path",
    label_col: str = "label",
    fold_col: str = "fold",
    group_col: str | None = None,
    root: Path | str | None = None,
    classes: list[str] | None = None,
    name: str | None = None,
) -> DatasetSpec:
    """Split a k-fold CSV: ``fold == val_fold`` -> val, ``== test_fold`` -> test, the rest -> train.

    Image paths are relative to ``root`` (default: the CSV's folder). Labels
    are integers (class indices, or codes sorted into indices) or strings
    sorted into classes; ``classes`` fixes the order (and names integer
    codes). With ``group_col`` (patient, slide) no group may appear in two
    splits: the folds are assumed group-stratified, and a leak would inflate
    every score.
    """
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise DatasetError(f"CSV {csv_path} not found; check the path (relative paths in a YAML start at its folder)")
    csv_path = csv_path.resolve()
    image_root = Path(root).expanduser().resolve() if root is not None else csv_path.parent
    rows = _read_csv(csv_path, [c for c in (image_col, label_col, fold_col, group_col) if c])
    val_key, test_key = str(val_fold).strip(), str(test_fold).strip()
    _check_folds(csv_path, fold_col, {row[fold_col] for row in rows}, val_key, test_key)
    split_of = {val_key: "val", test_key: "test"}
    row_splits = [split_of.get(row[fold_col], "train") for row in rows]
    class_list, indices = _encode_labels([row[label_col] for row in rows], classes, csv_path, label_col)
    paths = _absolute_paths(image_root, [row[image_col] for row in rows])
    splits: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    for split, path, index in zip(row_splits, paths, indices, strict=True):
        splits[split].append(Sample(path, index))
    _check_files_exist(csv_path, image_root, [s.path for split in SPLITS for s in splits[split]])
    _check_no_shared_images(csv_path, splits)
    _check_every_class_in_every_split(csv_path, splits, class_list, {"val": val_key, "test": test_key})
    if group_col:
        _check_group_leak(csv_path, group_col, [row[group_col] for row in rows], row_splits)
    return DatasetSpec(
        name=name or _default_name(csv_path),
        root=image_root,
        task="multiclass",
        classes=class_list,
        splits=splits,
        extra={"val_fold": val_key, "test_fold": test_key},
    )


def _read_csv(csv_path: Path, needed: list[str]) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DatasetError(
                f"{csv_path} lacks column(s) {', '.join(missing)}; its columns are {', '.join(columns) or 'none'} "
                "(name yours with image_col / label_col / fold_col / group_col)"
            )
        rows = [{k: (v or "").strip() for k, v in row.items() if k in needed} for row in reader]
    if not rows:
        raise DatasetError(f"{csv_path} has no rows")
    return rows


def _check_folds(csv_path: Path, fold_col: str, present: set[str], val_key: str, test_key: str) -> None:
    if val_key == test_key:
        raise DatasetError(f"val_fold and test_fold are both {val_key} for {csv_path}; pick two different folds")
    listed = ", ".join(sorted(present, key=_natural_key))
    for role, key in (("val_fold", val_key), ("test_fold", test_key)):
        if key not in present:
            raise DatasetError(f"{role} {key} is not in column {fold_col} of {csv_path}; folds present: {listed}")
    if not present - {val_key, test_key}:
        raise DatasetError(f"{csv_path} has only folds {listed}: no fold is left for training")


def _natural_key(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def _encode_labels(
    raw: list[str], classes: list[str] | None, source: Path, label_col: str
) -> tuple[list[str], list[int]]:
    """Map label strings to indices: given ``classes``, else sorted (numerically for integers)."""
    unique = sorted(set(raw), key=_natural_key)
    integers = all(re.fullmatch(r"-?\d+", v) for v in unique)
    if classes is not None:
        if integers and not set(unique) & set(classes):
            codes = sorted({int(v) for v in unique})
            if codes[0] < 0 or codes[-1] >= len(classes):
                raise DatasetError(
                    f"{source}: integer labels {codes[0]}..{codes[-1]} in column {label_col} do not index "
                    f"the {len(classes)} classes given"
                )
            return list(classes), [int(v) for v in raw]
        unknown = sorted(set(unique) - set(classes))
        if unknown:
            raise DatasetError(
                f"{source}: labels {', '.join(unknown)} in column {label_col} are not among classes "
                f"{', '.join(classes)}; add them to classes"
            )
        position = {c: i for i, c in enumerate(classes)}
        return list(classes), [position[v] for v in raw]
    if len(unique) < 2:
        raise DatasetError(f"{source}: column {label_col} has only one label ({unique[0]}); a classifier needs two")
    position = {c: i for i, c in enumerate(unique)}
    return unique, [position[v] for v in raw]


def _check_every_class_in_every_split(
    source: Path, splits: dict[str, list[Sample]], classes: list[str], folds: dict[str, str]
) -> None:
    for split in SPLITS:
        present = {s.label for s in splits[split]}
        absent = [classes[i] for i in range(len(classes)) if i not in present]
        if absent:
            where = f"{split} (fold {folds[split]})" if split in folds else split
            raise DatasetError(
                f"{source}: class(es) {', '.join(absent)} have no rows in {where}; "
                "use stratified folds so every split has every class"
            )


def _check_group_leak(source: Path, group_col: str, groups: list[str], row_splits: list[str]) -> None:
    splits_of: dict[str, set[str]] = defaultdict(set)
    for group, split in zip(groups, row_splits, strict=True):
        splits_of[group].add(split)
    leaked = sorted(g for g, s in splits_of.items() if len(s) > 1)
    if leaked:
        first = leaked[0]
        in_splits = " and ".join(s for s in SPLITS if s in splits_of[first])
        raise DatasetError(
            f"{source}: group {first!r} (column {group_col}) is in {in_splits}"
            f"{f', and {len(leaked) - 1} more groups leak' if len(leaked) > 1 else ''}; "
            "re-split so that each group lies in one fold"
        )


# ----------------------------------------------------------------- list files


def load_list_files(
    root: Path | str,
    *,
    images_dir: str = "all_classes",
    train_file: str = "train_list.txt",
    val_file: str = "val_list.txt",
    test_file: str = "test_list.txt",
    class_names: list[str] | None = None,
    fraction: float | None = None,
    name: str | None = None,
) -> DatasetSpec:
    """Read NIH ChestX-ray14-style list files: ``<path relative to images_dir> <0/1> ...`` per line.

    Always a multi-label task (one sigmoid per column; RSNA's single column
    too). With ``fraction`` and a pre-made file ``train_<percent>.txt``
    (``train_1.txt`` for 0.01, ``train_10.txt`` for 0.1) beside the lists,
    that file is the training split, so results match the published label
    fractions exactly; ``extra["label_fraction_file"]`` records it. Without
    such a file the caller subsamples (see :func:`load_dataset`).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"list-file dataset folder {root} not found")
    root = root.resolve()
    image_root = root / images_dir
    if not image_root.is_dir():
        raise DatasetError(
            f"images folder {image_root} not found: list files name images relative to {images_dir}/ beside them "
            f"(NIH ChestX-ray14's layout); move the images there, or give a dataset YAML with `path: {root}`, "
            "`layout: listfiles` and `images_dir: <the folder they are in>`"
        )
    fraction_file = _fraction_file(root, fraction)
    files = {"train": fraction_file or train_file, "val": val_file, "test": test_file}
    parsed = {split: _read_list_file(root / files[split]) for split in SPLITS}
    width = _label_width(parsed, files, class_names, root)
    splits = {}
    for split in SPLITS:
        list_path = root / files[split]
        paths = _absolute_paths(image_root, [entry for entry, _ in parsed[split]])
        _check_files_exist(list_path, image_root, paths)
        splits[split] = [Sample(path, labels) for path, (_, labels) in zip(paths, parsed[split], strict=True)]
    _check_no_shared_images(root, splits)
    extra: dict[str, Any] = {"label_fraction_file": fraction_file} if fraction_file else {}
    if fraction_file:
        extra["label_fraction"] = fraction
    return DatasetSpec(
        name=name or _default_name(root),
        root=image_root,
        task="multilabel",
        classes=list(class_names) if class_names else [f"label{i}" for i in range(width)],
        splits=splits,
        extra=extra,
    )


def _fraction_file(root: Path, fraction: float | None) -> str | None:
    if fraction is None or fraction >= 1:
        return None
    percent = fraction * 100
    label = str(round(percent)) if math.isclose(percent, round(percent)) else f"{percent:g}"
    candidate = f"train_{label}.txt"
    return candidate if (root / candidate).is_file() else None


def _read_list_file(list_path: Path) -> list[tuple[str, tuple[int, ...]]]:
    if not list_path.is_file():
        raise DatasetError(f"list file {list_path} not found; name it with train_file / val_file / test_file")
    entries = []
    with open(list_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            tokens = line.split()
            if not tokens or tokens[0].startswith("#"):
                continue
            try:
                labels = tuple(_binary(t) for t in tokens[1:])
            except ValueError:
                raise DatasetError(
                    f"{list_path}:{number}: labels must be 0 or 1, got {' '.join(tokens[1:])!r}"
                ) from None
            if not labels:
                raise DatasetError(f"{list_path}:{number}: no labels after {tokens[0]}; expected '<path> <0/1> ...'")
            entries.append((tokens[0], labels))
    if not entries:
        raise DatasetError(f"list file {list_path} has no entries")
    return entries


def _binary(token: str) -> int:
    value = float(token)
    if value not in (0.0, 1.0):
        raise ValueError(token)
    return int(value)


def _label_width(
    parsed: dict[str, list[tuple[str, tuple[int, ...]]]],
    files: dict[str, str],
    class_names: list[str] | None,
    root: Path,
) -> int:
    """All lines must have the same number of labels (and match ``class_names``)."""
    width = len(class_names) if class_names else len(parsed["train"][0][1])
    for split in SPLITS:
        for entry, labels in parsed[split]:
            if len(labels) != width:
                raise DatasetError(
                    f"{root / files[split]}: {entry} has {len(labels)} labels, expected {width}"
                    f"{' (one per class name)' if class_names else ' (as on the first train line)'}"
                )
    return width


# -------------------------------------------------------------- label fraction


def apply_label_fraction(spec: DatasetSpec, fraction: float, seed: int) -> DatasetSpec:
    """Keep a stratified, seeded ``fraction`` of train; val and test stay whole.

    Strata are the class (multi-class) or the first positive label, with
    all-negative images as their own stratum (multi-label: full label-set
    strings would make most strata singletons at 14 labels). Quotas use
    largest remainders, so the total is round(n x fraction). Every class
    that has a positive in train keeps at least one, so no AUC is undefined.
    """
    if not 0 < fraction <= 1:
        raise DatasetError(f"label fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return spec
    train = spec.splits["train"]
    rng = np.random.default_rng(seed)
    strata: dict[int, list[int]] = defaultdict(list)
    for index, sample in enumerate(train):
        strata[_stratum(sample.label)].append(index)
    keep: set[int] = set()
    quotas = _quotas({k: len(v) for k, v in strata.items()}, fraction)
    for key in sorted(strata):  # fixed order: the same seed draws the same images
        members = strata[key]
        keep.update(members[i] for i in rng.permutation(len(members))[: quotas[key]])
    keep |= _one_per_class(train, keep, spec.num_classes, rng)
    subset = [train[i] for i in sorted(keep)]
    extra = {**spec.extra, "label_fraction": fraction, "label_fraction_seed": seed}
    return dataclasses.replace(spec, splits={**spec.splits, "train": subset}, extra=extra)


def _stratum(label: int | tuple[int, ...]) -> int:
    if isinstance(label, int):
        return label
    return next((i for i, flag in enumerate(label) if flag), -1)


def _quotas(sizes: dict[int, int], fraction: float) -> dict[int, int]:
    """Largest-remainder apportionment of round(total x fraction) over strata (ties: stratum order)."""
    target = max(1, round(sum(sizes.values()) * fraction))
    exact = {k: n * fraction for k, n in sizes.items()}
    quotas = {k: math.floor(v) for k, v in exact.items()}
    by_remainder = sorted(sizes, key=lambda k: (-(exact[k] - quotas[k]), k))
    for key in by_remainder[: max(0, target - sum(quotas.values()))]:
        quotas[key] += 1
    return quotas


def _one_per_class(train: list[Sample], keep: set[int], num_classes: int, rng: np.random.Generator) -> set[int]:
    """Indices to add so every class with a train positive has one in the subset."""
    added: set[int] = set()
    for cls in range(num_classes):
        positives = [i for i, s in enumerate(train) if _is_positive(s.label, cls)]
        if positives and not any(i in keep or i in added for i in positives):
            added.add(positives[int(rng.integers(len(positives)))])
    return added


def _is_positive(label: int | tuple[int, ...], cls: int) -> bool:
    return label == cls if isinstance(label, int) else bool(label[cls])


# ------------------------------------------------------------------- YAML


_COMMON_KEYS = {"name", "path", "task", "classes", "image_size", "learning_rate", "num_classes", "mean", "std"}
# FPT's configs/dataset/*.yaml spell two keys differently; its cache and output
# folders are medsweep's to choose, so those keys are accepted and ignored.
_ALIASES = {"data_path": "path", "input_size": "image_size"}
_IGNORED_FPT_KEYS = {"preload_path", "save_path"}
_LAYOUT_KEYS = {
    "imagefolder": set(),
    "csv": {"val_fold", "test_fold", "image_col", "label_col", "fold_col", "group_col", "root"},
    "listfiles": {"images_dir", "train_file", "val_file", "test_file"},
}
_DEFAULT_TASK: dict[str, Task] = {"imagefolder": "multiclass", "csv": "multiclass", "listfiles": "multilabel"}


def load_dataset_yaml(path: Path | str, *, fraction: float | None = None) -> DatasetSpec:
    """Read a dataset YAML (``layout: imagefolder | csv | listfiles``); relative paths start at its folder.

    Without ``layout`` it follows ``path``: a ``.csv`` file, a folder with
    ``train_list.txt``, else an ImageFolder (so FPT's YAMLs load as they are).

    ``image_size`` and ``learning_rate`` become the spec's recommendations;
    ``mean``/``std`` go to ``extra`` for methods that normalise per dataset.
    ``num_classes`` (as in FPT's YAMLs) is checked against what was found.
    """
    path = Path(path).expanduser().resolve()
    config = _read_yaml(path)
    config = {_ALIASES.get(k, k): v for k, v in config.items() if k not in _IGNORED_FPT_KEYS}
    if "path" not in config:
        raise DatasetError(f"{path}: missing key 'path' (the dataset folder or CSV, relative to the YAML allowed)")
    data_path = _relative_to(path.parent, config.pop("path"))
    layout = str(config.pop("layout", _infer_layout(data_path)))
    if layout not in _LAYOUT_KEYS:
        raise DatasetError(f"{path}: layout {layout!r} is not one of {', '.join(_LAYOUT_KEYS)}")
    unknown = sorted(set(config) - _COMMON_KEYS - _LAYOUT_KEYS[layout])
    if unknown:
        allowed = ", ".join(sorted(_COMMON_KEYS | _LAYOUT_KEYS[layout] | {"layout"}))
        raise DatasetError(f"{path}: unknown key(s) {', '.join(unknown)} for layout {layout}; allowed: {allowed}")
    name = _yaml_name(path, config)
    task = config.get("task", _DEFAULT_TASK[layout])
    if task != _DEFAULT_TASK[layout]:
        raise DatasetError(
            f"{path}: task {task!r} is not supported for layout {layout} (it is {_DEFAULT_TASK[layout]})"
        )
    classes = _yaml_classes(path, config.get("classes"))
    loader = _YAML_LOADERS[layout]
    spec = loader(path, data_path, config, classes, name, fraction)
    _check_num_classes(path, config.get("num_classes"), spec)
    spec.image_size = _positive(path, "image_size", config.get("image_size"), int)
    spec.learning_rate = _positive(path, "learning_rate", config.get("learning_rate"), float)
    spec.extra.update({k: config[k] for k in ("mean", "std") if k in config})
    spec.extra["yaml"] = str(path)
    return spec


def _infer_layout(data_path: Path) -> str:
    """The layout a YAML without ``layout`` means: a CSV file, a list-file folder, else ImageFolder."""
    if data_path.suffix.lower() == ".csv":
        return "csv"
    return "listfiles" if (data_path / "train_list.txt").is_file() else "imagefolder"


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"dataset YAML {path} not found")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise DatasetError(f"dataset YAML {path} is not valid YAML: {str(error).splitlines()[0]}") from error
    if not isinstance(config, dict):
        raise DatasetError(f"dataset YAML {path} must be a mapping of keys (name, layout, path, ...)")
    return config


def _yaml_name(path: Path, config: dict[str, Any]) -> str:
    name = str(config.get("name", path.stem))
    if not _SAFE_NAME.match(name):
        raise DatasetError(f"{path}: name {name!r} must be letters, digits, '.', '_' or '-' (it names output folders)")
    return name


def _yaml_classes(path: Path, classes: Any) -> list[str] | None:
    if classes is None:
        return None
    if not isinstance(classes, list) or len(set(map(str, classes))) != len(classes) or not classes:
        raise DatasetError(f"{path}: classes must be a list of distinct names")
    return [str(c) for c in classes]


def _relative_to(base: Path, value: Any) -> Path:
    candidate = Path(str(value)).expanduser()
    return candidate if candidate.is_absolute() else base / candidate


def _load_imagefolder_from_yaml(
    path: Path, data_path: Path, config: dict[str, Any], classes: list[str] | None, name: str, fraction: float | None
) -> DatasetSpec:
    spec = load_imagefolder(data_path, name=name)
    if classes is not None:
        if sorted(classes) != spec.classes:
            raise DatasetError(
                f"{path}: classes {', '.join(classes)} do not match the class folders {', '.join(spec.classes)} "
                f"under {spec.root / 'train'}"
            )
        spec = _reorder_classes(spec, classes)
    return spec


def _reorder_classes(spec: DatasetSpec, classes: list[str]) -> DatasetSpec:
    """Re-index labels to the YAML's class order (e.g. grades in clinical order)."""
    new_index = {old: classes.index(c) for old, c in enumerate(spec.classes)}
    # Class folders: every label is a class index, not a multi-label tuple.
    splits = {s: [Sample(x.path, new_index[cast(int, x.label)]) for x in samples] for s, samples in spec.splits.items()}
    return dataclasses.replace(spec, classes=list(classes), splits=splits)


def _load_csv_from_yaml(
    path: Path, data_path: Path, config: dict[str, Any], classes: list[str] | None, name: str, fraction: float | None
) -> DatasetSpec:
    for key in ("val_fold", "test_fold"):
        if key not in config:
            raise DatasetError(f"{path}: layout csv needs {key} (which fold is validation / test)")
    options = {k: config[k] for k in ("image_col", "label_col", "fold_col", "group_col") if k in config}
    root = _relative_to(path.parent, config["root"]) if "root" in config else None
    return load_csv(
        data_path,
        val_fold=config["val_fold"],
        test_fold=config["test_fold"],
        root=root,
        classes=classes,
        name=name,
        **options,
    )


def _load_list_files_from_yaml(
    path: Path, data_path: Path, config: dict[str, Any], classes: list[str] | None, name: str, fraction: float | None
) -> DatasetSpec:
    options = {k: str(config[k]) for k in ("images_dir", "train_file", "val_file", "test_file") if k in config}
    return load_list_files(data_path, class_names=classes, fraction=fraction, name=name, **options)


_YAML_LOADERS: dict[str, Callable[..., DatasetSpec]] = {
    "imagefolder": _load_imagefolder_from_yaml,
    "csv": _load_csv_from_yaml,
    "listfiles": _load_list_files_from_yaml,
}


def _check_num_classes(path: Path, expected: Any, spec: DatasetSpec) -> None:
    if expected is not None and _positive(path, "num_classes", expected, int) != spec.num_classes:
        raise DatasetError(
            f"{path}: num_classes is {expected} but the data has {spec.num_classes} ({', '.join(spec.classes)})"
        )


def _positive(path: Path, key: str, value: Any, kind: type) -> Any:
    """Parse a positive number; YAML reads ``1e-4`` (no dot) as a string, so accept strings."""
    if value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not number > 0 or (kind is int and float(value) != number):
        raise DatasetError(f"{path}: {key} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
    return number


# ----------------------------------------------------------------- entry point


def load_dataset(
    arg: str,
    *,
    cache_dir: Path,
    seed: int = 0,
    fraction: float | None = None,
    synthetic_size: int = 64,
) -> DatasetSpec:
    """The CLI's one way in: ``synthetic``, a dataset YAML, an ImageFolder or a list-file folder.

    ``fraction`` keeps that share of train: a pre-made list file when one
    exists, else a stratified subsample seeded by ``seed``. The word
    ``synthetic`` always means the built-in set, even if a folder of that
    name exists (write ``./synthetic`` for the folder).
    """
    if fraction is not None and not 0 < fraction <= 1:
        raise DatasetError(f"label fraction must be in (0, 1], got {fraction}")
    spec = _resolve(arg, Path(cache_dir), seed, fraction, synthetic_size)
    if fraction is not None and fraction < 1 and "label_fraction_file" not in spec.extra:
        spec = apply_label_fraction(spec, fraction, seed)
    return spec


def _resolve(arg: str, cache_dir: Path, seed: int, fraction: float | None, synthetic_size: int) -> DatasetSpec:
    if arg == "synthetic":
        try:  # the built-in set is generated into the cache, the first folder a run writes
            root = make_synthetic(cache_dir / f"synthetic-s{seed}-{synthetic_size}px", seed=seed, image_size=synthetic_size)
        except OSError as error:
            raise DatasetError(
                f"cannot write the synthetic set under --cache-dir {cache_dir} ({error.strerror or error}: "
                f"{error.filename or cache_dir}); pass a --cache-dir that is a folder you can write to"
            ) from None
        spec = load_imagefolder(root, name="synthetic")
        spec.image_size = synthetic_size
        return spec
    path = Path(arg).expanduser()
    suffix = path.suffix.lower()
    if suffix in YAML_SUFFIXES and path.is_file():
        return load_dataset_yaml(path, fraction=fraction)
    if suffix == ".csv" and path.is_file():
        raise DatasetError(
            f"{arg} is a CSV: write a dataset YAML that names it and its folds, e.g. "
            f"'layout: csv', 'path: {path.name}', 'val_fold: 0', 'test_fold: 1', and pass the YAML"
        )
    if (path / "train").is_dir():
        return load_imagefolder(path)
    if (path / "train_list.txt").is_file():
        return load_list_files(path, fraction=fraction)
    raise DatasetError(f"dataset {arg} {_what_is_there(path)}: {_DATASET_KINDS}")


_DATASET_KINDS = "pass 'synthetic', an ImageFolder folder with train/ val/ test/, a list-file folder (train_list.txt), or a dataset YAML"


def _what_is_there(path: Path) -> str:
    """Why ``path`` is no dataset, as what it is: a file or an empty folder is not "not found"."""
    if path.is_file():
        return f"is a {path.suffix or 'suffix-less'} file, not a dataset"
    if path.is_dir():
        if not any(path.iterdir()):
            return "is an empty folder"
        return "is a folder with neither train/ nor train_list.txt"
    return "not found"


# -------------------------------------------------------------------- helpers


def _default_name(path: Path) -> str:
    """A folder-safe name from a path's last component."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem if path.is_file() else path.name).strip("-.")
    return name or "dataset"


def _absolute_paths(base: Path, entries: list[str]) -> list[Path]:
    """Absolute paths with resolved folders; each distinct folder is resolved once."""
    resolved: dict[Path, Path] = {}
    out = []
    for entry in entries:
        candidate = base / Path(entry).expanduser()
        parent = candidate.parent
        if parent not in resolved:
            resolved[parent] = parent.resolve()
        out.append(resolved[parent] / candidate.name)
    return out


def _check_files_exist(source: Path, image_root: Path, paths: list[Path]) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(
            f"{source} names {len(missing)} image(s) missing under {image_root}, first {missing[0]}; "
            "fix the paths (or the root / images_dir they are relative to)"
        )


def _check_no_shared_images(source: Path, splits: dict[str, list[Sample]]) -> None:
    seen: dict[Path, str] = {}
    for split in SPLITS:
        for sample in splits[split]:
            other = seen.setdefault(sample.path, split)
            if other != split:
                raise DatasetError(
                    f"{source}: image {sample.path} is in both {other} and {split}; each image belongs to one split"
                )
