"""Shared machinery of the methods that tune a backbone and classify its pooled tokens.

``full``, ``prompt``, ``adapter`` and ``lora`` all end in one linear head; the
last three also adapt a frozen HuggingFace ``ViTModel`` from the inside and so
share the checks and the plumbing below (transformers 5.x layout:
``model.embeddings``, ``model.layers[i]``, ``model.layernorm``).
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import ViTModel

from medsweep.errors import ConfigError
from medsweep.trainables.backbones import Backbone, build_backbone
from medsweep.trainables.methods.base import MethodConfig


def without_pooler(backbone: Backbone) -> Backbone:
    """Drop a ViT's tanh pooler: no method here reads it, so it would only inflate the counts.

    (``pooled_features`` takes the normed CLS token, not ``pooler_output``; an
    unused pooler would also be "learnable" in full fine-tuning yet never get a
    gradient.)
    """
    if isinstance(backbone.model, ViTModel):
        backbone.model.pooler = None
    return backbone


def build_frozen_vit(config: MethodConfig, method: str) -> Backbone:
    """The method's ViT with every pretrained weight frozen; other families are refused."""
    backbone = build_backbone(config.backbone, config.image_size)
    if not isinstance(backbone.model, ViTModel):
        raise ConfigError(
            f"method {method!r} adapts the blocks of a ViT (HF ViTModel), but backbone {config.backbone!r} is a "
            f"{type(backbone.model).__name__}; use a ViT such as vit-tiny, vit-base-patch16-384 or dino-vitb16, "
            "or a method that takes any backbone family (full fine-tuning, linear probe, CDTM) for CNN and CLIP backbones"
        )
    without_pooler(backbone).model.requires_grad_(False)
    return backbone


def vit_tokens(model: ViTModel, pixel_values: Tensor) -> Tensor:
    """Hidden states after the last block and before the final LayerNorm, ``[B, 1+N, D]``.

    Methods that pool patch tokens need them un-normed: LoRA-medical averages the
    patch tokens first and normalises the mean (timm's ``fc_norm``).
    """
    hidden = model.embeddings(pixel_values, interpolate_pos_encoding=True)  # [B, 1+N, D]
    for layer in model.layers:
        hidden = layer(hidden, None)
    return hidden


def frozen_subtrees(module: nn.Module, added: tuple[type, ...] = ()) -> list[nn.Module]:
    """The largest submodules that hold no learnable parameter and none of the method's ``added`` modules.

    What :meth:`Method.frozen_modules` returns for methods that live inside the
    backbone: the pretrained parts run as at inference, while modules such as
    peft's LoRA layers (whose dropout has no parameters) keep following ``train()``.
    """

    def live(m: nn.Module) -> bool:
        return isinstance(m, added) or any(p.requires_grad for p in m.parameters(recurse=False))

    if live(module):
        return []
    if not any(live(m) for m in module.modules()):
        return [module]
    return [frozen for child in module.children() for frozen in frozen_subtrees(child, added)]
