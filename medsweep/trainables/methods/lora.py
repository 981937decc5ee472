"""LoRA (Hu et al., ICLR 2022) on the attention projections of a frozen ViT, through peft.

Each targeted projection ``W`` becomes ``W + (alpha / rank) * B A`` with ``A``
Kaiming-uniform and ``B`` zero (peft's defaults), so training starts from the
pretrained network. As in LoRA for medical foundation models (Lian et al.,
"Less Could Be Better", github RL4M/MED-PEFT), query and value are adapted and
key is not, the patch tokens are averaged and the mean is normalised by a
trainable LayerNorm (their ``fc_norm``; here the backbone's final LayerNorm,
which starts from the pretrained statistics) before the linear head. Learnable:
the LoRA matrices, that LayerNorm and the head.

peft injects its layers inside the HF model, so :meth:`LoRATuning.frozen_modules`
returns only the pretrained subtrees around them: LoRA's dropout keeps
following ``train()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import nn
from transformers import ViTModel

from medsweep.spaces.methods.lora import PROJECTIONS as PROJECTION_NAMES
from medsweep.trainables.methods._heads import build_frozen_vit, frozen_subtrees, vit_tokens
from medsweep.trainables.methods.base import Method, MethodConfig, register_method

# Projection names a config may target (spaces' record lists them) to the ViTAttention module names of transformers 5.
PROJECTIONS = dict(zip(PROJECTION_NAMES, ("q_proj", "k_proj", "v_proj", "o_proj"), strict=True))


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA on a frozen ViT's attention projections.

    The FPT papers' LoRA baseline (0.68% learnable) matches ``rank=16`` on
    ``query,value`` (rank 8 on all four projections has the same count): on
    ``vit-base-patch16-384`` with 5 classes, 12 x 2 x 16 x (768 + 768) = 589,824
    LoRA weights + 1,536 LayerNorm + 3,845 head = 595,205 learnable of
    86,684,165 = 0.687% (0.681% if the frozen model's unused 1000-class head is
    counted too). The default rank 8 is LoRA-medical's 10%-label setting (0.35%).
    """

    rank: int = field(default=8, metadata={"help": "LoRA rank r (LoRA-medical: 4, 8 or 32 by label fraction; FPT's 0.68% baseline: 16)"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank"})
    lora_dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA branch input in training"})
    target_modules: str = field(
        default="query,value",
        metadata={"help": "comma-separated attention projections to adapt: query, key, value, output"},
    )
    pool: Literal["cls", "mean"] = field(default="mean", metadata={"help": "head input: CLS token or mean of the patch tokens (LoRA-medical)"})

    def projections(self) -> list[str]:
        """``target_modules`` as a list of projection names."""
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


class LoRATuning(Method):
    config: LoRAConfig

    def __init__(self, config: LoRAConfig) -> None:
        # peft is imported where LoRA is built, not with the method registry: every trial process imports the
        # registry, and peft (with accelerate) costs each a few tenths of a second of CPU it only needs for LoRA.
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model

        super().__init__(config)
        self.backbone = build_frozen_vit(config, "lora")
        peft_config = PeftLoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,  # type: ignore[arg-type]  # typed int in peft, used as a float scale (alpha / r)
            lora_dropout=config.lora_dropout,
            target_modules=[PROJECTIONS[name] for name in config.projections()],
        )
        self.encoder = cast(ViTModel, inject_adapter_in_model(peft_config, self.backbone.model))  # the same ViT, adapted in place
        self.encoder.layernorm.requires_grad_(True)  # LoRA-medical's trainable fc_norm
        self.head = nn.Linear(self.encoder.config.hidden_size, config.num_classes)

    def frozen_modules(self) -> list[nn.Module]:
        from peft.tuners.lora import LoraLayer

        return frozen_subtrees(self.encoder, added=(LoraLayer,))

    def merge_adapters(self) -> None:
        """Fold every LoRA update into its projection (``W + (alpha / rank) B A``) and drop peft's wrappers:
        the encoder is a plain ViT again, with the same outputs and no adapter overhead (what an export
        ships unless the adapter is kept). No LoRA parameter is left to train afterwards."""
        from peft.tuners.lora import LoraLayer

        for name, module in list(self.encoder.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent, _, child = name.rpartition(".")
                setattr(self.encoder.get_submodule(parent), child, module.get_base_layer())

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = vit_tokens(self.encoder, batch["pixel_values"])  # [B, 1+N, D], before the final norm
        pooled = tokens[:, 0] if self.config.pool == "cls" else tokens[:, 1:].mean(dim=1)  # [B, D]
        return self.head(self.encoder.layernorm(pooled))  # [B, C]


register_method("lora", LoRAConfig, LoRATuning, "LoRA (peft) on the attention projections of a frozen ViT")
