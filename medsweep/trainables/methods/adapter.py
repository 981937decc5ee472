"""Bottleneck adapters in a frozen ViT (Houlsby et al., ICML 2019; AdaptFormer, Chen et al., NeurIPS 2022).

After the MLP of every block, before the block's residual sum, an adapter maps
``h -> h + up(GELU(down(h)))`` with ``down: D -> bottleneck`` and
``up: bottleneck -> D``. ``up`` starts at zero, so the adapted network starts as
exactly the pretrained one and training moves away from it. Only the adapters
and the linear head on the final CLS token train.

The adapters are attached with forward hooks on ``layer.mlp`` and live on the
method, not inside the HF model: the backbone's module tree and state-dict
keys stay those of the checkpoint, and the whole backbone is a frozen module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from transformers import ViTModel
from transformers.models.vit.modeling_vit import ViTLayer

from medsweep.trainables.backbones import pooled_features
from medsweep.trainables.methods._heads import build_frozen_vit
from medsweep.trainables.methods.base import Method, MethodConfig, register_method


@dataclass
class AdapterConfig(MethodConfig):
    """Sequential bottleneck adapters after each ViT block's MLP.

    The FPT papers' adapter baseline (2.03% learnable) matches ``bottleneck=96``
    (D / 8, one adapter per block): on ``vit-base-patch16-384`` with 5 classes,
    12 x (768 x 96 + 96 + 96 x 768 + 768) = 1,779,840 adapter weights + 3,845 head
    = 1,783,685 learnable of 87,874,181 = 2.030% (2.012% if the frozen model's
    unused 1000-class head is counted too). The default 64 (AdaptFormer's) gives 1.37%.
    """

    bottleneck: int = field(default=64, metadata={"help": "hidden width of each adapter (FPT's 2.03% baseline: 96)"})


class Bottleneck(nn.Module):
    """One adapter: the input plus a zero-initialised down-GELU-up branch."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.act(self.down(hidden)))  # [B, T, D]

    def after(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        """Forward hook: replaces the MLP's output by the adapted one."""
        return self(output)


class AdapterTuning(Method):
    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        self.backbone = build_frozen_vit(config, "adapter")
        self.encoder = cast(ViTModel, self.backbone.model)  # build_frozen_vit refuses other models
        dim = self.encoder.config.hidden_size
        self.adapters = nn.ModuleList(Bottleneck(dim, config.bottleneck) for _ in self.encoder.layers)
        for layer, adapter in zip(cast("list[ViTLayer]", self.encoder.layers), cast("list[Bottleneck]", self.adapters), strict=True):
            layer.mlp.register_forward_hook(adapter.after)
        self.head = nn.Linear(dim, config.num_classes)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.encoder]  # the adapters are hooked in from outside it

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(pooled_features(self.backbone, batch["pixel_values"]))  # [B, C]


register_method("adapter", AdapterConfig, AdapterTuning, "bottleneck adapters after each MLP of a frozen ViT")
