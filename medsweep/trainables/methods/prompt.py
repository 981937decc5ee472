"""Visual prompt tuning (VPT; Jia et al., ECCV 2022): learnable tokens in a frozen ViT's sequence.

``num_prompts`` tokens go in right after CLS. Shallow VPT inserts them once,
before the first block, and lets them flow through the network; deep VPT
replaces the prompt slots with a fresh set before every block. Only the
prompts and the linear head on the final CLS token train.

HF ``ViTModel`` has no hook for extra tokens, so :meth:`PromptTuning.forward`
runs the embeddings, the blocks and the final LayerNorm itself (position
embeddings are interpolated for sizes other than the backbone's own).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from transformers import ViTModel

from medsweep.trainables.backbones import square_size
from medsweep.trainables.methods._heads import build_frozen_vit
from medsweep.trainables.methods.base import Method, MethodConfig, register_method


@dataclass
class PromptConfig(MethodConfig):
    """Visual prompt tuning of a frozen ViT.

    The FPT papers' prompt-tuning baseline (0.17% learnable) is deep VPT with 16
    prompts per block, which is the default: on ``vit-base-patch16-384`` with 5
    classes that is 12 x 16 x 768 = 147,456 prompt values + 3,845 head = 151,301
    learnable of 86,241,797 = 0.175% (0.174% if the frozen model's unused
    1000-class head is counted too, as FPT counts its own total). Deep: the
    baseline module compiled into the FPT repository's first commit
    (``modules/__pycache__/pt_vits``, d5f20b1) holds a prompt parameter in every
    block; 16 per block is what 0.17% implies (shallow VPT with 16 would be 0.019%).
    """

    num_prompts: int = field(default=16, metadata={"help": "prompt tokens inserted after CLS (per block when deep)"})
    deep: bool = field(default=True, metadata={"help": "new prompts before every block (VPT-deep) instead of only at the input (VPT-shallow)"})
    prompt_dropout: float = field(default=0.1, metadata={"help": "dropout on the prompt tokens in training (VPT uses 0.1)"})


class PromptTuning(Method):
    config: PromptConfig

    def __init__(self, config: PromptConfig) -> None:
        super().__init__(config)
        self.backbone = build_frozen_vit(config, "prompt")
        self.encoder = cast(ViTModel, self.backbone.model)  # build_frozen_vit refuses other models
        vit = self.encoder.config
        sets = vit.num_hidden_layers if config.deep else 1
        self.prompts = nn.Parameter(torch.empty(sets, config.num_prompts, vit.hidden_size))  # [L or 1, P, D]
        # VPT's init: Xavier-uniform as if each prompt were a patch embedding's output.
        bound = math.sqrt(6.0 / (3 * square_size(vit.patch_size) ** 2 + vit.hidden_size))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.prompt_dropout = nn.Dropout(config.prompt_dropout)
        self.head = nn.Linear(vit.hidden_size, config.num_classes)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.encoder]  # the prompts and the head live outside it

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        model, count = self.encoder, self.config.num_prompts
        hidden = model.embeddings(batch["pixel_values"], interpolate_pos_encoding=True)  # [B, 1+N, D]
        for index, layer in enumerate(model.layers):
            if index == 0 or self.config.deep:
                prompts = self.prompt_dropout(self.prompts[index if self.config.deep else 0])
                prompts = prompts.expand(hidden.shape[0], -1, -1)  # [B, P, D]
                patches = hidden[:, 1:] if index == 0 else hidden[:, 1 + count :]  # drop the previous block's prompts
                hidden = torch.cat([hidden[:, :1], prompts, patches], dim=1)  # [B, 1+P+N, D]
            hidden = layer(hidden, None)
        return self.head(model.layernorm(hidden[:, 0]))  # [B, C]


register_method("prompt", PromptConfig, PromptTuning, "visual prompt tuning (VPT, shallow or deep) of a frozen ViT")
