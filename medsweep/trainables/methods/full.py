"""Full fine-tuning: every backbone weight trains, with a new linear head on the pooled feature.

The upper bound every PETL method is measured against (100% learnable in the
FPT/FPT+ tables, Huang et al., MICCAI 2024 / TNNLS 2025) and the ``full`` mode
of the cross-domain work (Li et al., JBHI 2023). Works with any backbone
family: ViT and CLIP pool the CLS token, ConvNeXt and ResNet their pooled map.
Nothing is frozen, so nothing can be preloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medsweep.trainables.backbones import build_backbone, feature_dim, pooled_features
from medsweep.trainables.methods._heads import without_pooler
from medsweep.trainables.methods.base import Method, MethodConfig, register_method


@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning; no fields beyond the common ones (the learning rate is the knob that matters)."""


class FullFineTuning(Method):
    ddp = True  # trains the whole backbone: DDP over --workers whole GPUs in a sweep

    def __init__(self, config: FullConfig) -> None:
        super().__init__(config)
        self.backbone = without_pooler(build_backbone(config.backbone, config.image_size))
        self.encoder = self.backbone.model  # registered as a submodule: trained and counted
        self.head = nn.Linear(feature_dim(self.backbone), config.num_classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(pooled_features(self.backbone, batch["pixel_values"]))  # [B, C]


register_method("full", FullConfig, FullFineTuning, "full fine-tuning of the backbone with a linear head")
