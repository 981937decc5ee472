"""FPT/FPT+'s frozen ViT interpolates its position embeddings as the official code does.

The official frozen model (github YijinHuang/FPT ``modules/frozen_vit.py``, the
transformers < 4.42 ``ViTEmbeddings``) resizes the table by a ``scale_factor``
of (grid + 0.1) / pretrained grid; transformers 5 resizes it to ``size=grid``.
The reference below writes the old formula out so the test does not depend on
our implementation of it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import ViTConfig
from transformers.models.vit.modeling_vit import ViTEmbeddings

from medsweep.trainables.methods import build_method
from medsweep.trainables.methods.fpt import legacy_position_embeddings


def official_interpolation(position_embeddings: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """The pre-4.42 ViTEmbeddings.interpolate_pos_encoding, written out."""
    num_positions = position_embeddings.shape[1] - 1
    if (height // patch) * (width // patch) == num_positions and height == width:
        return position_embeddings
    class_pos_embed = position_embeddings[:, 0]
    patch_pos_embed = position_embeddings[:, 1:]
    dim = position_embeddings.shape[-1]
    h0, w0 = height // patch + 0.1, width // patch + 0.1
    side = int(math.sqrt(num_positions))
    patch_pos_embed = patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed, scale_factor=(h0 / math.sqrt(num_positions), w0 / math.sqrt(num_positions)), mode="bicubic", align_corners=False
    )
    assert int(h0) == patch_pos_embed.shape[-2] and int(w0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def tiny_embeddings() -> ViTEmbeddings:
    """A ViT embedding layer pretrained at 32 px with 8 px patches: a 4 x 4 position grid."""
    torch.manual_seed(0)
    return ViTEmbeddings(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_channels=3)).eval()


@pytest.mark.parametrize("size", [48, 64, 40])
def test_the_table_is_resized_by_the_legacy_formula_where_transformers_5_differs(size: int) -> None:
    embeddings = tiny_embeddings()
    table = embeddings.position_embeddings.detach()
    ours = legacy_position_embeddings(table, size, size, 8)
    expected = official_interpolation(table, size, size, 8)
    assert ours.shape == (1, 1 + (size // 8) ** 2, 16)
    assert torch.allclose(ours, expected, atol=1e-6)
    # transformers 5's size= formula samples elsewhere: the test would fail with it
    current = embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + (size // 8) ** 2, 16), size, size).detach()
    assert (current - expected).abs().max() > 1e-3


def test_at_the_pretrained_grid_both_formulas_keep_the_table() -> None:
    embeddings = tiny_embeddings()
    table = embeddings.position_embeddings.detach()
    current = embeddings.interpolate_pos_encoding(torch.zeros(1, 17, 16), 32, 32).detach()
    assert torch.equal(legacy_position_embeddings(table, 32, 32, 8), table)
    assert torch.equal(current, table)


@pytest.mark.parametrize("name", ["fpt_plus", "fpt"])
def test_the_frozen_path_uses_the_legacy_table_unless_told_otherwise(name: str) -> None:
    """vit-tiny is pretrained at 64 px (8 x 8 grid); at 96 px the frozen path interpolates."""
    values = {"image_size": 96, "num_classes": 3, "side_reduction": 2, "num_prompts": 4}
    legacy = build_method(name, values)
    current = build_method(name, {**values, "legacy_vit_embeddings": False})
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    lpm = legacy.lpm.embeddings
    with torch.no_grad():
        patches = lpm.patch_embeddings(pixels)
        tokens = torch.cat([lpm.cls_token.expand(2, -1, -1), patches], dim=1)
        expected = tokens + official_interpolation(lpm.position_embeddings, 96, 96, 8)
        assert torch.allclose(legacy._embeddings(pixels), expected, atol=1e-6)
        assert torch.allclose(current._embeddings(pixels), lpm(pixels, interpolate_pos_encoding=True), atol=1e-6)
        assert not torch.allclose(legacy.frozen_features(pixels)["key_states"], current.frozen_features(pixels)["key_states"], atol=1e-4)
    assert legacy.preload_key() != current.preload_key()  # the store of one is not the other's
