"""BitFit (Ben Zaken et al., ACL 2022): train only the bias terms of a frozen backbone, and a new head.

Every weight matrix, embedding and norm scale of the pretrained backbone stays
fixed; every bias (attention and MLP projections, LayerNorm / BatchNorm shifts,
the patch embedding's) trains, with a new linear head on the pooled feature
(0.1% of ViT-B's parameters). Works with any backbone family; nothing is
preloaded, since the biases change the frozen path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medsweep.trainables.backbones import build_backbone, feature_dim, pooled_features
from medsweep.trainables.methods._heads import without_pooler
from medsweep.trainables.methods.base import Method, MethodConfig, register_method


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit; no fields beyond the common ones."""


class BitFit(Method):
    def __init__(self, config: BitFitConfig) -> None:
        super().__init__(config)
        self.backbone = without_pooler(build_backbone(config.backbone, config.image_size))
        self.encoder = self.backbone.model  # registered as a submodule: its biases train, all of it is counted
        for pname, param in self.encoder.named_parameters():
            param.requires_grad_(pname.endswith("bias"))
        self.head = nn.Linear(feature_dim(self.backbone), config.num_classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(pooled_features(self.backbone, batch["pixel_values"]))  # [B, C]


register_method("bitfit", BitFitConfig, BitFit, "BitFit: only the bias terms of the backbone and a linear head train")
