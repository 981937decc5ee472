"""A trained method as a standalone model folder, and the ``nn.Module`` that loads it.

The folder (``medsweep export`` writes it; :func:`load_model` reads it, with no
sweep folder and no Ray):

* ``model.json``: the method's resolved flat config, class names and task, the
  preprocessing (each image input's size and stored size, mean/std), the
  backbone reference (registered name, local folder, MAE ``.pth`` or hub id,
  with the sha256 of local weight files), the validation/test figures, where
  the weights came from, and how LoRA was exported;
* ``weights.pt``: the learnable state (``Method.trainable_state_dict``), or
  for a merged LoRA the whole method state (the merged projections are
  backbone weights, so a merged export always carries the backbone);
* ``backbone/`` (``--with-backbone``): the frozen backbone as
  ``save_pretrained`` wrote it, read instead of the reference.

The loaded model takes images, not a method's batch dict: ``[B, 3, H, W]``
floats in [0, 1] (or a dict of them per image input), resized to each input's
size and normalised as evaluation does (:mod:`medsweep.trainables.inputs`).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from medsweep.datasets.images import load_image, resize_square
from medsweep.datasets.store import write_atomically
from medsweep.errors import ConfigError
from medsweep.trainables.backbones import MAE_SUFFIX, Backbone, backbone_normalisation, list_backbones
from medsweep.trainables.inputs import normalise_float, resize
from medsweep.trainables.methods import ImageInput, Method, build_method
from medsweep.trainables.methods.lora import LoRATuning
from medsweep.trainables.statistics import probabilities

MODEL_JSON = "model.json"
WEIGHTS_FILE = "weights.pt"
BACKBONE_DIR = "backbone"
FORMAT = 1  # model.json's "format": bumped when a reader of an older folder would misread a newer one
# model.json "adapters": how a method with low-rank adapters was exported (None for the others).
ADAPTERS_MERGED, ADAPTERS_KEPT = "merged", "kept"


def backbone_reference(name_or_path: str) -> dict[str, Any]:
    """What the frozen backbone was: its kind, the name or path, and the sha256 of local weights
    (so a load can tell that a folder or ``.pth`` changed since the export)."""
    if name_or_path in list_backbones():
        return {"kind": "registered", "name": name_or_path}
    path = Path(name_or_path).expanduser()
    if path.suffix == MAE_SUFFIX and path.is_file():
        return {"kind": "mae", "path": str(path.resolve()), "sha256": _sha256([path])}
    if path.is_dir():
        return {"kind": "folder", "path": str(path.resolve()), "sha256": _sha256(_weight_files(path))}
    return {"kind": "hub", "name": name_or_path}


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".json"})


def _sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def write_model_dir(
    out: Path,
    method: Method,
    config: dict[str, Any],
    classes: list[str],
    *,
    metrics: dict[str, Any],
    source: dict[str, Any],
    epochs_run: int,
    with_backbone: bool = False,
    keep_adapter: bool = False,
) -> Path:
    """Write ``method`` (trained, built from the flat ``config``) as a model folder at ``out``.

    A LoRA method is merged into its backbone unless ``keep_adapter``; ``epochs_run`` replays a
    staged method's stages on load (its trainable set depends on the stage it ended in).
    """
    if keep_adapter and not isinstance(method, LoRATuning):
        raise ConfigError(f"--keep-adapter keeps a LoRA adapter; method {config['method']!r} has none (drop the flag)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    adapters = None
    if isinstance(method, LoRATuning):
        adapters = ADAPTERS_KEPT if keep_adapter else ADAPTERS_MERGED
        if adapters == ADAPTERS_MERGED:
            method.merge_adapters()
    state = method.state_dict() if adapters == ADAPTERS_MERGED else method.trainable_state_dict()
    weights = {k: v.detach().cpu() for k, v in state.items()}
    # Each file whole or not there (a full disk mid-export leaves the previous export's, never half of one).
    write_atomically(out / WEIGHTS_FILE, lambda path: torch.save(weights, path))
    mean, std = backbone_normalisation(config["backbone"])
    if with_backbone:
        _save_backbone(config, out / BACKBONE_DIR, mean, std)
    info = {
        "format": FORMAT,
        "method": config["method"],
        "config": config,
        "task": config["task"],
        "classes": list(classes),
        "preprocessing": {
            "inputs": {name: {"size": spec.size, "stored_size": spec.stored_size} for name, spec in method.image_inputs().items()},
            "mean": list(mean),
            "std": list(std),
            "images": "RGB, square-resized (bicubic) to each input's stored_size, then resized (bilinear) to its size",
        },
        "backbone": {**backbone_reference(config["backbone"]), "included": BACKBONE_DIR if with_backbone else None},
        "adapters": adapters,
        "epochs_run": epochs_run,
        "metrics": metrics,
        "source": source,
    }
    write_atomically(out / MODEL_JSON, json.dumps(info, indent=2, default=str))
    return out


def _save_backbone(config: dict[str, Any], folder: Path, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """The frozen backbone as its method builds it (size, no pooler), from a fresh build: a trained
    method's backbone may hold injected adapters; the pretrained weights are the same."""
    fresh = build_method(config["method"], config)
    if isinstance(fresh, LoRATuning):  # a fresh LoRA's B is zero: merging changes no weight, it removes peft's wrappers
        fresh.merge_adapters()
    cast(Backbone, fresh.backbone).model.save_pretrained(str(folder))  # every method that exports holds its Backbone as .backbone
    # The mean/std the weights expect, where build_backbone reads them for a folder (an MAE's are ImageNet's, not the ViT default).
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": list(mean), "image_std": list(std)}))


def read_model_info(path: Path) -> dict[str, Any]:
    """``model.json`` of a model folder; anything else is one line naming the fix."""
    path = Path(path)
    file = path / MODEL_JSON
    if not file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ConfigError(
            f"{path} is not a medsweep model folder (no {MODEL_JSON} and {WEIGHTS_FILE}); "
            f"write one with `medsweep export SWEEP_DIR --out {shlex.quote(str(path))}`"
        )
    info = json.loads(file.read_text())
    if info.get("format", 0) > FORMAT:
        raise ConfigError(f"{path} was written by a newer medsweep (model format {info['format']}); upgrade medsweep to load it")
    return info


def _backbone_source(path: Path, info: dict[str, Any]) -> str:
    """Where the frozen backbone is read from: the folder's own copy, else the reference, checked."""
    reference = info["backbone"]
    if reference.get("included"):
        return str(path / reference["included"])
    if reference["kind"] in ("mae", "folder"):
        local = Path(reference["path"])
        files = [local] if reference["kind"] == "mae" else (_weight_files(local) if local.is_dir() else [])
        if not local.exists():
            raise ConfigError(f"backbone {local} of model {path} is gone; restore it, or export again with --with-backbone")
        if _sha256(files) != reference["sha256"]:
            raise ConfigError(f"backbone {local} changed since model {path} was exported (sha256 differs); restore it, or export again with --with-backbone")
        return str(local)
    return str(reference["name"])


class ExportedModel(nn.Module):
    """A trained method that takes images and returns logits ``[B, num_classes]``.

    ``forward(images)``: ``[B, 3, H, W]`` floats in [0, 1], resized to each of the method's image
    inputs (FPT+ takes two sizes) and normalised as evaluation does; or a dict of such tensors by
    input name, one picture per input (what :meth:`read_image` gives, so that a file goes through
    exactly the steps of the preload and the final test). ``class_names``, ``task`` and
    :meth:`probabilities` say what the logits mean.
    """

    def __init__(self, method: Method, info: dict[str, Any]) -> None:
        super().__init__()
        self.method = method
        self.info = info
        self.inputs: dict[str, ImageInput] = method.image_inputs()
        self.mean = tuple(info["preprocessing"]["mean"])
        self.std = tuple(info["preprocessing"]["std"])
        self.class_names: list[str] = list(info["classes"])
        self.task: str = info["task"]
        self.eval()

    def forward(self, images: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {}
        for name, spec in self.inputs.items():
            x = images[name] if isinstance(images, dict) else images
            batch[name] = normalise_float(resize(x.float(), spec.size), self.mean, self.std)
        return self.method(batch)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over classes (multi-class) or each label's sigmoid (multi-label), on ``logits``' device and
        dtype: the scores of :func:`~medsweep.trainables.statistics.probabilities`, the one place logits become scores."""
        scores = probabilities(logits.detach().float().cpu().numpy(), self.task)
        return torch.from_numpy(scores).to(device=logits.device, dtype=logits.dtype)

    def read_image(self, path: Path) -> dict[str, torch.Tensor]:
        """One image file as ``{input: [3, S, S] float in [0, 1]}``, each at its input's stored size,
        decoded and resized as the preload stores it; raises :class:`DatasetError` for a bad file."""
        picture = load_image(Path(path))
        return {
            name: torch.from_numpy(np.ascontiguousarray(resize_square(picture, spec.stored_size).transpose(2, 0, 1))).float().div_(255.0)
            for name, spec in self.inputs.items()
        }


def load_model(path: str | Path, device: str | torch.device | None = None) -> ExportedModel:
    """The model folder at ``path`` as an :class:`ExportedModel` in eval mode, on ``device`` (default CPU)."""
    path = Path(path)
    info = read_model_info(path)
    config = {**info["config"], "backbone": _backbone_source(path, info)}
    method = build_method(info["method"], config)
    for epoch in range(int(info.get("epochs_run", 0))):  # a staged method's trainable set is that of its last stage
        method.begin_epoch(epoch)
    state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    if info.get("adapters") == ADAPTERS_MERGED and isinstance(method, LoRATuning):
        method.merge_adapters()  # the merged state holds every weight, of a plain ViT
        method.load_state_dict(state, strict=True)
    else:
        missing = set(state) - set(method.state_dict())
        if missing:
            raise ConfigError(f"{path / WEIGHTS_FILE} does not fit method {info['method']!r} (e.g. {sorted(missing)[0]}); export it again")
        method.load_state_dict(state, strict=False)
    model = ExportedModel(method, info)
    return model.to(device) if device is not None else model
