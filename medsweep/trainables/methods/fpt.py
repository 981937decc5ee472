"""FPT and FPT+: a frozen ViT at high resolution feeding a small side ViT through fine-grained prompts.

Fine-grained prompt tuning (Huang et al., MICCAI 2024) and FPT+ (TNNLS 2025),
reproduced from the official implementation (github YijinHuang/FPT):

* The large pretrained model (LPM) is a frozen ViT that sees the image at high
  resolution (512 px in the papers). Inside each extracted attention layer
  (FPT+: the last half, FPT: all) every head scores each token by the attention
  it receives and keeps the key and value projections of its top
  ``int(N * keep_ratio)`` tokens. Nothing else of the LPM is used, and its path
  has no augmentation, so those K/V are preloaded once per image.
* A side ViT, randomly initialised, ``side_reduction`` times narrower and with
  one layer per extracted LPM layer, sees the same image at low resolution.
* ``num_prompts`` learnable prompts per layer read the frozen K/V by
  cross-attention (no learnable K/V projection, no FFN), are projected to the
  side width, appended to the side tokens of the matching layer, attended
  with them and dropped again. A linear head classifies the side CLS token.

FPT+ keeps its prompts in the LPM width with a LayerNorm as the query and adds
them back before the output projection; FPT keeps them in the side width,
projects them up for the query and adds them back after the projection.

Searching the keep ratio without re-preloading: ``frozen_features`` stores, per
head, the tokens of ``preload_keep_ratio`` sorted by importance (stable sort,
descending score). A trial with a smaller ``keep_ratio`` takes the first
``int(N * keep_ratio)`` of them, which are exactly the tokens it would select
itself; the cross-attention over K/V does not depend on their order.

Parameters are counted as the papers count them: learnable = side network +
fusion + prompts + head; total adds the frozen LPM as the official code loads
it (``ViTForImageClassification``: no pooler, an unused 1000-class head). For
``vit-base-patch16-384`` at 512 px with 5 classes that gives FPT+ 900,965
learnable = 1.027 % and FPT 1,602,341 = 1.811 %, the published 1.03 and 1.81.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast

import torch
from torch import nn
from torch.nn import functional as F
from transformers import ViTConfig, ViTModel
from transformers.models.vit.modeling_vit import ViTAttention, ViTLayer

from medsweep.errors import ConfigError, StoreError
from medsweep.trainables.backbones import build_backbone, square_size
from medsweep.trainables.config import not_searched
from medsweep.trainables.member_attention import MEMBERS_ATTENTION, MemberAttention
from medsweep.trainables.methods.base import ImageInput, Method, MethodConfig, register_method

# The official LPM is an ImageNet-1k ViTForImageClassification whose classifier
# is never used but is counted in the total; we count the same head so the
# percentages compare with the published ones whatever checkpoint is loaded.
PAPER_LPM_HEAD_CLASSES = 1000


@dataclass
class _FineGrainedPromptConfig(MethodConfig):
    """Fields shared by FPT and FPT+ (defaults from the official configs)."""

    keep_ratio: float = field(
        default=0.2,
        metadata={"help": "fraction of LPM tokens whose keys/values each head keeps (important-token selection)"},
    )
    preload_keep_ratio: float = field(
        default=0.5,
        metadata={"help": "fraction stored by the preload, sorted by importance; set to the largest keep_ratio searched"},
    )
    num_prompts: int = field(default=16, metadata={"help": "learnable fine-grained prompts per extracted layer"})
    side_image_size: int = field(
        default=0,
        metadata={"help": "side network input in pixels; 0 derives it from image_size (FPT+ 1/4, FPT 7/16: 128 / 224 at 512)"},
    )
    side_reduction: int = field(default=8, metadata={"help": "side network width = LPM hidden size / side_reduction"})
    fusion_dropout: float = field(default=0.5, metadata={"help": "dropout on the fused prompts entering the side network"})
    token_importance: Literal["global", "class_token"] = field(
        default="global",
        metadata={"help": "token score: attention received averaged over all queries (global) or from the CLS query"},
    )
    legacy_vit_embeddings: bool = field(
        default=True,
        metadata=not_searched(
            "frozen ViT position embeddings interpolated as the official code does (transformers < 4.42: "
            "bicubic by scale_factor (grid + 0.1) / pretrained grid); false: transformers 5's size=grid"
        ),
    )


@dataclass
class FPTPlusConfig(_FineGrainedPromptConfig):
    """FPT+: last half of the LPM layers, prompts in the LPM width, side input image_size / 4."""


@dataclass
class FPTConfig(_FineGrainedPromptConfig):
    """FPT: all LPM layers, prompts in the side width, side input 7/16 of image_size."""


def legacy_position_embeddings(table: torch.Tensor, height: int, width: int, patch_size: int | list[int] | tuple[int, ...]) -> torch.Tensor:
    """A ViT's position table ``[1, 1 + n, D]`` resized for an ``height x width`` input the way
    transformers did before 4.42 and the official FPT frozen ViT (``modules/frozen_vit.py``) still does.

    That older code (from DINO) resizes the square grid of the table bicubically by a
    ``scale_factor`` of ``(grid + 0.1) / pretrained grid`` rather than to ``size=grid`` as
    transformers 5 does. Both give the same shape, but the sampling positions differ whenever the
    grid changes (e.g. a 384 px checkpoint run at 512 px), which changes the logits and the tokens
    each head selects; at the pretrained grid the table is returned unchanged by both.
    """
    patch = square_size(patch_size)
    positions = table.shape[1] - 1
    rows, cols = height // patch, width // patch
    if rows * cols == positions and height == width:
        return table
    side = math.isqrt(positions)
    dim = table.shape[-1]
    grid = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)  # [1, D, side, side]
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic", align_corners=False)
    if grid.shape[-2:] != (rows, cols):  # the + 0.1 is there so the floor lands on the grid
        raise ConfigError(f"legacy position interpolation gave a {tuple(grid.shape[-2:])} grid for {rows}x{cols} patches")
    return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)


class PromptFusion(nn.Module):
    """Fine-grained prompts reading the frozen keys/values of each extracted layer by cross-attention.

    One prompt set per layer; the query norm/projection and the output
    projection are shared by all layers, as in the official ``FusionModule``.
    """

    def __init__(
        self,
        num_layers: int,
        num_prompts: int,
        lpm_hidden: int,
        num_heads: int,
        side_hidden: int,
        prompts_in_lpm_width: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.prompts_in_lpm_width = prompts_in_lpm_width
        prompt_dim = lpm_hidden if prompts_in_lpm_width else side_hidden
        self.prompts = nn.Parameter(torch.empty(num_layers, num_prompts, prompt_dim))  # [L, P, d]
        nn.init.normal_(self.prompts, std=1e-6)
        # FPT+: LayerNorm(prompts) is the query; FPT: a projection up to the LPM width is.
        self.query_norm = nn.LayerNorm(lpm_hidden) if prompts_in_lpm_width else nn.Identity()
        self.query_proj = nn.Identity() if prompts_in_lpm_width else nn.Linear(side_hidden, lpm_hidden)
        self.out_proj = nn.Linear(lpm_hidden, side_hidden)
        self.dropout = nn.Dropout(dropout)
        # Which keys every prompt attends ([1, tokens] bool), None: all. A fused cohort pads members with smaller
        # keep ratios to its largest and masks the rest (see _FineGrainedPromptTuning.fuse_members).
        self.key_mask: torch.Tensor | None = None
        # In a fused cohort's model: the members' prompts attend to the keys they share in one call
        # (medsweep.trainables.member_attention), not member by member.
        self.members_share_keys = False

    def forward(self, key_states: torch.Tensor, value_states: torch.Tensor) -> torch.Tensor:
        """Frozen K/V ``[B, L, H, K, hd]`` to fused prompts ``[B, L, P, side_hidden]``."""
        batch, layers, heads, tokens, head_dim = key_states.shape
        num_prompts = self.prompts.shape[1]
        query = self.query_proj(self.query_norm(self.prompts))  # [L, P, D]
        query = query.view(layers, num_prompts, heads, head_dim).transpose(1, 2)  # [L, H, P, hd]
        query = query.unsqueeze(0).expand(batch, -1, -1, -1, -1).reshape(batch * layers, heads, num_prompts, head_dim)
        keys = key_states.reshape(batch * layers, heads, tokens, head_dim)
        values = value_states.reshape(batch * layers, heads, tokens, head_dim)
        if self.members_share_keys:
            context = MemberAttention.apply(query, keys, values, self.key_mask, None)
        else:
            context = F.scaled_dot_product_attention(query, keys, values, attn_mask=self.key_mask)  # [B*L, H, P, hd], scale 1/sqrt(hd)
        context = context.transpose(1, 2).reshape(batch, layers, num_prompts, heads * head_dim)  # [B, L, P, D]
        if self.prompts_in_lpm_width:
            fused = self.out_proj(context + self.prompts)
        else:
            fused = self.out_proj(context) + self.prompts
        return self.dropout(fused)


class SideViT(nn.Module):
    """A narrow, randomly initialised ViT whose layer ``i`` also attends to the fused prompts of layer ``i``."""

    def __init__(self, config: ViTConfig, num_classes: int) -> None:
        super().__init__()
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.head = nn.Linear(config.hidden_size, num_classes)
        # As ViTForImageClassification initialises its classifier in the official code.
        nn.init.trunc_normal_(self.head.weight, std=config.initializer_range)
        nn.init.zeros_(self.head.bias)

    def forward(self, pixel_values: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Side images ``[B, 3, s, s]`` and fused prompts ``[B, L, P, d]`` to logits ``[B, C]``."""
        hidden = self.vit.embeddings(pixel_values, interpolate_pos_encoding=True)  # [B, 1 + n, d]
        num_prompts = prompts.shape[2]
        for i, layer in enumerate(self.vit.layers):
            hidden = layer(torch.cat([hidden, prompts[:, i]], dim=1))[:, :-num_prompts]
        return self.head(self.vit.layernorm(hidden)[:, 0])


class _FineGrainedPromptTuning(Method):
    """Shared body of FPT and FPT+; the subclasses differ only in the class settings below."""

    preloadable = True
    member_fields = ("keep_ratio", "fusion_dropout")
    # Which LPM layers feed the side network: "last_half" (FPT+, 6-11 of 12) or "all" (FPT).
    lpm_layers: ClassVar[Literal["last_half", "all"]]
    # Derived side input size as a fraction of image_size (FPT+ 128 / 512, FPT 224 / 512).
    side_size_fraction: ClassVar[float]
    prompts_in_lpm_width: ClassVar[bool]
    config: _FineGrainedPromptConfig

    def __init__(self, config: _FineGrainedPromptConfig) -> None:
        super().__init__(config)
        # Built at the backbone's own resolution and run with interpolated position embeddings, as the
        # official code runs a 384 px checkpoint at 512 px; ``legacy_vit_embeddings`` picks the
        # official interpolation (see legacy_position_embeddings), else transformers' current one.
        self.backbone = build_backbone(config.backbone).freeze()
        if not isinstance(self.backbone.model, ViTModel):
            raise ConfigError(
                f"{self.name} needs a ViT backbone (HF ViTModel) for its frozen model; "
                f"{config.backbone!r} is a {type(self.backbone.model).__name__}"
            )
        self.lpm = self.backbone.model
        self.lpm.pooler = None  # the official LPM (ViTForImageClassification) has none
        lpm_config = self.lpm.config
        hidden, heads, depth = lpm_config.hidden_size, lpm_config.num_attention_heads, lpm_config.num_hidden_layers
        if hidden % config.side_reduction:
            raise ConfigError(f"LPM hidden size {hidden} is not divisible by side_reduction {config.side_reduction}")
        side_hidden = hidden // config.side_reduction
        if side_hidden % heads:
            raise ConfigError(
                f"side width {side_hidden} (= {hidden} / side_reduction) must be divisible by the {heads} attention heads"
            )
        self.extracted_layers = list(range(depth // 2, depth)) if self.lpm_layers == "last_half" else list(range(depth))
        self.head_dim = hidden // heads

        patch = square_size(lpm_config.patch_size)
        self.num_tokens = (config.image_size // patch) ** 2 + 1  # LPM tokens incl. CLS
        self.keep_tokens = int(self.num_tokens * config.keep_ratio)
        self.preload_tokens = int(self.num_tokens * config.preload_keep_ratio)
        if self.keep_tokens < 1:
            raise ConfigError(f"keep_ratio {config.keep_ratio} keeps no token of {self.num_tokens}; raise it")
        self.side_image_size = config.side_image_size or max(patch, int(config.image_size * self.side_size_fraction) // patch * patch)
        if self.side_image_size < patch:
            raise ConfigError(f"side_image_size {self.side_image_size} is smaller than one {patch} px patch")

        side_config = copy.deepcopy(lpm_config)
        side_config.num_hidden_layers = len(self.extracted_layers)
        side_config.hidden_size = side_hidden
        side_config.intermediate_size = 4 * side_hidden
        side_config.image_size = self.side_image_size
        side_config.hidden_dropout_prob = 0.0
        side_config.attention_probs_dropout_prob = 0.0
        self.side = SideViT(side_config, config.num_classes)
        self.fusion = PromptFusion(
            num_layers=len(self.extracted_layers),
            num_prompts=config.num_prompts,
            lpm_hidden=hidden,
            num_heads=heads,
            side_hidden=side_hidden,
            prompts_in_lpm_width=self.prompts_in_lpm_width,
            dropout=config.fusion_dropout,
        )

    # -- inputs -----------------------------------------------------------------
    def image_inputs(self) -> dict[str, ImageInput]:
        return {
            "pixel_values": ImageInput(self.config.image_size, augment=False),
            "side_pixel_values": ImageInput(self.side_image_size, augment=True),
        }

    def feature_keys(self) -> tuple[str, ...]:
        return ("key_states", "value_states")

    def preload_key(self) -> dict[str, Any]:
        return {
            **super().preload_key(),
            "layers": self.extracted_layers,
            "preload_keep_ratio": self.config.preload_keep_ratio,
            "token_importance": self.config.token_importance,
            "legacy_vit_embeddings": self.config.legacy_vit_embeddings,
        }

    def frozen_modules(self) -> list[nn.Module]:
        return [self.lpm]

    # -- frozen path ------------------------------------------------------------
    @torch.no_grad()
    def frozen_features(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images ``[B, 3, S, S]`` to per-head keys/values of the most important tokens.

        Returns ``key_states`` and ``value_states``, each float32
        ``[B, L, heads, preload_tokens, head_dim]``, tokens in descending importance.
        """
        pixel_values = pixel_values.to(self.lpm.embeddings.patch_embeddings.projection.weight.dtype)
        hidden = self._embeddings(pixel_values)  # [B, N, D]
        last = self.extracted_layers[-1]
        keys, values = [], []
        for i, layer in enumerate(cast("list[ViTLayer]", self.lpm.layers[: last + 1])):
            if i in self.extracted_layers:
                key, value = self._important_tokens(layer.attention, layer.layernorm_before(hidden))
                keys.append(key)
                values.append(value)
            if i < last:  # nothing after the last extracted layer's attention input is used
                hidden = layer(hidden)
        return {"key_states": torch.stack(keys, dim=1).float(), "value_states": torch.stack(values, dim=1).float()}

    def _embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The LPM's input tokens ``[B, N, D]``, position embeddings interpolated as configured."""
        embeddings = self.lpm.embeddings
        if not self.config.legacy_vit_embeddings:
            return embeddings(pixel_values, interpolate_pos_encoding=True)
        height, width = pixel_values.shape[-2:]
        patches = embeddings.patch_embeddings(pixel_values)  # [B, n, D]
        cls = embeddings.cls_token.expand(patches.shape[0], -1, -1)
        positions = legacy_position_embeddings(embeddings.position_embeddings, height, width, embeddings.patch_size)
        return torch.cat([cls, patches], dim=1) + positions  # dropout: the frozen LPM is in eval mode

    def _important_tokens(self, attention: ViTAttention, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Recompute one frozen attention layer's K/V and probabilities; keep each head's top tokens.

        ``normed`` is the layer's attention input ``[B, N, D]``; returns keys and
        values ``[B, heads, preload_tokens, hd]`` sorted by descending score.
        """
        batch, tokens, _ = normed.shape

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, tokens, -1, self.head_dim).transpose(1, 2)  # [B, H, N, hd]

        key = split_heads(attention.k_proj(normed))
        value = split_heads(attention.v_proj(normed))
        query = split_heads(attention.q_proj(normed))
        if self.config.token_importance == "class_token":
            query = query[:, :, :1]  # only the CLS row of the attention map is needed
        probs = torch.softmax(query @ key.transpose(-1, -2) * self.head_dim**-0.5, dim=-1, dtype=torch.float32)
        scores = probs.mean(dim=-2)  # [B, H, N]: attention each key receives (CLS row alone for class_token)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., : self.preload_tokens]
        index = order.unsqueeze(-1).expand(-1, -1, -1, self.head_dim)  # [B, H, K, hd]
        return key.gather(2, index), value.gather(2, index)

    # -- training ---------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        features = self.features(batch)
        stored = features["key_states"].shape[3]
        if stored < self.keep_tokens:
            raise StoreError(
                f"preloaded features hold {stored} tokens per head but keep_ratio {self.config.keep_ratio} needs "
                f"{self.keep_tokens}; preload again with preload_keep_ratio >= keep_ratio"
            )
        # The stored tokens are sorted by importance: the first keep_tokens are this trial's selection.
        keys = features["key_states"][:, :, :, : self.keep_tokens]  # [B, L, H, K, hd]
        values = features["value_states"][:, :, :, : self.keep_tokens]
        return self.side(batch["side_pixel_values"], self.fusion(keys, values))

    def fuse_members(self, members: list[Method]) -> dict[str, torch.Tensor]:
        """Keep ratios fuse by masking: the cohort's model takes its members' largest ``keep_tokens`` and each
        member attends only its own first ``keep_tokens`` of them (masked keys get zero attention, so the
        prompts read what the member's own truncated K/V give). All members' prompts read those shared K/V
        in one attention call, and the side ViT's layers attend for all members in one call each
        (:mod:`~medsweep.trainables.member_attention`)."""
        keeps = [cast(_FineGrainedPromptTuning, m).keep_tokens for m in members]
        self.keep_tokens = max(keeps)
        self.fusion.members_share_keys = True
        self.side.vit.config._attn_implementation = MEMBERS_ATTENTION  # each side layer's self-attention: one call too
        kept = torch.arange(self.keep_tokens)
        return {"fusion.key_mask": torch.stack([(kept < keep).unsqueeze(0) for keep in keeps])}  # [K, 1, tokens]

    def parameter_counts(self) -> tuple[int, int]:
        """(learnable, total) as the papers count: total includes the frozen LPM and its unused 1000-class head."""
        learnable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        unused_head = PAPER_LPM_HEAD_CLASSES * (self.lpm.config.hidden_size + 1)
        return learnable, sum(p.numel() for p in self.parameters()) + unused_head


class FPTPlus(_FineGrainedPromptTuning):
    """FPT+ (TNNLS 2025): the official default method."""

    lpm_layers = "last_half"
    side_size_fraction = 1 / 4
    prompts_in_lpm_width = True


class FPT(_FineGrainedPromptTuning):
    """FPT (MICCAI 2024)."""

    lpm_layers = "all"
    side_size_fraction = 7 / 16
    prompts_in_lpm_width = False


register_method(
    "fpt_plus",
    FPTPlusConfig,
    FPTPlus,
    "FPT+: frozen ViT at high resolution (last half of layers, important tokens) + small side ViT via fine-grained prompts",
)
register_method(
    "fpt",
    FPTConfig,
    FPT,
    "FPT: frozen ViT at high resolution (all layers, important tokens) + small side ViT via fine-grained prompts",
)
