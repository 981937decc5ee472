"""The contract every PETL method implements, and the registry of methods.

A method is one module file holding a config dataclass (subclass of
:class:`MethodConfig`), an ``nn.Module`` (subclass of :class:`Method`) and one
``register_method(...)`` call, as peft's tuners are organised.

Inputs. A method names the images it consumes in :meth:`Method.image_inputs`
(e.g. FPT+: the 512 px ``pixel_values`` for the frozen model and the 128 px
``side_pixel_values`` for the side network). The preload step stores each as
uint8 at its ``stored_size`` (larger than the size for an augmented input, to
crop from), so a trial never decodes an image file.

Preloading. A method whose frozen path needs no augmentation sets
``preloadable = True`` and implements :meth:`Method.frozen_features`: a
deterministic function of the frozen input image returning a dict of
per-sample tensors. The preload step runs it once per image and stores the
result; at training time those tensors arrive in the batch under the same keys
and :meth:`Method.forward` must give the same logits as when it computes them
on the fly (``Method.features`` does that dispatch).

Batches. ``forward(batch)`` receives a dict of tensors: each image input as
normalised float ``[B, 3, S, S]`` (augmented in training if its
``ImageInput.augment`` is set), each preloaded feature as float32, and returns
logits ``[B, num_classes]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from medsweep.errors import ConfigError
from medsweep.trainables.config import MethodConfig
from medsweep.trainables.layer_decay import layer_scales

# The smallest area fraction of the random resized crop (official FPT: scale 0.8-1.0).
CROP_MIN_SCALE = 0.8


@dataclass(frozen=True)
class ImageInput:
    """An image a method consumes: its square size and whether training augments it."""

    size: int
    augment: bool

    @property
    def stored_size(self) -> int:
        """The size the store keeps: an augmented input at ``size / CROP_MIN_SCALE``, so the random
        resized crop is taken from a picture larger than the training size, as the official code
        crops from the source image; evaluation resizes it to ``size``."""
        return math.ceil(self.size / CROP_MIN_SCALE) if self.augment else self.size


class Method(nn.Module):
    """Base class of every PETL method; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    preloadable: ClassVar[bool] = False
    frozen_input: ClassVar[str] = "pixel_values"
    # A method that trains the whole backbone on its own: a sweep runs its trials with DDP over
    # ``--workers`` whole GPUs (one per worker) instead of a probed fraction of one GPU.
    ddp: ClassVar[bool] = False
    # Config fields in which the members of one fused cohort (:mod:`medsweep.trainables.cohort`) may differ:
    # its batched forward feeds them per member (dropout rates: every ``nn.Dropout``; the rest through
    # :meth:`fuse_members`). Members must agree on every other field.
    member_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        self.config = config

    # -- inputs -----------------------------------------------------------------
    def image_inputs(self) -> dict[str, ImageInput]:
        """Images this method consumes, by batch key. Default: the backbone input, augmented."""
        return {"pixel_values": ImageInput(self.config.image_size, augment=True)}

    def stored_inputs(self, preloaded: bool) -> dict[str, ImageInput]:
        """Images the loop must supply: without the frozen input when features are preloaded."""
        inputs = dict(self.image_inputs())
        if preloaded and self.preloadable:
            inputs.pop(self.frozen_input, None)
        return inputs

    def feature_keys(self) -> tuple[str, ...]:
        """Keys :meth:`frozen_features` returns (empty for methods that cannot preload)."""
        return ()

    def preload_key(self) -> dict[str, Any]:
        """Everything besides data and backbone that changes :meth:`frozen_features` (cache key part)."""
        return {"method": self.name, "image_size": self.config.image_size}

    @torch.no_grad()
    def frozen_features(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen path: normalised images ``[B, 3, S, S]`` to per-sample tensors ``{key: [B, ...]}``."""
        raise NotImplementedError(f"method {self.name!r} has no preloadable frozen path")

    def features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Preloaded features from the batch when present, else the frozen path on the fly."""
        keys = self.feature_keys()
        if keys and all(k in batch for k in keys):
            return {k: batch[k] for k in keys}
        return self.frozen_features(batch[self.frozen_input])

    # -- training ---------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def begin_epoch(self, epoch: int) -> float | None:
        """Called by the loop before each epoch (0-based); a method with stages changes itself here.

        Return None to go on. Return a factor to start a new stage: the loop then
        reloads the best weights so far, rebuilds the optimizer over the
        now-trainable parameters at ``lr * factor`` and restarts the schedule
        (cross-domain staged fine-tuning returns 0.1 when it unfreezes).
        """
        return None

    def frozen_modules(self) -> list[nn.Module]:
        """Submodules that never train; kept in eval mode by :meth:`train`."""
        return []

    def to_device(self, device: torch.device) -> Method:
        """``to(device)`` that leaves a frozen model built without weights (meta tensors, see
        ``backbones.frozen_weights_unused``) where it is: there is nothing to copy."""
        return self._apply(lambda t: t if t.is_meta else t.to(device))

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def fuse_members(self, members: list[Method]) -> dict[str, torch.Tensor]:
        """Make this model (a copy of a member that a fused cohort runs for all ``members``, which differ
        only in :attr:`member_fields`) serve every member; return the per-member tensors
        ``{"module.attribute": [K, ...]}`` the cohort sets on it inside its batched forward."""
        return {}

    def param_groups(self, weight_decay: float, decay: str = "matrices", layer_decay: float = 1.0) -> list[dict[str, Any]]:
        """Optimizer groups over trainable parameters, each with the ``lr_scale`` its lr is multiplied by.

        ``decay="matrices"``: no weight decay on biases, norms, tokens, prompts
        (the timm / MAE rule); ``"all"``: every trainable parameter decays (FPT's
        official code). ``layer_decay`` < 1 scales a ViT's lr by depth
        (:mod:`medsweep.trainables.layer_decay`). Without layer decay there are
        always two groups, decayed then not, at scale 1.
        """
        named = list(self.named_parameters())
        scales = layer_scales((n for n, _ in named), layer_decay, f"method {self.name!r} on backbone {self.config.backbone!r}")
        groups: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
        for pname, param in named:
            if not param.requires_grad:
                continue
            decayed = decay == "all" or not (param.ndim < 2 or pname.endswith(("bias", "token", "prompts")))
            groups.setdefault((decayed, scales[pname]), []).append(param)
        return [
            {"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale}
            for (decayed, scale), params in groups.items()
            if params or scale == 1.0
        ]

    def parameter_counts(self) -> tuple[int, int]:
        """(learnable, total) parameters, counted as the method's paper counts them."""
        learnable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return learnable, total

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the learnable tensors: what a checkpoint needs (the frozen part is rebuilt)."""
        frozen = {name for name, param in self.named_parameters() if not param.requires_grad}
        # Buffers (norm statistics...) are kept: they are state the training produced; those of a
        # frozen model built without weights are meta tensors, with nothing to keep.
        return {k: v for k, v in self.state_dict().items() if k not in frozen and not v.is_meta}


# -- registry ---------------------------------------------------------------------


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_cls: type[MethodConfig]
    model_cls: type[Method]
    description: str


_METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, config_cls: type[MethodConfig], model_cls: type[Method], description: str) -> None:
    """Register a method under a unique lower-case name (``fpt_plus``, ``lora``...)."""
    if not name or not name.replace("_", "").isalnum() or name != name.lower():
        raise ValueError(f"method names are lower-case letters, digits and underscores, got {name!r}")
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered")
    if not issubclass(config_cls, MethodConfig) or not issubclass(model_cls, Method):
        raise TypeError(f"method {name!r}: config must subclass MethodConfig and model must subclass Method")
    if "method" in vars(config_cls):
        raise ValueError(f"method {name!r}: {config_cls.__name__} is already the config of {config_cls.method!r}")
    model_cls.name = name
    config_cls.method = name  # its fields are checked with the rules of this name's record in spaces
    _METHODS[name] = MethodEntry(name, config_cls, model_cls, description)


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> MethodEntry:
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from: {', '.join(list_methods())}")
    return _METHODS[name]


def runs_ddp(name: str) -> bool:
    """Whether a sweep runs ``name``'s trials with DDP on whole GPUs (see :attr:`Method.ddp`)."""
    return get_method(name).model_cls.ddp


def make_config(name: str, values: dict[str, Any] | None = None) -> MethodConfig:
    """A flat dict (a trial's config) to the method's config: keys of the trial config's other
    groups are ignored, a key of no group is refused (see :mod:`medsweep.trainables.config`)."""
    return get_method(name).config_cls.from_dict(values or {})


def build_method(name: str, values: dict[str, Any] | MethodConfig | None = None) -> Method:
    entry = get_method(name)
    config = values if isinstance(values, MethodConfig) else entry.config_cls.from_dict(values or {})
    return entry.model_cls(config)


def save_config(config: MethodConfig, path: Path) -> None:
    path.write_text(config.to_json())
