"""One factory for every frozen or fine-tuned backbone.

``build_backbone(name)`` accepts three kinds of names:

* a registered name (``vit-tiny``, ``vit-base-patch16-384``, ``resnet-50``...):
  the HuggingFace model is built from its config with seeded random weights, so
  the same name always gives the same weights (the preload cache relies on it)
  and nothing is downloaded;
* a local directory written by ``save_pretrained``: loaded with ``from_pretrained``;
* a ``.pth`` file of an MAE-style timm ViT (the MRM and CXR_MAE checkpoints of
  the LoRA-medical work): its ViT shape is read off the tensors and the
  weights converted (:mod:`medsweep.trainables.checkpoints`);
* anything else: treated as a hub id and loaded with ``from_pretrained``; without a
  network (the hub's host does not resolve) only from the local Hugging Face cache, at
  once rather than after the hub client's half a minute of retries, and the error says
  to pass a local directory instead.

Whatever the class underneath, a :class:`Backbone` carries the model plus what
preprocessing and the preload cache need: family, mean/std, native image size
and an identity string.

Inside ``frozen_weights_unused()`` a backbone is built on the meta device: its
architecture and parameter counts, no weights. A trial on preloaded features
builds its method that way, since its frozen backbone never runs: no random
initialisation (0.9 s for ViT-B/16 here), no weight file read or hashed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextModel,
    PretrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTModel,
)

from medsweep.errors import ConfigError

Family = Literal["vit", "clip", "convnext", "resnet"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAE_SUFFIX = ".pth"


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: how to build its config and how to feed it."""

    family: Family
    make_config: Callable[[], PretrainedConfig]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(name: str, entry: BackboneEntry) -> None:
    """Register a named backbone; names are unique and lower-case."""
    if name in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    if name != name.lower() or " " in name:
        raise ValueError(f"backbone names are lower-case without spaces, got {name!r}")
    _REGISTRY[name] = entry


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def _vit(hidden: int, layers: int, heads: int, mlp: int, patch: int, size: int) -> Callable[[], ViTConfig]:
    return lambda: ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        patch_size=patch,
        image_size=size,
    )


# Tiny variants for tests and the CPU demo (as timm registers test_vit).
register_backbone("vit-tiny", BackboneEntry("vit", _vit(32, 2, 4, 64, 8, 64), HALF_MEAN, HALF_STD, 64))
register_backbone("vit-small-demo", BackboneEntry("vit", _vit(64, 4, 4, 128, 8, 64), HALF_MEAN, HALF_STD, 64))
# Published shapes (random weights unless loaded from a directory or hub id).
register_backbone("vit-base-patch16-384", BackboneEntry("vit", _vit(768, 12, 12, 3072, 16, 384), HALF_MEAN, HALF_STD, 384))
register_backbone("vit-large-patch16-384", BackboneEntry("vit", _vit(1024, 24, 16, 4096, 16, 384), HALF_MEAN, HALF_STD, 384))
register_backbone("dino-vitb16", BackboneEntry("vit", _vit(768, 12, 12, 3072, 16, 224), IMAGENET_MEAN, IMAGENET_STD, 224))
register_backbone("dino-vitb8", BackboneEntry("vit", _vit(768, 12, 12, 3072, 8, 224), IMAGENET_MEAN, IMAGENET_STD, 224))
register_backbone(
    "clip-vit-base-patch16",
    BackboneEntry("clip", lambda: CLIPVisionConfig(image_size=224, patch_size=16), CLIP_MEAN, CLIP_STD, 224),
)
register_backbone(
    "clip-tiny",
    BackboneEntry(
        "clip",
        lambda: CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8),
        CLIP_MEAN,
        CLIP_STD,
        64,
    ),
)
register_backbone(
    "convnext-base",
    BackboneEntry("convnext", lambda: ConvNextConfig(hidden_sizes=[128, 256, 512, 1024], depths=[3, 3, 27, 3]), IMAGENET_MEAN, IMAGENET_STD, 224),
)
register_backbone(
    "convnext-tiny-test",
    BackboneEntry("convnext", lambda: ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1]), IMAGENET_MEAN, IMAGENET_STD, 64),
)
register_backbone(
    "resnet-50",
    BackboneEntry("resnet", lambda: ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3]), IMAGENET_MEAN, IMAGENET_STD, 224),
)
register_backbone(
    "resnet-tiny-test",
    BackboneEntry(
        "resnet",
        lambda: ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], layer_type="bottleneck"),
        IMAGENET_MEAN,
        IMAGENET_STD,
        64,
    ),
)

_MODEL_CLASSES: dict[Family, type[PreTrainedModel]] = {
    "vit": ViTModel,
    "clip": CLIPVisionModel,
    "convnext": ConvNextModel,
    "resnet": ResNetModel,
}
_FAMILY_BY_MODEL_TYPE: dict[str, Family] = {
    "vit": "vit",
    "dinov2": "vit",
    "clip_vision_model": "clip",
    "clip": "clip",
    "convnext": "convnext",
    "resnet": "resnet",
}


@dataclass
class Backbone:
    """A HuggingFace vision model plus what preprocessing and caching need.

    Attributes:
        model: the HF model (``ViTModel``, ``CLIPVisionModel``, ``ConvNextModel``, ``ResNetModel``).
        family: which interface the model answers to.
        mean, std: per-channel normalisation its weights expect.
        image_size: the resolution its config was built or trained for.
        identity: a short string that changes whenever the weights could differ
            (registered name + config, or a hash of the weight files); part of
            every preload cache key.
    """

    model: PreTrainedModel
    family: Family
    mean: tuple[float, ...]  # per channel; a checkpoint's preprocessor_config.json may give any
    std: tuple[float, ...]
    image_size: int
    identity: str

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    def freeze(self) -> Backbone:
        """Turn off gradients and put the model in eval mode (for frozen paths)."""
        self.model.requires_grad_(False)
        self.model.eval()
        return self


def _config_digest(config: PretrainedConfig) -> str:
    return hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:12]


def _weights_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in directory.iterdir() if p.suffix in {".safetensors", ".bin", ".json"})
    for path in files:
        digest.update(path.name.encode())
        _hash_file(digest, path)
    return digest.hexdigest()[:12]


def _file_digest(path: Path) -> str:
    return _hash_file(hashlib.sha256(), path).hexdigest()[:12]


def _hash_file(digest, path: Path):
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest


def backbone_identity(name_or_path: str, image_size: int | None = None, seed: int = 0) -> str:
    """The :attr:`Backbone.identity` a build would give, without building the model."""
    if name_or_path in _REGISTRY:
        entry = _REGISTRY[name_or_path]
        config = entry.make_config()
        if entry.family in ("vit", "clip"):
            config.image_size = image_size or entry.image_size
        return f"{name_or_path}-s{seed}-{_config_digest(config)}"
    path = Path(name_or_path).expanduser()
    if path.suffix == MAE_SUFFIX:
        return f"mae-{_file_digest(path)}"
    return f"dir-{_weights_digest(path)}" if path.is_dir() else f"hub-{name_or_path}"


def backbone_normalisation(name_or_path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std the backbone's weights expect, without building the model."""
    if name_or_path in _REGISTRY:
        entry = _REGISTRY[name_or_path]
        return entry.mean, entry.std
    path = Path(name_or_path).expanduser()
    if path.suffix == MAE_SUFFIX:
        return IMAGENET_MEAN, IMAGENET_STD  # MAE pretraining normalises with ImageNet's statistics
    if path.is_dir():
        config = AutoConfig.from_pretrained(str(path))
        return _normalisation_of(str(path), _FAMILY_BY_MODEL_TYPE.get(config.model_type, "vit"))
    return HALF_MEAN, HALF_STD


_WITHOUT_WEIGHTS: ContextVar[bool] = ContextVar("medsweep_backbones_without_weights", default=False)


@contextmanager
def frozen_weights_unused() -> Iterator[None]:
    """Backbones built inside have no weights (meta tensors): for methods whose frozen path won't run."""
    token = _WITHOUT_WEIGHTS.set(True)
    try:
        yield
    finally:
        _WITHOUT_WEIGHTS.reset(token)


def build_backbone(name_or_path: str, image_size: int | None = None, seed: int = 0) -> Backbone:
    """Build or load a backbone by registered name, local directory or hub id.

    Args:
        name_or_path: see the module docstring.
        image_size: for registered ViT/CLIP names, the input size the position
            embeddings are built for (default: the entry's own size). Loaded
            ViTs run other sizes with ``interpolate_pos_encoding``.
        seed: seed of the random weights of registered names.
    """
    if name_or_path in _REGISTRY:
        entry = _REGISTRY[name_or_path]
        config = entry.make_config()
        size = image_size or entry.image_size
        if entry.family in ("vit", "clip"):
            config.image_size = size
        with torch.random.fork_rng(devices=[]), torch.device("meta") if _WITHOUT_WEIGHTS.get() else nullcontext():
            torch.manual_seed(seed)
            # ViT's pooler (dense + tanh over CLS) is never read by any method; leaving it
            # out keeps it out of parameter counts.
            kwargs = {"add_pooling_layer": False} if entry.family == "vit" else {}
            model = _MODEL_CLASSES[entry.family](config, **kwargs)
        return Backbone(model, entry.family, entry.mean, entry.std, size, backbone_identity(name_or_path, size, seed))

    path = Path(name_or_path).expanduser()
    if path.suffix == MAE_SUFFIX:
        return _load_mae(path)
    if path.is_dir():
        if _WITHOUT_WEIGHTS.get():  # the digest reads every weight file; a weightless build needs none
            return _load_pretrained(str(path), identity=f"dir-{path.resolve()} (weights not loaded)")
        return _load_pretrained(str(path), identity=f"dir-{_weights_digest(path)}")
    if path.suffix or name_or_path.startswith((".", "/", "~")):
        raise ConfigError(
            f"backbone {name_or_path!r} is neither a registered name, an existing directory nor an MAE {MAE_SUFFIX} file; "
            f"use one of {', '.join(list_backbones())}, a folder written by save_pretrained or a ViT {MAE_SUFFIX}"
        )
    return _load_pretrained(name_or_path, identity=f"hub-{name_or_path}")


def square_size(value: int | list[int] | tuple[int, ...]) -> int:
    """A config's image or patch size as one side: transformers types it int or (height, width), medsweep's are ints."""
    assert isinstance(value, int), f"expected a square size (one int), got {value!r}"
    return value


def _load_mae(path: Path) -> Backbone:
    """An MAE ``.pth`` as a ViT backbone: shape read off the tensors, weights converted (not read when weightless)."""
    from medsweep.trainables.checkpoints import convert_mae_checkpoint, mae_vit_config, read_mae_checkpoint

    state = read_mae_checkpoint(path)
    config = mae_vit_config(state, path)
    if _WITHOUT_WEIGHTS.get():
        with torch.device("meta"):
            model = ViTModel(config, add_pooling_layer=False)
        return Backbone(model, "vit", IMAGENET_MEAN, IMAGENET_STD, square_size(config.image_size), f"mae-{path.resolve()} (weights not loaded)")
    converted, report = convert_mae_checkpoint(state, config)
    if report.mismatched or report.missing:
        first, more = (report.mismatched or report.missing)[0], len(report.mismatched) + len(report.missing) - 1
        raise ConfigError(f"MAE checkpoint {str(path)!r} does not map onto a ViT: {first} (and {more} more)")
    model = ViTModel(config, add_pooling_layer=False)
    model.load_state_dict(converted, strict=True)
    return Backbone(model.eval(), "vit", IMAGENET_MEAN, IMAGENET_STD, square_size(config.image_size), f"mae-{_file_digest(path)}")


@cache
def _hub_resolves() -> bool:
    """Whether the Hugging Face Hub's host resolves: without it the hub client retries every request for ~30 s,
    logging each try."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname or "", 443)
    except OSError:
        return False
    return True


def _load_pretrained(source: str, identity: str) -> Backbone:
    offline = not Path(source).is_dir() and not _hub_resolves()
    hub = {"local_files_only": True} if offline else {}
    try:
        config = AutoConfig.from_pretrained(source, **hub)
    except OSError as exc:  # no network, no such repo
        where = "not in the local Hugging Face cache, and the hub cannot be reached" if offline else exc.__class__.__name__
        raise ConfigError(
            f"cannot load backbone {source!r} ({where}); without a network pass a local "
            f"directory written by save_pretrained, or a registered name: {', '.join(list_backbones())}"
        ) from None
    family = _FAMILY_BY_MODEL_TYPE.get(config.model_type)
    if family is None:
        raise ConfigError(f"backbone {source!r} has model type {config.model_type!r}; supported: ViT, CLIP, ConvNeXt, ResNet")
    model: PreTrainedModel
    if _WITHOUT_WEIGHTS.get():  # the architecture from config.json, as from_pretrained builds it; no weight read
        with torch.device("meta"):
            if config.model_type == "clip":
                model = CLIPVisionModel(CLIPVisionConfig.from_pretrained(source, **hub))
            elif family == "vit":
                model = ViTModel(ViTConfig.from_pretrained(source, **hub), add_pooling_layer=False)
            else:
                model = AutoModel.from_config(config)
    elif config.model_type == "clip":
        model = CLIPVisionModel.from_pretrained(source, **hub)
    elif family == "vit":
        model = ViTModel.from_pretrained(source, add_pooling_layer=False, **hub)
    else:
        model = AutoModel.from_pretrained(source, **hub)
    mean, std = _normalisation_of(source, family)
    size = getattr(model.config, "image_size", 224)
    return Backbone(model, family, mean, std, int(size), identity)


def _normalisation_of(source: str, family: Family) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std from the checkpoint's image processor file, else the family default."""
    config_file = Path(source) / "preprocessor_config.json"
    if config_file.is_file():
        import json

        values = json.loads(config_file.read_text())
        if "image_mean" in values and "image_std" in values:
            return tuple(values["image_mean"]), tuple(values["image_std"])
    if family == "clip":
        return CLIP_MEAN, CLIP_STD
    if family == "vit":
        return HALF_MEAN, HALF_STD
    return IMAGENET_MEAN, IMAGENET_STD


def num_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def pooled_features(backbone: Backbone, pixel_values: torch.Tensor) -> torch.Tensor:
    """One vector per image ``[B, D]``: the CLS token for ViT/CLIP, the pooled map for CNNs."""
    model = backbone.model
    if backbone.family == "vit":
        out = model(pixel_values=pixel_values, interpolate_pos_encoding=True)
        return out.last_hidden_state[:, 0]
    if backbone.family == "clip":
        return model(pixel_values=pixel_values, interpolate_pos_encoding=True).pooler_output
    return model(pixel_values=pixel_values).pooler_output.flatten(1)


def feature_dim(backbone: Backbone) -> int:
    """Width of :func:`pooled_features`."""
    config = backbone.config
    if backbone.family in ("vit", "clip"):
        return int(config.hidden_size)
    return int(config.hidden_sizes[-1])
