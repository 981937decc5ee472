"""Truncated transfer learning (TTL): keep only the early part of a pretrained CNN and train all of it.

Peng et al., "Rethinking Transfer Learning for Medical Image Classification",
BMVC 2023 (official code: github PL97/TTL, ``utils/models.py``). The paper
finds that the low- and mid-level features of a natural-image network transfer
to medical images better than its high-level ones, and that cutting the network
and training what is left (all of it, with a new head) matches or beats full
fine-tuning with fewer parameters.

Truncation, on an HF ``ResNetModel`` (stem ``embedder``, residual layers
``encoder.stages[i].layers[j]``):

* ``granularity="block"``: keep the stem and stages 1..k (k = 1, 2, 3 for
  ResNet-50 in the paper); the official ``truncate_resnet`` keeps
  ``children()[:4 + k]`` of a torchvision ResNet.
* ``granularity="layer"``: keep the stem and the first k - 1 residual layers
  counted across all stages (k = 1..16 for ResNet-50's 16 bottlenecks; k = 1
  keeps the stem alone), as the official ``layer_truncate_resnet`` indexes them.
* ``truncation=-1``: the whole network.

Head, as the official code: ``[AdaptiveAvgPool2d(1)] -> Flatten -> Linear`` with a
Kaiming-normal weight. ``pool`` is the official ``--pooling`` flag; the published
block-wise runs pooled. At -1 the official network ends with ResNet's own
average pool, so the whole network always pools here too.

Every kept layer keeps its pretrained weights and trains (BatchNorm included);
the discarded stages are not kept, so :meth:`Method.parameter_counts` counts only
what trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import nn
from transformers import ResNetConfig, ResNetModel
from transformers.models.resnet.modeling_resnet import ResNetStage

from medsweep.errors import ConfigError
from medsweep.trainables.backbones import build_backbone
from medsweep.trainables.methods.base import Method, MethodConfig, register_method


@dataclass
class TruncatedConfig(MethodConfig):
    """Truncated transfer learning on a ResNet (BMVC 2023)."""

    backbone: str = field(default="resnet-tiny-test", metadata={"help": "a ResNet: registered name (resnet-50), local save_pretrained folder or hub id"})
    truncation: int = field(default=-1, metadata={"help": "k: keep stages 1..k (block) or the first k-1 residual layers (layer); -1 keeps the whole network"})
    granularity: Literal["block", "layer"] = field(
        default="block", metadata={"help": "truncate at stage (block-wise TTL) or residual-layer (layer-wise TTL) boundaries"}
    )
    pool: bool = field(
        default=True,
        metadata={"help": "global average pool before the head (as the published block-wise runs); off: flatten the whole map (truncation -1 always pools)"},
    )


def _stride2(side: int) -> int:
    """Side after a stride-2 convolution or pooling of a ResNet: 7x7 pad 3, 3x3 pad 1 and 1x1 pad 0 all give ceil(side / 2)."""
    return (side + 1) // 2


def _per_stage(values: list[int] | tuple[int, ...] | None) -> list[int]:
    """A ResNetConfig's ``depths`` or ``hidden_sizes``: typed optional in transformers, always set by ResNetConfig."""
    assert values is not None
    return list(values)


def resnet_output_size(config: ResNetConfig, image_size: int, layers: int | None = None) -> int:
    """Side of the feature map after the stem and the first ``layers`` residual layers (all when None)."""
    side = _stride2(_stride2(image_size))  # stem: 7x7/2 convolution, 3x3/2 max pool
    strides = [
        2 if j == 0 and (i > 0 or config.downsample_in_first_stage) else 1
        for i, depth in enumerate(_per_stage(config.depths))
        for j in range(depth)
    ]
    for stride in strides[:layers]:
        if stride == 2:
            side = _stride2(side)
    return side


def kept_layers(config: TruncatedConfig, resnet: ResNetConfig, name: str) -> int:
    """How many residual layers (across all stages) the truncation keeps; ConfigError when out of range."""
    depths = _per_stage(resnet.depths)
    total = sum(depths)
    if config.truncation == -1:
        return total
    stages = len(depths)
    if config.granularity == "block":
        if config.truncation > stages - 1:
            raise ConfigError(
                f"truncation {config.truncation} is out of range for {name} at block granularity: it has {stages} stages, "
                f"use 1..{stages - 1} (stem + stages 1..k) or -1 (whole network)"
            )
        return sum(depths[: config.truncation])
    if config.truncation > total:
        raise ConfigError(
            f"truncation {config.truncation} is out of range for {name} at layer granularity: it has {total} residual layers, "
            f"use 1..{total} (stem + the first k-1 layers) or -1 (whole network)"
        )
    return config.truncation - 1


class TruncatedTransfer(Method):
    """Stem + the kept residual layers of a pretrained ResNet, all trainable, and a new linear head."""

    def __init__(self, config: TruncatedConfig) -> None:
        super().__init__(config)
        backbone = build_backbone(config.backbone, config.image_size)
        if backbone.family != "resnet":
            raise ConfigError(f"method 'truncated' needs a ResNet backbone; {config.backbone!r} is a {backbone.family} model")
        model, resnet = cast(ResNetModel, backbone.model), cast(ResNetConfig, backbone.config)
        layers = [layer for stage in cast("list[ResNetStage]", model.encoder.stages) for layer in stage.layers]
        keep = kept_layers(config, resnet, config.backbone)
        self.trunk = nn.Sequential(model.embedder, *layers[:keep])  # [B, 3, S, S] -> [B, C, h, w]

        widths = [width for width, depth in zip(_per_stage(resnet.hidden_sizes), _per_stage(resnet.depths), strict=True) for _ in range(depth)]
        channels = widths[keep - 1] if keep else resnet.embedding_size
        pool = config.pool or config.truncation == -1
        side = 1 if pool else resnet_output_size(resnet, config.image_size, keep)
        linear = nn.Linear(channels * side * side, config.num_classes)
        nn.init.kaiming_normal_(linear.weight)
        self.head = nn.Sequential(*([nn.AdaptiveAvgPool2d(1)] if pool else []), nn.Flatten(), linear)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.trunk(batch["pixel_values"]))  # [B, classes]


register_method("truncated", TruncatedConfig, TruncatedTransfer, "truncated transfer learning: first k blocks or layers of a pretrained ResNet, all trained")
