"""Staged fine-tuning: train a head (or a CDTM) on the frozen backbone, then unfreeze everything.

Li et al., "Embracing Large Natural Data: Enhancing Medical Image Analysis via
Cross-domain Fine-tuning", IEEE JBHI 2023 (official code: github qklee-lz/CDTM).
Staged fine-tuning (SFT) first fits the new parts on the frozen backbone, then
fine-tunes the whole network from that start at a tenth of the learning rate, so
full fine-tuning begins with a trained head rather than a random one whose early
gradients would disturb the pretrained features (the rationale of
linear-probe-then-fine-tune).

The official code runs the stages as two trainings: stage 2 loads stage 1's best
checkpoint (``_C.MODEL.finetune``), leaves the backbone unfrozen and divides
``init_lr`` by 10 (its ``train.py``). Here both stages are one trial, switched by
:meth:`StagedFineTuning.begin_epoch`. The architecture is the one of stage 1 in
both stages: ``stage1="linear"`` puts a Linear on the CLS token (ViT/CLIP, after
the final LayerNorm) or on the mean of the last feature map (CNNs), as the
official ``linear`` mode; ``stage1="cdtm"`` puts the cross-domain transfer module
of :mod:`.cdtm` on the patch tokens. Images are augmented in both stages, as the
official runs; nothing is preloaded since stage 2 trains the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from medsweep.trainables.backbones import build_backbone, feature_dim
from medsweep.trainables.methods.base import Method, register_method
from medsweep.trainables.methods.cdtm import CdtmConfig, TransferModule, backbone_tokens, num_tokens, strip_unused_pooling

STAGE2_LR_SCALE = 0.1  # the official stage 2 divides the learning rate by 10


@dataclass
class StagedConfig(CdtmConfig):
    """Staged fine-tuning (JBHI 2023); ``num_centers`` and ``mlp_ratio`` apply when ``stage1`` is ``cdtm``."""

    stage1: Literal["linear", "cdtm"] = field(
        default="cdtm", metadata={"help": "what trains on the frozen backbone in stage 1: a linear head, or the CDTM and head"}
    )
    stage1_epochs: int = field(default=10, metadata={"help": "epochs of stage 1; stage 2 (everything trains, lr x 0.1) runs the remaining epochs"})


class StagedFineTuning(Method):
    """Stage 1: frozen backbone, train the head (and CDTM). Stage 2: train everything at lr / 10.

    The training loop drives the stages through :meth:`begin_epoch`, which it calls
    at the start of every epoch (0-based), before building or rebuilding the optimizer:

    * it sets the trainable set of that epoch from the epoch number alone (backbone
      frozen before ``stage1_epochs``, trainable from then on), so a run resumed
      in stage 2 gets stage 2's set back on a freshly built model;
    * it returns ``None``, except at ``epoch == stage1_epochs`` where it returns
      ``0.1``: the loop must then reload the best weights so far (stage 1's best,
      a :meth:`Method.trainable_state_dict` without backbone tensors, so load it
      with ``strict=False``), rebuild the optimizer over the now-trainable
      parameters with the learning rate x 0.1 and restart the schedule.
    """

    config: StagedConfig

    def __init__(self, config: StagedConfig) -> None:
        super().__init__(config)
        self.backbone = strip_unused_pooling(build_backbone(config.backbone, config.image_size)).freeze()
        self.encoder = self.backbone.model
        dim = feature_dim(self.backbone)
        self.post = (
            TransferModule(dim, num_tokens(self.backbone, config.image_size), config.num_centers, config.mlp_ratio)
            if config.stage1 == "cdtm"
            else None
        )
        self.head = nn.Linear(dim, config.num_classes)
        self.stage = 1

    def frozen_modules(self) -> list[nn.Module]:
        return [self.encoder] if self.stage == 1 else []

    def begin_epoch(self, epoch: int) -> float | None:
        """Enter the stage of ``epoch``; ``0.1`` at the stage-2 boundary (see the class docstring), else None."""
        self.stage = 1 if epoch < self.config.stage1_epochs else 2
        self.encoder.requires_grad_(self.stage == 2)
        self.encoder.train(self.training and self.stage == 2)
        return STAGE2_LR_SCALE if epoch == self.config.stage1_epochs else None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cls, tokens = backbone_tokens(self.backbone, batch["pixel_values"])  # [B, D] or None, [B, N, D]
        if self.post is not None:
            pooled = self.post(tokens).mean(dim=1)
        else:
            pooled = cls if cls is not None else tokens.mean(dim=1)
        return self.head(pooled)  # [B, classes]


register_method("staged", StagedConfig, StagedFineTuning, "staged fine-tuning: linear or CDTM on the frozen backbone, then everything at lr / 10")
