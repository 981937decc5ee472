"""FPT and FPT+: frozen path, preload parity, keep-ratio prefix, parameter counts, config checks.

Everything runs the 64 px ``vit-tiny`` backbone (65 LPM tokens) except the
paper-count test, which builds ViT-B/16-384 on the meta device (no weights).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medsweep.errors import ConfigError, StoreError
from medsweep.trainables.methods import build_method
from medsweep.trainables.methods.base import ImageInput
from medsweep.trainables.methods.fpt import FPTConfig, FPTPlusConfig

METHODS = ["fpt_plus", "fpt"]


def tiny(name: str, seed: int = 0, **overrides: object) -> nn.Module:
    """A vit-tiny FPT/FPT+ whose trainable init is fixed by ``seed`` (side width 16)."""
    torch.manual_seed(seed)
    values = {"image_size": 64, "num_classes": 3, "side_reduction": 2, "num_prompts": 4, **overrides}
    return build_method(name, values)


def make_batch(model: nn.Module, size: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    side = model.side_image_size
    return {
        "pixel_values": torch.randn(size, 3, 64, 64, generator=gen),
        "side_pixel_values": torch.randn(size, 3, side, side, generator=gen),
        "labels": torch.randint(0, 3, (size,), generator=gen),
    }


def preloaded(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch a trial gets from the store: frozen features instead of the LPM image."""
    features = model.frozen_features(batch["pixel_values"])
    return {"side_pixel_values": batch["side_pixel_values"], "labels": batch["labels"], **features}


def lpm_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.lpm.state_dict().items()}


@pytest.mark.parametrize("name", METHODS)
def test_forward_backward_trains_only_side_and_fusion(name: str) -> None:
    model = tiny(name)
    batch = make_batch(model)
    features = model.frozen_features(batch["pixel_values"])
    layers = 1 if name == "fpt_plus" else 2  # last half of 2 layers vs all
    assert model.extracted_layers == ([1] if name == "fpt_plus" else [0, 1])
    for key in ("key_states", "value_states"):
        assert features[key].shape == (3, layers, 4, int(65 * 0.5), 8)  # [B, L, heads, K, hd]
        assert features[key].dtype == torch.float32
    before = lpm_snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        logits = model(batch)
        assert logits.shape == (3, 3)
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in model.lpm.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.lpm.state_dict().items())
    assert model.fusion.prompts.grad is not None and model.side.head.weight.grad is not None
    assert model.lpm.pooler is None


@pytest.mark.parametrize("name", METHODS)
def test_preloaded_and_on_the_fly_train_identically(name: str) -> None:
    """Same seed, same batch: stored features vs the LPM on the fly give the same losses over 3 SGD steps."""
    batch = make_batch(tiny(name))
    runs = []
    for use_store in (True, False):
        model = tiny(name)  # identical trainable init
        inputs = preloaded(model, batch) if use_store else batch
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model.train()
        torch.manual_seed(123)  # same fusion-dropout masks in both runs
        losses, logits = [], None
        for _ in range(3):
            logits = model(inputs)
            loss = nn.functional.cross_entropy(logits, batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs.append((losses, logits.detach()))
    (store_losses, store_logits), (fly_losses, fly_logits) = runs
    assert store_losses == pytest.approx(fly_losses, rel=1e-6, abs=1e-7)
    assert torch.allclose(store_logits, fly_logits, atol=1e-6)
    assert len(set(store_losses)) == 3  # the model did train


@pytest.mark.parametrize("importance", ["global", "class_token"])
def test_selection_matches_official_topk_over_hf_attention(importance: str) -> None:
    """Each head keeps its own top-K keys by attention received (official ``important_token_selection``).

    The reference reads attention maps and K/V projections from HF's own eager forward.
    """
    model = tiny("fpt", token_importance=importance)
    pixels = make_batch(model)["pixel_values"]
    reference = copy.deepcopy(model.lpm)
    reference.set_attn_implementation("eager")
    projected: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    for layer in reference.layers:
        layer.attention.k_proj.register_forward_hook(lambda m, a, out: projected["k"].append(out))
        layer.attention.v_proj.register_forward_hook(lambda m, a, out: projected["v"].append(out))
    with torch.no_grad():
        attentions = reference(pixels, output_attentions=True, interpolate_pos_encoding=True).attentions
    ours = model.frozen_features(pixels)
    for i, probs in enumerate(attentions):  # probs [B, H, N, N]
        scores = probs.mean(dim=-2) if importance == "global" else probs[:, :, 0]
        top = scores.topk(model.preload_tokens, dim=-1).indices.unsqueeze(-1).expand(-1, -1, -1, 8)
        for short, key in (("k", "key_states"), ("v", "value_states")):
            heads = projected[short][i].view(3, 65, 4, 8).transpose(1, 2)  # [B, H, N, hd]
            assert torch.allclose(ours[key][:, i], heads.gather(2, top), atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_keep_ratio_is_a_prefix_of_the_stored_tokens(name: str) -> None:
    """Stored at 0.5 and trained at 0.2 == selecting 0.2 directly; token order inside K/V does not matter."""
    stored_model = tiny(name, keep_ratio=0.2, preload_keep_ratio=0.5)
    direct_model = tiny(name, keep_ratio=0.2, preload_keep_ratio=0.2)
    direct_model.load_state_dict(stored_model.state_dict())
    batch = make_batch(stored_model)
    stored_model.eval()
    direct_model.eval()
    wide = stored_model.frozen_features(batch["pixel_values"])
    narrow = direct_model.frozen_features(batch["pixel_values"])
    assert wide["key_states"].shape[3] == 32 and narrow["key_states"].shape[3] == 13
    for key in ("key_states", "value_states"):
        assert torch.equal(wide[key][:, :, :, :13], narrow[key])
    with torch.no_grad():
        from_store = stored_model(preloaded(stored_model, batch))
        direct = direct_model(batch)
        order = torch.randperm(13)  # one permutation for keys and values alike
        shuffled = {k: v[:, :, :, order] for k, v in narrow.items()}
        permuted = direct_model({"side_pixel_values": batch["side_pixel_values"], **shuffled})
    assert torch.equal(from_store, direct)
    assert torch.allclose(permuted, direct, atol=1e-6)


def test_too_few_stored_tokens_is_a_store_error() -> None:
    model = tiny("fpt_plus", keep_ratio=0.5)
    batch = make_batch(model)
    features = {k: v[:, :, :, :10] for k, v in model.frozen_features(batch["pixel_values"]).items()}
    with pytest.raises(StoreError, match="preload_keep_ratio"):
        model({"side_pixel_values": batch["side_pixel_values"], **features})


def test_train_mode_keeps_the_lpm_in_eval() -> None:
    model = tiny("fpt_plus").train()
    assert not model.lpm.training and not any(m.training for m in model.lpm.modules())
    assert model.side.training and model.fusion.training


@pytest.mark.parametrize("name", METHODS)
def test_trainable_state_dict_round_trip(name: str) -> None:
    model = tiny(name, seed=0)
    batch = make_batch(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    nn.functional.cross_entropy(model(batch), batch["labels"]).backward()
    optimizer.step()
    state = model.trainable_state_dict()
    assert state and not any(k.startswith("lpm.") for k in state)
    restored = tiny(name, seed=7)  # different trainable init; the LPM is rebuilt identically
    missing, unexpected = restored.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("lpm.") for k in missing)
    model.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(model(batch), restored(batch))


@pytest.mark.parametrize(
    ("name", "learnable", "percent", "side_size"),
    [("fpt_plus", 900_965, 1.03, 128), ("fpt", 1_602_341, 1.81, 224)],
)
def test_paper_parameter_counts_vit_b16_384_at_512(name: str, learnable: int, percent: float, side_size: int) -> None:
    """The official counts: frozen LPM = ViT-B/16-384 without pooler + unused 1000-class head = 86,859,496."""
    with torch.device("meta"):  # shapes only, no weights to initialise
        model = build_method(name, {"backbone": "vit-base-patch16-384", "image_size": 512, "num_classes": 5})
    counted, total = model.parameter_counts()
    assert counted == learnable
    assert total - counted == 86_859_496
    assert round(100 * counted / total, 2) == percent
    assert model.side_image_size == side_size
    assert model.keep_tokens == 205 and model.num_tokens == 1025
    assert model.side.vit.config.hidden_size == 96 and model.side.vit.config.intermediate_size == 384
    assert len(model.side.vit.layers) == (6 if name == "fpt_plus" else 12)


def test_inputs_and_preload_key() -> None:
    model = tiny("fpt_plus")
    assert model.image_inputs() == {
        "pixel_values": ImageInput(64, augment=False),
        "side_pixel_values": ImageInput(16, augment=True),
    }
    assert set(model.stored_inputs(preloaded=True)) == {"side_pixel_values"}
    assert model.feature_keys() == ("key_states", "value_states")
    key = model.preload_key()
    assert key == {
        "method": "fpt_plus",
        "image_size": 64,
        "layers": [1],
        "preload_keep_ratio": 0.5,
        "token_importance": "global",
        "legacy_vit_embeddings": True,
    }
    assert tiny("fpt_plus", keep_ratio=0.3).preload_key() == key  # trials of one store share it
    assert tiny("fpt", side_image_size=32).image_inputs()["side_pixel_values"] == ImageInput(32, augment=True)


@pytest.mark.parametrize("config_cls", [FPTPlusConfig, FPTConfig])
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"keep_ratio": 0.0}, "keep_ratio must be in"),
        ({"keep_ratio": 1.5, "preload_keep_ratio": 1.0}, "keep_ratio must be in"),
        ({"keep_ratio": 0.6}, "exceeds preload_keep_ratio"),
        ({"preload_keep_ratio": 0.0}, "preload_keep_ratio must be in"),
        ({"num_prompts": 0}, "num_prompts"),
        ({"side_reduction": 0}, "side_reduction"),
        ({"fusion_dropout": 1.0}, "fusion_dropout"),
        ({"side_image_size": -1}, "side_image_size"),
        ({"token_importance": "random"}, "token_importance"),
        ({"legacy_vit_embeddings": 1}, "legacy_vit_embeddings"),
    ],
)
def test_config_validation(config_cls: type, values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_cls(**values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"backbone": "resnet-tiny-test"}, "needs a ViT backbone"),
        ({"side_reduction": 3}, "not divisible by side_reduction"),
        ({"side_reduction": 16}, "divisible by the 4 attention heads"),
        ({"keep_ratio": 0.01, "preload_keep_ratio": 0.5}, "keeps no token"),
        ({"side_image_size": 4}, "smaller than one 8 px patch"),
    ],
)
def test_model_validation(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_method("fpt_plus", {"image_size": 64, **values})
