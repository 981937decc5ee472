"""Cross-domain transfer module (CDTM): a frozen backbone and a trainable token-mixing post-module.

Li et al., "Embracing Large Natural Data: Enhancing Medical Image Analysis via
Cross-domain Fine-tuning", IEEE JBHI 2023 (official code: github qklee-lz/CDTM,
where this fine-tune mode is called ``frt``). A backbone pretrained on large
natural data (CLIP LAION-2B/400M, ImageNet-21K ViT-B or ConvNeXt-B) stays frozen
and a small module learns to re-mix its patch tokens for the medical domain.

What follows the official ``models/modules.py`` and ``build_model.py``:

* Tokens. ViT/CLIP: the patch tokens of the last layer after the backbone's
  final LayerNorm, CLS dropped (timm ``forward_features(x)[:, 1:]``; for HF CLIP
  that means applying ``post_layernorm`` to every token). CNNs (ConvNeXt, and
  ResNet as the official ``res_xcep`` mode): the last feature map ``[B, C, h, w]``
  flattened to ``[B, h*w, C]``, before any head norm.
* Post-module: LayerNorm -> one cluster-attention block -> LayerNorm. The block is
  ``x = proj(M(x) @ ln_1(x)); x = x + mlp(ln_2(x))``: there is **no residual
  around the cluster attention**, as in the official ``FR_Resblock``.
* Cluster attention: the mean token of ``ln_1(x)`` is compared (cosine) with K
  learned centres; the softmax over centres weights K learned N x N matrices
  into one mixing matrix per image, which mixes the tokens. Centres and matrices
  are initialised N(0, 1) as in the official code. The official code expands
  the weights to ``[B, K, N, N]`` before summing; an einsum gives the same sum
  without that buffer.
* Head: one Linear on the mean of the output tokens.

N is fixed at build time by the image size: ``(S // patch)^2`` for ViT/CLIP
(196 at 224 px with patch 16, 576 at 384, 1024 at 512) and the last feature map's
``h * w`` for CNNs (49 at 224 px). The K mixing matrices hold ``K * N^2``
parameters: 11.5M of the ~17.1M learnable on ViT-B/16 at 224 px with K = 300
(the paper's setting), but 99.5M at 384 px and 315M at 512 px; lower
``num_centers`` at high resolution.

Deviation: the official run augments the (frozen-backbone) training images; here
the frozen path takes un-augmented images so its tokens can be preloaded once,
which gives exactly the logits of running the backbone on the fly. ``staged``
with ``stage1="cdtm"`` trains the same module with augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, ResNetConfig

from medsweep.errors import ConfigError
from medsweep.trainables.backbones import Backbone, build_backbone, feature_dim
from medsweep.trainables.methods.base import ImageInput, Method, MethodConfig, register_method
from medsweep.trainables.methods.truncated import resnet_output_size


@dataclass
class CdtmConfig(MethodConfig):
    """Cross-domain transfer module on a frozen backbone (JBHI 2023, ``frt`` mode)."""

    num_centers: int = field(default=300, metadata={"help": "learned centres, one N x N token-mixing matrix each (300 in the paper)"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "hidden width of the module's MLP as a multiple of the token width"})


# -- the backbone as a token sequence (shared with staged.py) ---------------------------


def strip_unused_pooling(backbone: Backbone) -> Backbone:
    """Drop the layers the token path never runs, so they neither count nor sit idle in an optimizer.

    The official code feeds the module from timm ``forward_features``, which never
    runs HF ViT's pooler (a Linear + tanh on CLS) nor ConvNeXt's LayerNorm of the
    pooled map. Removing them keeps parameter counts honest and, once the
    backbone trains (``staged``), keeps DDP from waiting on unused parameters.
    """
    if backbone.family == "vit":
        backbone.model.pooler = None  # what ViTModel(add_pooling_layer=False) holds
    elif backbone.family == "convnext":
        backbone.model.layernorm = nn.Identity()
    return backbone


def backbone_tokens(backbone: Backbone, pixel_values: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The backbone's last layer as ``(cls [B, D] or None for CNNs, patch tokens [B, N, D])``."""
    model = backbone.model
    if backbone.family == "vit":
        hidden = model(pixel_values=pixel_values, interpolate_pos_encoding=True).last_hidden_state
    elif backbone.family == "clip":
        hidden = model(pixel_values=pixel_values, interpolate_pos_encoding=True).last_hidden_state
        hidden = cast(CLIPVisionModel, model).post_layernorm(hidden)  # timm's CLIP ViT normalises every token, HF only CLS
    else:
        feature_map = model(pixel_values=pixel_values).last_hidden_state  # [B, C, h, w]
        return None, feature_map.flatten(2).transpose(1, 2)  # [B, h*w, C]
    return hidden[:, 0], hidden[:, 1:]  # [B, D], [B, N, D]


def num_tokens(backbone: Backbone, image_size: int) -> int:
    """N, the number of patch tokens :func:`backbone_tokens` gives at ``image_size``."""
    config = backbone.config
    if backbone.family in ("vit", "clip"):
        side = image_size // config.patch_size  # Conv2d(kernel = stride = patch)
    elif backbone.family == "convnext":
        side = image_size // config.patch_size  # stem: Conv2d(kernel = stride = patch)
        for _ in range(len(config.hidden_sizes) - 1):
            side //= 2  # each later stage opens with Conv2d(kernel = stride = 2)
    else:
        side = resnet_output_size(cast(ResNetConfig, config), image_size)
    if side < 1:
        raise ConfigError(f"image_size {image_size} is too small for backbone {backbone.identity}: no tokens left")
    return side * side


# -- the module --------------------------------------------------------------------------


class ClusterAttention(nn.Module):
    """Mix N tokens with one of K learned N x N matrices, blended by the image's similarity to K centres."""

    def __init__(self, dim: int, tokens: int, centers: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(centers, dim))  # [K, D]
        self.mixing = nn.Parameter(torch.randn(centers, tokens, tokens))  # [K, N, N]
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, N, D]
        if x.shape[1] != self.mixing.shape[-1]:
            raise ConfigError(
                f"the module was built for {self.mixing.shape[-1]} tokens but got {x.shape[1]}: "
                "image_size must be the size the tokens were computed (or preloaded) at"
            )
        query = F.normalize(x.mean(dim=1), dim=-1)  # [B, D]
        weights = (query @ F.normalize(self.centers, dim=-1).T).softmax(dim=-1)  # [B, K]
        mix = torch.einsum("bk,knm->bnm", weights, self.mixing)  # [B, N, N]
        return self.proj(mix @ x)  # [B, N, D]


class TransferModule(nn.Module):
    """The official ``Post_vit``: LayerNorm, one cluster-attention block, LayerNorm."""

    def __init__(self, dim: int, tokens: int, centers: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm_in = nn.LayerNorm(dim)
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = ClusterAttention(dim, tokens, centers)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [B, N, D] -> [B, N, D]
        x = self.norm_in(tokens)
        x = self.attn(self.ln_1(x))  # no residual here, as the official block
        x = x + self.mlp(self.ln_2(x))
        return self.norm_out(x)


class CrossDomainTransfer(Method):
    """Frozen backbone -> patch tokens (preloadable) -> :class:`TransferModule` -> token mean -> Linear."""

    preloadable = True

    def __init__(self, config: CdtmConfig) -> None:
        super().__init__(config)
        self.backbone = strip_unused_pooling(build_backbone(config.backbone, config.image_size)).freeze()
        self.encoder = self.backbone.model  # registered so counts include the frozen part
        dim = feature_dim(self.backbone)
        self.post = TransferModule(dim, num_tokens(self.backbone, config.image_size), config.num_centers, config.mlp_ratio)
        self.head = nn.Linear(dim, config.num_classes)

    def image_inputs(self) -> dict[str, ImageInput]:
        return {"pixel_values": ImageInput(self.config.image_size, augment=False)}

    def feature_keys(self) -> tuple[str, ...]:
        return ("tokens",)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.encoder]

    @torch.no_grad()
    def frozen_features(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": backbone_tokens(self.backbone, pixel_values)[1]}  # [B, N, D]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = self.features(batch)["tokens"]  # [B, N, D]
        return self.head(self.post(tokens).mean(dim=1))  # [B, classes]


register_method("cdtm", CdtmConfig, CrossDomainTransfer, "cross-domain transfer module (token mixing by learned centres) on a frozen backbone")
