"""MAE (timm-named) ViT checkpoints into HF ViTModel: exact outputs, and a report of what did not fit."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from transformers import ViTConfig, ViTModel

from medsweep.errors import ConfigError
from medsweep.trainables.checkpoints import convert_mae_checkpoint, load_mae_checkpoint


def _config(**overrides: object) -> ViTConfig:
    values = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=8, image_size=32, layer_norm_eps=1e-6
    )
    values.update(overrides)
    return ViTConfig(**values)


@pytest.fixture(scope="module")
def original() -> ViTModel:
    torch.manual_seed(0)
    return ViTModel(_config(), add_pooling_layer=False).eval()


def _as_timm(model: ViTModel) -> dict[str, torch.Tensor]:
    """The reverse mapping, written out by hand: HF weights under timm/MAE ViT names."""
    hf = model.state_dict()
    timm = {
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": hf["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    for i in range(model.config.num_hidden_layers):
        block, layer = f"blocks.{i}", f"layers.{i}"
        for kind in ("weight", "bias"):
            timm[f"{block}.norm1.{kind}"] = hf[f"{layer}.layernorm_before.{kind}"]
            timm[f"{block}.norm2.{kind}"] = hf[f"{layer}.layernorm_after.{kind}"]
            timm[f"{block}.attn.qkv.{kind}"] = torch.cat(
                [hf[f"{layer}.attention.q_proj.{kind}"], hf[f"{layer}.attention.k_proj.{kind}"], hf[f"{layer}.attention.v_proj.{kind}"]]
            )
            timm[f"{block}.attn.proj.{kind}"] = hf[f"{layer}.attention.o_proj.{kind}"]
            timm[f"{block}.mlp.fc1.{kind}"] = hf[f"{layer}.mlp.fc1.{kind}"]
            timm[f"{block}.mlp.fc2.{kind}"] = hf[f"{layer}.mlp.fc2.{kind}"]
    return {k: v.clone() for k, v in timm.items()}


DECODER = {
    "mask_token": torch.zeros(1, 1, 16),
    "decoder_embed.weight": torch.zeros(16, 32),
    "decoder_pos_embed": torch.zeros(1, 17, 16),
    "decoder_blocks.0.norm1.weight": torch.ones(16),
    "decoder_pred.weight": torch.zeros(192, 16),
}


def test_mae_checkpoint_loads_exactly(original: ViTModel, tmp_path: Path) -> None:
    weights = {f"module.{k}": v for k, v in {**_as_timm(original), **DECODER}.items()}  # saved from a DDP model
    path = tmp_path / "mae.pth"
    torch.save({"model": weights, "epoch": 399, "args": argparse.Namespace(model="mae_vit_tiny", lr=1.5e-4)}, path)

    model, report = load_mae_checkpoint(path, _config())
    assert report.missing == [] and report.mismatched == [] and report.notes == []
    assert sorted(report.unexpected) == sorted(DECODER)
    assert len(report.loaded) == len(original.state_dict())
    text = str(report)
    assert "unexpected (ignored): 5" in text and "decoder_embed.weight" in text and "mask_token" in text

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).last_hidden_state, original(pixel_values=pixels).last_hidden_state)


def test_missing_and_mismatched_keys_are_reported(original: ViTModel, tmp_path: Path) -> None:
    weights = _as_timm(original)
    del weights["blocks.1.mlp.fc2.weight"]
    converted, report = convert_mae_checkpoint(weights, _config())
    assert report.missing == ["layers.1.mlp.fc2.weight"]
    assert "missing (left at random init): 1" in str(report)
    assert "layers.1.mlp.fc2.weight" not in converted

    _, report = convert_mae_checkpoint(_as_timm(original), _config(image_size=48))  # 37 positions expected, 17 given
    assert report.mismatched == ["pos_embed -> embeddings.position_embeddings: checkpoint [1, 17, 32], model [1, 37, 32]"]
    assert any("image_size and patch_size" in note for note in report.notes)
    path = tmp_path / "mae.pth"
    torch.save(_as_timm(original), path)
    with pytest.raises(ConfigError, match="does not fit the ViT config"):
        load_mae_checkpoint(path, _config(image_size=48))


def test_fc_norm_stands_in_for_norm_and_extra_blocks_are_unexpected(original: ViTModel) -> None:
    weights = _as_timm(original)
    weights["fc_norm.weight"] = weights.pop("norm.weight")
    weights["fc_norm.bias"] = weights.pop("norm.bias")
    weights["blocks.2.norm1.weight"] = torch.ones(32)  # a deeper checkpoint than the config
    weights["head.weight"] = torch.zeros(5, 32)
    converted, report = convert_mae_checkpoint({"state_dict": weights}, _config(layer_norm_eps=1e-12))
    assert torch.equal(converted["layernorm.weight"], original.state_dict()["layernorm.weight"])
    assert report.missing == [] and sorted(report.unexpected) == ["blocks.2.norm1.weight", "head.weight"]
    assert any("fc_norm" in note for note in report.notes)
    assert any("layer_norm_eps" in note for note in report.notes)


def test_unreadable_checkpoints_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_mae_checkpoint(tmp_path / "absent.pth", _config())
    pickled = tmp_path / "object.pth"
    torch.save({"model": {}, "hook": Path("x")}, pickled)  # arbitrary objects are refused by weights_only
    with pytest.raises(ConfigError, match="tensors-only"):
        load_mae_checkpoint(pickled, _config())


# -- an MAE .pth as --backbone ---------------------------------------------------------------------------


def _mae_backbone_files(tmp_path: Path) -> tuple[Path, Path]:
    """One tiny ViT (64 dims per head, as every MAE release) saved twice: as an MAE .pth and with save_pretrained."""
    torch.manual_seed(1)
    model = ViTModel(_config(hidden_size=128, num_attention_heads=2, intermediate_size=256), add_pooling_layer=False).eval()
    pth = tmp_path / "mrm.pth"
    torch.save({"model": {**_as_timm(model), "decoder_pred.weight": torch.zeros(192, 16)}}, pth)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return pth, folder


@pytest.mark.parametrize("method", ["linear", "fpt_plus"])
def test_an_mae_pth_backbone_gives_the_features_of_the_same_weights_loaded_the_ordinary_way(tmp_path: Path, method: str) -> None:
    from medsweep.trainables.backbones import backbone_identity, build_backbone, frozen_weights_unused
    from medsweep.trainables.methods import build_method

    pth, folder = _mae_backbone_files(tmp_path)
    backbone = build_backbone(str(pth))
    assert backbone.config.num_attention_heads == 2 and backbone.config.num_hidden_layers == 2 and backbone.image_size == 32
    config = {"image_size": 32, "num_classes": 3, **({"side_reduction": 2} if method == "fpt_plus" else {})}
    from_pth = build_method(method, {**config, "backbone": str(pth)})
    from_folder = build_method(method, {**config, "backbone": str(folder)})
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine, reference = from_pth.frozen_features(pixels), from_folder.frozen_features(pixels)
    assert mine.keys() == reference.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], reference[key], rtol=0, atol=1e-6)

    with frozen_weights_unused():  # a trial on preloaded features: shapes only, no weights read
        weightless = build_method(method, {**config, "backbone": str(pth)})
    assert weightless.parameter_counts() == from_pth.parameter_counts()
    assert backbone_identity(str(pth)).startswith("mae-") and backbone.identity == backbone_identity(str(pth))


def test_a_pth_that_is_no_vit_is_one_line_naming_what_backbone_takes(tmp_path: Path) -> None:
    from medsweep.trainables.backbones import build_backbone

    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}}, path)
    with pytest.raises(ConfigError, match="not an MAE-style ViT checkpoint") as error:
        build_backbone(str(path))
    assert "\n" not in str(error.value) and "save_pretrained folder" in str(error.value)
