"""``medsweep predict``: an exported model folder over image files, one CSV row per image.

Needs no sweep folder and no Ray (it lives beside ``export`` because it is the
other half of the same user path). Each file is decoded and resized exactly as
the preload stores it (:meth:`ExportedModel.read_image`), so the test split of
the sweep's dataset gives the probabilities, and the AUC, of ``final``'s test.
Columns: ``path``, ``prob_<class>`` per class (multi-label: per label),
``predicted`` (the top class; multi-label: the labels above 0.5 joined by
``|``), and ``error`` (why a file could not be read; empty otherwise).
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsweep.datasets.store import write_atomically
from medsweep.errors import ConfigError, DatasetError
from medsweep.search.out_paths import check_out_path, write_error
from medsweep.search.settings import setting_default

if TYPE_CHECKING:
    from medsweep.trainables.model_dir import ExportedModel

BATCH_SIZE = 64
MULTILABEL_THRESHOLD = 0.5


def add_parser(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser("predict", help="run an exported model (medsweep export) over images; one CSV row per image")
    predict.add_argument("model", type=Path, help="a folder written by `medsweep export`")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="an image file, or a folder searched recursively for images")
    source.add_argument("--dataset", help="a dataset as `medsweep sweep --dataset` takes it; predicts one split")
    predict.add_argument("--split", default="test", choices=["train", "val", "test"], help="with --dataset (default test)")
    predict.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write (default predictions.csv)")
    predict.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per forward")
    predict.add_argument("--strict", action="store_true", help="stop at the first unreadable image (exit code 2) instead of an error row")
    predict.add_argument("--cache-dir", type=Path, default=setting_default("cache_dir"), help="with --dataset synthetic: where it is made")


def image_files(path: Path) -> list[Path]:
    """``path`` itself, or every image file under the folder (sorted; hidden files skipped)."""
    from medsweep.datasets.sources import IMAGE_EXTENSIONS

    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"--images {path} is neither a file nor a folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise ConfigError(f"no image files under {path} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


@dataclass
class Prediction:
    path: Path
    probabilities: list[float] | None  # None: the file could not be read
    error: str = ""


def predict_files(
    model: ExportedModel, paths: list[Path], batch_size: int = BATCH_SIZE, strict: bool = False, advance: Any = None
) -> list[Prediction]:
    """Probabilities of every file, in ``paths``' order, ``batch_size`` at a time on the model's device.

    An unreadable file is a row with its error, or (``strict``) a :class:`DatasetError`.
    """
    import torch

    device = next(model.parameters()).device
    results: list[Prediction] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        pictures: list[dict[str, torch.Tensor]] = []
        rows: list[Prediction] = []
        for path in chunk:
            try:
                pictures.append(model.read_image(path))
                rows.append(Prediction(path, []))
            except DatasetError as error:
                if strict:
                    raise
                rows.append(Prediction(path, None, str(error)))
        if pictures:
            batch = {name: torch.stack([p[name] for p in pictures]).to(device) for name in pictures[0]}
            with torch.no_grad():
                probs = model.probabilities(model(batch).float()).cpu().tolist()
            for row, values in zip((r for r in rows if r.probabilities is not None), probs, strict=True):
                row.probabilities = values
        results.extend(rows)
        if advance is not None:
            advance(len(chunk))
    return results


def write_csv(out: Path, predictions: list[Prediction], classes: list[str], task: str) -> None:
    """The predictions as ``out``, written whole or not at all (an OS error is the CLI's one line)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, lambda path: _write_rows(path, predictions, classes, task))
    except OSError as error:
        raise write_error(error, out) from None


def _write_rows(out: Path, predictions: list[Prediction], classes: list[str], task: str) -> None:
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", *(f"prob_{name}" for name in classes), "predicted", "error"])
        for row in predictions:
            if row.probabilities is None:
                writer.writerow([str(row.path), *([""] * len(classes)), "", row.error])
                continue
            if task == "multilabel":
                predicted = "|".join(name for name, p in zip(classes, row.probabilities, strict=True) if p > MULTILABEL_THRESHOLD)
            else:
                predicted = classes[max(range(len(classes)), key=row.probabilities.__getitem__)]
            writer.writerow([str(row.path), *(f"{p:.8g}" for p in row.probabilities), predicted, ""])


def run(args: argparse.Namespace) -> int:
    import torch

    from medsweep.search.console import SweepConsole
    from medsweep.trainables.model_dir import load_model, read_model_info

    info = read_model_info(args.model)  # a folder that is not a model: one line, before torch builds anything
    check_out_path(args.out, folder=False)  # before predicting: the CSV is written last
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.images is not None:
        paths = image_files(args.images)
    else:
        from medsweep.datasets import load_dataset

        # The sweep's own split and synthetic size (recorded by export): `--dataset synthetic` is the set it tested.
        arguments = info.get("source", {}).get("dataset_arguments", {})
        paths = [sample.path for sample in load_dataset(args.dataset, cache_dir=args.cache_dir, **arguments).splits[args.split]]
    model = load_model(args.model, "cuda" if torch.cuda.is_available() else "cpu")
    console = SweepConsole()
    predictions = predict_files(model, paths, args.batch_size, args.strict, console.progress("predict", len(paths)))
    write_csv(args.out, predictions, model.class_names, model.task)
    failed = sum(p.probabilities is None for p in predictions)
    console.console.print(f"{len(predictions)} predictions in {args.out}" + (f"; {failed} unreadable (see the error column)" if failed else ""))
    return 0
