"""Linear probe: a frozen backbone and one trainable linear layer on its pooled feature.

The frozen path has no augmentation, so the pooled feature of every image is
preloaded once and a trial only trains the head (the cheapest baseline of the
FPT and cross-domain works).

A BatchNorm without affine parameters standardises the feature before the
head, as MAE's and DINO's linear-probing protocols do: frozen features can sit
at any scale (a randomly initialised tiny ViT's CLS varies by ~0.03), and
without it one learning rate cannot suit every backbone. It adds no learnable
parameters. A training batch of one image (the last of an epoch whose training
split is one more than a multiple of the batch size) has no batch statistics:
it is standardised with the running ones instead (:class:`FeatureNorm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medsweep.trainables.backbones import build_backbone, feature_dim, pooled_features
from medsweep.trainables.methods.base import ImageInput, Method, MethodConfig, register_method


@dataclass
class LinearConfig(MethodConfig):
    """Linear probe; no fields beyond the common ones."""


class FeatureNorm(nn.BatchNorm1d):
    """MAE's linear-probe BatchNorm (no affine parameters), which standardises a one-image training batch with its
    running statistics: PyTorch refuses batch statistics of one value per channel, and a linear trial whose
    training split left one image over (e.g. 8k + 1 images at batch 8) failed its first epoch. The running
    statistics are not updated by such a batch, as they would not be by an evaluation."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training and features.shape[0] == 1:
            return F.batch_norm(features, self.running_mean, self.running_var, training=False, eps=self.eps)
        return super().forward(features)


class LinearProbe(Method):
    preloadable = True

    def __init__(self, config: LinearConfig) -> None:
        super().__init__(config)
        self.backbone = build_backbone(config.backbone, config.image_size).freeze()
        self.encoder = self.backbone.model  # registered as a submodule so counts include it
        self.norm = FeatureNorm(feature_dim(self.backbone), affine=False)
        self.head = nn.Linear(feature_dim(self.backbone), config.num_classes)

    def image_inputs(self) -> dict[str, ImageInput]:
        return {"pixel_values": ImageInput(self.config.image_size, augment=False)}

    def feature_keys(self) -> tuple[str, ...]:
        return ("pooled",)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.encoder]

    @torch.no_grad()
    def frozen_features(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pooled": pooled_features(self.backbone, pixel_values)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.norm(self.features(batch)["pooled"]))


register_method("linear", LinearConfig, LinearProbe, "linear probe on the frozen backbone's pooled feature")
