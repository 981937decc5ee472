"""Learnable-parameter percentages: the FPT papers' table on ViT-B/16-384, and the formulas on tiny ViTs.

The FPT README (ViT-B/16, 5 classes) reports learnable % of: full fine-tuning
100, prompt tuning 0.17, adapter 2.03, LoRA 0.68. The settings pinned below
reproduce them within 10% relative (see each config's docstring for the
arithmetic). The ViT-B models are built on the meta device: same modules and
shapes as a real build, without allocating or initialising 86M weights.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from medsweep.trainables.methods import build_method

VIT_B = {"backbone": "vit-base-patch16-384", "image_size": 384, "num_classes": 5}
ENCODER = 86_090_496  # ViT-B/16-384 without pooler or head: what every method here holds and counts
ENCODER_WITH_IMAGENET_HEAD = 86_859_496  # the frozen LPM as FPT counts it: + its unused 1000-class head

# method -> (FPT table %, settings, exact learnable, exact total)
FPT_TABLE: dict[str, tuple[float, dict[str, Any], int, int]] = {
    "full": (100.0, {}, 86_094_341, 86_094_341),
    "prompt": (0.17, {"num_prompts": 16, "deep": True}, 151_301, 86_241_797),
    "adapter": (2.03, {"bottleneck": 96}, 1_783_685, 87_874_181),
    "lora": (0.68, {"rank": 16, "target_modules": "query,value"}, 595_205, 86_684_165),
}


def counts_on_meta(name: str, values: dict[str, Any]) -> tuple[int, int]:
    with torch.device("meta"):
        return build_method(name, {**VIT_B, **values}).parameter_counts()


@pytest.mark.parametrize("name", sorted(FPT_TABLE))
def test_fpt_table_percentages(name: str) -> None:
    published, settings, exact_learnable, exact_total = FPT_TABLE[name]
    learnable, total = counts_on_meta(name, settings)
    assert (learnable, total) == (exact_learnable, exact_total)
    assert abs(100 * learnable / total - published) <= 0.1 * published
    # FPT's own convention (the frozen model's unused ImageNet head in the total) lands there too
    paper_total = total - ENCODER + ENCODER_WITH_IMAGENET_HEAD
    assert abs(100 * learnable / paper_total - published) <= 0.1 * published


def test_imagenet_head_figure() -> None:
    """86,859,496 is HF's ViTForImageClassification for ViT-B/16-384 with 1000 classes (no pooler)."""
    config = ViTConfig(image_size=384, patch_size=16, num_labels=1000)
    with torch.device("meta"):
        model = ViTForImageClassification(config)
    assert sum(p.numel() for p in model.parameters()) == ENCODER_WITH_IMAGENET_HEAD
    assert ENCODER_WITH_IMAGENET_HEAD - ENCODER == 768 * 1000 + 1000


def test_meta_counts_match_a_real_build() -> None:
    """The meta-device shortcut counts what a real build holds (LoRA: peft injects its layers on either)."""
    _, settings, learnable, total = FPT_TABLE["lora"]
    torch.manual_seed(0)
    assert build_method("lora", {**VIT_B, **settings}).parameter_counts() == (learnable, total)


# -- the formulas on a tiny ViT (hidden 32, 2 blocks, patch 8, 64 px: 64 patches) ----------------------

TINY = {"backbone": "vit-tiny", "image_size": 64, "num_classes": 3}
D, BLOCKS, HEAD = 32, 2, 32 * 3 + 3


def learnable(name: str, **values: Any) -> int:
    return build_method(name, {**TINY, **values}).parameter_counts()[0]


@pytest.mark.parametrize(("deep", "prompt_sets"), [(True, BLOCKS), (False, 1)])
def test_prompt_count(deep: bool, prompt_sets: int) -> None:
    assert learnable("prompt", num_prompts=5, deep=deep) == prompt_sets * 5 * D + HEAD


def test_bitfit_count() -> None:
    """Every bias of the tiny ViT (patch embedding; per block q/k/v/o, two LayerNorms, MLP 64 + 32; final norm) + head."""
    assert learnable("bitfit") == D + BLOCKS * (4 * D + 2 * D + 2 * D + D) + D + HEAD


def test_adapter_count() -> None:
    assert learnable("adapter", bottleneck=7) == BLOCKS * (D * 7 + 7 + 7 * D + D) + HEAD


@pytest.mark.parametrize(("targets", "matrices"), [("query,value", 2), ("query", 1), ("query,key,value,output", 4)])
@pytest.mark.parametrize("rank", [1, 4])
def test_lora_count(targets: str, matrices: int, rank: int) -> None:
    norm = 2 * D  # the final LayerNorm trains (LoRA-medical's fc_norm)
    assert learnable("lora", rank=rank, target_modules=targets) == BLOCKS * matrices * rank * (D + D) + norm + HEAD
