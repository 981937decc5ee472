"""MAE-style ViT checkpoints (timm names in a ``.pth``) to a HuggingFace ``ViTModel``.

The medical foundation models the LoRA work tunes (MRM, CXR_MAE; github
RL4M/MED-PEFT) are MAE pretrainings saved by timm-based code: one ``.pth``
holding ``{"model": state_dict, ...}`` whose keys are timm's ViT names, often
with DDP's ``module.`` prefix, plus the MAE decoder. medsweep's backbones are HF
models, so this module renames those tensors to ``ViTModel``'s names and splits
timm's fused ``attn.qkv`` projection into HF's separate query/key/value ones.

Mapping (timm -> HF ``ViTModel``, transformers 5 names):

=====================================  ====================================================
``cls_token``, ``pos_embed``           ``embeddings.cls_token``, ``embeddings.position_embeddings``
``patch_embed.proj.*``                 ``embeddings.patch_embeddings.projection.*``
``blocks.i.norm1.*`` / ``norm2.*``     ``layers.i.layernorm_before.*`` / ``layernorm_after.*``
``blocks.i.attn.qkv.*`` (rows q|k|v)   ``layers.i.attention.{q,k,v}_proj.*``
``blocks.i.attn.proj.*``               ``layers.i.attention.o_proj.*``
``blocks.i.mlp.fc1.*`` / ``fc2.*``     ``layers.i.mlp.fc1.*`` / ``fc2.*``
``norm.*`` (else ``fc_norm.*``)        ``layernorm.*``
=====================================  ====================================================

Everything else (``decoder_*``, ``mask_token``, a classifier ``head``) is reported
as unexpected. The model is built without HF's pooler, which MAE does not have.
``fc_norm`` (MAE fine-tuning with global pooling) normalises the pooled mean in
timm but every token in HF; it is used only when the checkpoint has no ``norm``
and the report says so.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import ViTConfig, ViTModel

from medsweep.errors import ConfigError

MAE_LAYER_NORM_EPS = 1e-6  # timm's MAE ViT: partial(nn.LayerNorm, eps=1e-6)

_WRAPPER_KEYS = ("model", "state_dict")
_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"cls_token"), "embeddings.cls_token"),
    (re.compile(r"pos_embed"), "embeddings.position_embeddings"),
    (re.compile(r"patch_embed\.proj\.(weight|bias)"), r"embeddings.patch_embeddings.projection.\1"),
    (re.compile(r"blocks\.(\d+)\.norm1\.(weight|bias)"), r"layers.\1.layernorm_before.\2"),
    (re.compile(r"blocks\.(\d+)\.norm2\.(weight|bias)"), r"layers.\1.layernorm_after.\2"),
    (re.compile(r"blocks\.(\d+)\.attn\.proj\.(weight|bias)"), r"layers.\1.attention.o_proj.\2"),
    (re.compile(r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)"), r"layers.\1.mlp.\2.\3"),
    (re.compile(r"norm\.(weight|bias)"), r"layernorm.\1"),
]
_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
_FC_NORM = re.compile(r"fc_norm\.(weight|bias)")


@dataclass
class ConversionReport:
    """What a conversion filled, left out and could not place; ``str()`` prints it for a log."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"MAE checkpoint -> ViTModel: {len(self.loaded)} tensors loaded"]
        for title, items in (
            ("missing (left at random init)", self.missing),
            ("unexpected (ignored)", self.unexpected),
            ("shape mismatch (not loaded)", self.mismatched),
            ("notes", self.notes),
        ):
            if items:
                lines.append(f"{title}: {len(items)}")
                lines.extend(f"  {item}" for item in items)
        return "\n".join(lines)


def _unwrap(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint, without DDP's ``module.`` prefix."""
    for key in _WRAPPER_KEYS:
        inner = checkpoint.get(key)
        if isinstance(inner, dict):
            checkpoint = inner
            break
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def _expected_shapes(config: ViTConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):  # names and shapes only; no memory, no init cost
        reference = ViTModel(config, add_pooling_layer=False)
    shapes = {name: tensor.shape for name, tensor in reference.state_dict().items()}
    if "layers.0.attention.q_proj.weight" not in shapes:
        raise ConfigError("this transformers version names ViT weights differently; MAE conversion needs transformers >= 5")
    return shapes


def _rename(key: str, tensor: torch.Tensor, has_norm: bool) -> list[tuple[str, torch.Tensor]]:
    """HF names and tensors for one timm key; empty when the key has no HF counterpart."""
    if match := _QKV.fullmatch(key):
        layer, kind = match.groups()
        rows = tensor.chunk(3, dim=0)  # timm stacks the query, key and value rows
        return [(f"layers.{layer}.attention.{p}_proj.{kind}", part.clone()) for p, part in zip("qkv", rows, strict=True)]
    if (match := _FC_NORM.fullmatch(key)) and not has_norm:
        return [(f"layernorm.{match.group(1)}", tensor)]
    for pattern, target in _RENAMES:
        if pattern.fullmatch(key):
            return [(pattern.sub(target, key), tensor)]
    return []


def convert_mae_checkpoint(state_dict: Mapping[str, object], config: ViTConfig) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Rename a timm/MAE ViT state dict (optionally wrapped in ``{"model": ...}``) to ``ViTModel`` names.

    Returns the tensors that fit ``ViTModel(config, add_pooling_layer=False)`` and a
    report of what is missing, unexpected or of the wrong shape (e.g. a
    ``pos_embed`` for another image or patch size).
    """
    source = _unwrap(state_dict)
    expected = _expected_shapes(config)
    has_norm = "norm.weight" in source
    converted: dict[str, torch.Tensor] = {}
    report = ConversionReport()
    for key, tensor in source.items():
        renamed = _rename(key, tensor, has_norm)
        if not renamed or any(name not in expected for name, _ in renamed):
            report.unexpected.append(key)
            continue
        for name, value in renamed:
            if value.shape != expected[name]:
                report.mismatched.append(f"{key} -> {name}: checkpoint {list(value.shape)}, model {list(expected[name])}")
            else:
                converted[name] = value
    if not has_norm and "fc_norm.weight" in source:
        report.notes.append("fc_norm used as the final LayerNorm: timm applies it to the pooled mean, HF ViTModel to every token")
    if any("position_embeddings" in item for item in report.mismatched):
        report.notes.append("pos_embed does not fit: set image_size and patch_size to the checkpoint's (224 px / 16 has 197 positions)")
    if config.layer_norm_eps != MAE_LAYER_NORM_EPS:
        report.notes.append(f"config.layer_norm_eps is {config.layer_norm_eps}; MAE's ViT uses {MAE_LAYER_NORM_EPS}")
    report.loaded = sorted(converted)
    report.missing = [name for name in expected if name not in converted]
    return converted, report


def read_mae_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an MAE ``.pth`` (``weights_only=True``, memory-mapped where the file allows), unwrapped.

    Raises ConfigError when the file is missing, unreadable or no state dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"MAE checkpoint {str(path)!r} does not exist")
    try:
        # MAE's training script also saves its argparse.Namespace under "args".
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot read {str(path)!r} as a tensors-only checkpoint ({reason}); re-save its state dict from a trusted copy") from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{str(path)!r} holds a {type(checkpoint).__name__}, not a state dict")
    return _unwrap(checkpoint)


def mae_vit_config(state_dict: dict[str, torch.Tensor], path: str | Path = "the checkpoint", heads: int | None = None) -> ViTConfig:
    """The ViT shape an MAE state dict was trained with, read off its tensors.

    Width, depth, MLP size, patch size and image size follow from the tensors;
    the number of heads does not (a fused ``qkv`` is ``[3D, D]`` for any
    split), so it is ``heads`` or ViT's 64 dimensions per head (ViT-S 6,
    ViT-B 12, ViT-L 16). Raises ConfigError for a file that is no ViT.
    """
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [key for key in needed if key not in state_dict]
    if missing:
        raise ConfigError(
            f"{str(path)!r} is not an MAE-style ViT checkpoint (no {', '.join(missing)}); "
            "--backbone takes a .pth of timm ViT weights (MRM, CXR_MAE), a save_pretrained folder or a registered name"
        )
    hidden = int(state_dict["cls_token"].shape[-1])
    patch = int(state_dict["patch_embed.proj.weight"].shape[-1])
    grid = math.isqrt(int(state_dict["pos_embed"].shape[1]) - 1)
    layers = 1 + max(int(m.group(1)) for key in state_dict if (m := re.match(r"blocks\.(\d+)\.", key)))
    heads = heads or max(1, hidden // 64)
    if hidden % heads:
        raise ConfigError(f"{str(path)!r}: width {hidden} does not split into {heads} heads")
    return ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=int(state_dict["blocks.0.mlp.fc1.weight"].shape[0]),
        patch_size=patch,
        image_size=grid * patch,
        layer_norm_eps=MAE_LAYER_NORM_EPS,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
    )


def load_mae_checkpoint(path: str | Path, config: ViTConfig) -> tuple[ViTModel, ConversionReport]:
    """Read an MAE ``.pth`` (tensors only, ``weights_only=True``) into a ``ViTModel`` without pooler, in eval mode.

    Raises ConfigError when the file is missing or unreadable, or when tensors do
    not fit the config's shapes; missing and unexpected keys are only reported.
    """
    converted, report = convert_mae_checkpoint(read_mae_checkpoint(path), config)
    if report.mismatched:
        raise ConfigError(f"MAE checkpoint {str(path)!r} does not fit the ViT config:\n{report}")
    model = ViTModel(config, add_pooling_layer=False)
    model.load_state_dict(converted, strict=False)
    return model.eval(), report
