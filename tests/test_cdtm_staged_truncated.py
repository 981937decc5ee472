"""cdtm, staged and truncated on tiny backbones: what trains, what stays frozen, counts, shapes, stages, state."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from transformers import ResNetConfig, ResNetModel

from medsweep.errors import ConfigError
from medsweep.trainables.methods import Method, build_method
from medsweep.trainables.methods.cdtm import ClusterAttention, num_tokens
from medsweep.trainables.methods.truncated import TruncatedConfig, kept_layers

TINY_CDTM = {"num_centers": 4, "mlp_ratio": 2.0}


def _pixels(size: int = 64, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _steps(method: Method, pixels: torch.Tensor, steps: int = 2, lr: float = 1e-2) -> None:
    """A few AdamW steps over the method's trainable parameters."""
    optimizer = torch.optim.AdamW(method.param_groups(weight_decay=0.01), lr=lr)
    labels = torch.arange(pixels.shape[0]) % method.config.num_classes
    method.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(method({"pixel_values": pixels}), labels).backward()
        optimizer.step()


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trainable(method: Method) -> set[str]:
    return {n.split(".")[0] for n, p in method.named_parameters() if p.requires_grad}


# -- cdtm -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "size"),
    [("vit-tiny", 64), ("vit-tiny", 56), ("clip-tiny", 64), ("convnext-tiny-test", 70), ("resnet-tiny-test", 57)],
)
def test_cdtm_trains_module_and_head_only(backbone: str, size: int) -> None:
    method = build_method("cdtm", {"backbone": backbone, "image_size": size, **TINY_CDTM})
    pixels = _pixels(size)
    tokens = method.frozen_features(pixels)["tokens"]
    assert tokens.shape[1] == num_tokens(method.backbone, size) == method.post.attn.mixing.shape[-1]

    frozen = _snapshot(method.encoder)  # buffers too: BatchNorm statistics must not move
    module_before = _snapshot(method.post)
    method.train()
    logits = method({"pixel_values": pixels})
    assert logits.shape == (2, 2)
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert all(p.grad is None for p in method.encoder.parameters())
    assert all(p.grad is not None for p in [*method.post.parameters(), *method.head.parameters()])

    _steps(method, pixels)
    assert _same(frozen, _snapshot(method.encoder))
    assert not torch.equal(module_before["attn.mixing"], method.post.attn.mixing)
    assert _trainable(method) == {"post", "head"}


def test_cdtm_parameter_counts() -> None:
    method = build_method("cdtm", {"backbone": "vit-tiny", "num_classes": 3, **TINY_CDTM})
    d, n, k, h, c = 32, (64 // 8) ** 2, 4, 64, 3
    module = k * d + k * n * n + (d * d + d) + 4 * (2 * d) + (d * h + h) + (h * d + d)
    learnable, total = method.parameter_counts()
    assert learnable == module + d * c + c
    assert total == learnable + sum(p.numel() for p in method.encoder.parameters())
    assert method.encoder.pooler is None  # the token path never runs ViT's pooler


def test_cdtm_preloaded_and_on_the_fly_logits_identical() -> None:
    method = build_method("cdtm", {"backbone": "vit-tiny", **TINY_CDTM}).eval()
    assert method.preloadable and method.feature_keys() == ("tokens",)
    assert not method.image_inputs()["pixel_values"].augment
    assert method.stored_inputs(preloaded=True) == {}
    pixels = _pixels()
    preloaded = method.frozen_features(pixels)
    assert preloaded["tokens"].shape == (2, 64, 32)
    with torch.no_grad():
        assert torch.equal(method(preloaded), method({"pixel_values": pixels}))


def test_cluster_attention_matches_official_formulation() -> None:
    """Same numbers as the official Cluster_Attention, which expands the weights to [B, K, N, N]."""
    torch.manual_seed(0)
    attention = ClusterAttention(dim=8, tokens=5, centers=3)
    x = torch.randn(2, 5, 8)
    _, n, _ = x.shape
    weights = torch.mm(F.normalize(x.mean(1), dim=-1), F.normalize(attention.centers.T, dim=0)).softmax(dim=-1)
    expanded = weights.unsqueeze(-1).unsqueeze(-1).repeat(1, 1, n, n)
    mixing = (expanded * attention.mixing.unsqueeze(0).expand_as(expanded)).sum(1)
    expected = attention.proj(torch.bmm(mixing, x))
    torch.testing.assert_close(attention(x), expected)


def test_cdtm_rejects_tokens_of_another_size_and_bad_config() -> None:
    method = build_method("cdtm", {"backbone": "vit-tiny", **TINY_CDTM})
    with pytest.raises(ConfigError, match="built for 64 tokens but got 49"):
        method({"tokens": torch.randn(2, 49, 32)})
    with pytest.raises(ConfigError, match="num_centers"):
        build_method("cdtm", {"num_centers": 0})
    with pytest.raises(ConfigError, match="mlp_ratio"):
        build_method("cdtm", {"mlp_ratio": 0.0})


# -- staged -----------------------------------------------------------------------------


@pytest.mark.parametrize("stage1", ["linear", "cdtm"])
def test_staged_begin_epoch_switches_at_the_boundary(stage1: str) -> None:
    config = {"backbone": "vit-tiny", "stage1": stage1, "stage1_epochs": 2, **TINY_CDTM}
    method = build_method("staged", config)
    stage1_set = {"head", "post"} if stage1 == "cdtm" else {"head"}
    assert not method.preloadable
    method.train()
    for epoch in (0, 1):
        assert method.begin_epoch(epoch) is None
        assert _trainable(method) == stage1_set
        assert not method.encoder.training
    learnable_stage1, total = method.parameter_counts()

    assert method.begin_epoch(2) == pytest.approx(0.1)
    assert _trainable(method) == stage1_set | {"encoder"}
    assert all(p.requires_grad for p in method.parameters())
    assert method.encoder.training and method.frozen_modules() == []
    assert method.parameter_counts() == (total, total) and learnable_stage1 < total
    assert method.begin_epoch(3) is None and method.stage == 2

    resumed = build_method("staged", config)  # a run resumed in stage 2 gets stage 2 back, without a reload
    assert resumed.begin_epoch(3) is None
    assert all(p.requires_grad for p in resumed.parameters())


def test_staged_backbone_fixed_in_stage1_and_trained_in_stage2() -> None:
    method = build_method("staged", {"backbone": "convnext-tiny-test", "stage1_epochs": 1, **TINY_CDTM})
    pixels = _pixels()
    before = _snapshot(method.encoder)
    method.begin_epoch(0)
    _steps(method, pixels)
    assert _same(before, _snapshot(method.encoder))

    assert method.begin_epoch(1) == pytest.approx(0.1)
    _steps(method, pixels, lr=1e-3)
    after = _snapshot(method.encoder)
    assert not torch.equal(before["embeddings.patch_embeddings.weight"], after["embeddings.patch_embeddings.weight"])


def test_staged_linear_pools_cls_for_vit_and_mean_map_for_cnn() -> None:
    pixels = _pixels()
    vit = build_method("staged", {"backbone": "vit-tiny", "stage1": "linear"}).eval()
    convnext = build_method("staged", {"backbone": "convnext-tiny-test", "stage1": "linear"}).eval()
    with torch.no_grad():
        cls = vit.encoder(pixel_values=pixels).last_hidden_state[:, 0]
        torch.testing.assert_close(vit({"pixel_values": pixels}), vit.head(cls))
        feature_map = convnext.encoder(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(convnext({"pixel_values": pixels}), convnext.head(feature_map.mean((2, 3))))


def test_staged_config_validation() -> None:
    with pytest.raises(ConfigError, match="stage1 must be"):
        build_method("staged", {"stage1": "full"})
    with pytest.raises(ConfigError, match="stage1_epochs"):
        build_method("staged", {"stage1_epochs": 0})


# -- truncated --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50_layout(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ResNet with ResNet-50's 3-4-6-3 bottleneck layout but tiny widths, as a local pretrained folder."""
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[3, 4, 6, 3], layer_type="bottleneck")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("resnet50-layout")
    ResNetModel(config).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    ("granularity", "truncation", "kept"),
    [("block", 1, 3), ("block", 2, 7), ("block", 3, 13), ("block", -1, 16), ("layer", 1, 0), ("layer", 2, 1), ("layer", 16, 15), ("layer", -1, 16)],
)
def test_truncated_keeps_the_published_depths(granularity: str, truncation: int, kept: int) -> None:
    config = TruncatedConfig(truncation=truncation, granularity=granularity)
    assert kept_layers(config, ResNetConfig(depths=[3, 4, 6, 3]), "resnet-50") == kept


@pytest.mark.parametrize(("granularity", "truncation", "kept"), [("block", 2, 7), ("layer", 16, 15)])
def test_truncated_model_holds_stem_and_kept_layers(resnet50_layout: str, granularity: str, truncation: int, kept: int) -> None:
    method = build_method(
        "truncated", {"backbone": resnet50_layout, "truncation": truncation, "granularity": granularity, "num_classes": 3}
    )
    assert len(method.trunk) - 1 == kept  # stem + kept residual layers
    assert method({"pixel_values": _pixels(32)}).shape == (2, 3)


def test_truncated_rejects_out_of_range_and_non_resnet(resnet50_layout: str) -> None:
    with pytest.raises(ConfigError, match=r"block granularity: it has 4 stages, use 1\.\.3"):
        build_method("truncated", {"backbone": resnet50_layout, "truncation": 4})
    with pytest.raises(ConfigError, match=r"layer granularity: it has 16 residual layers, use 1\.\.16"):
        build_method("truncated", {"backbone": resnet50_layout, "truncation": 17, "granularity": "layer"})
    with pytest.raises(ConfigError, match=r"truncation must be in \[1, inf\) or -1"):
        build_method("truncated", {"truncation": 0})
    with pytest.raises(ConfigError, match="granularity"):
        build_method("truncated", {"granularity": "stage"})
    with pytest.raises(ConfigError, match="needs a ResNet backbone"):
        build_method("truncated", {"backbone": "vit-tiny"})


def test_truncated_trains_everything_it_keeps_and_counts_only_that() -> None:
    method = build_method("truncated", {"backbone": "resnet-tiny-test", "truncation": 2})
    whole = build_method("truncated", {"backbone": "resnet-tiny-test"})
    learnable, total = method.parameter_counts()
    assert learnable == total == sum(p.numel() for p in method.trunk.parameters()) + 32 * 2 + 2
    assert learnable < whole.parameter_counts()[0]

    pixels = _pixels()
    before = _snapshot(method)
    _steps(method, pixels)
    after = _snapshot(method)
    assert not torch.equal(before["trunk.0.embedder.convolution.weight"], after["trunk.0.embedder.convolution.weight"])
    assert not torch.equal(before["trunk.2.layer.0.convolution.weight"], after["trunk.2.layer.0.convolution.weight"])
    assert not torch.equal(before["trunk.0.embedder.normalization.running_mean"], after["trunk.0.embedder.normalization.running_mean"])


def test_truncated_unpooled_head_fits_the_map_at_odd_sizes() -> None:
    for truncation in (1, 3):
        method = build_method("truncated", {"truncation": truncation, "pool": False, "image_size": 57})
        pixels = _pixels(57)
        feature_map = method.trunk(pixels)
        assert method.head[-1].in_features == feature_map[0].numel()
        assert method({"pixel_values": pixels}).shape == (2, 2)
    whole = build_method("truncated", {"truncation": -1, "pool": False})
    assert isinstance(whole.head[0], torch.nn.AdaptiveAvgPool2d)  # the whole network always pools


# -- checkpoints of what trains ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "config", "epoch"),
    [
        ("cdtm", {"backbone": "resnet-tiny-test", **TINY_CDTM}, None),
        ("staged", {"backbone": "vit-tiny", "stage1_epochs": 1, **TINY_CDTM}, 0),
        ("staged", {"backbone": "vit-tiny", "stage1_epochs": 1, **TINY_CDTM}, 1),
        ("truncated", {"truncation": 2}, None),
    ],
)
def test_trainable_state_dict_round_trip(name: str, config: dict[str, object], epoch: int | None) -> None:
    method = build_method(name, config)
    if epoch is not None:
        method.begin_epoch(epoch)
    pixels = _pixels()
    _steps(method, pixels)
    state = method.trainable_state_dict()
    frozen = {n for n, p in method.named_parameters() if not p.requires_grad}
    assert not frozen & state.keys()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)

    restored = build_method(name, config)
    if epoch is not None:
        restored.begin_epoch(epoch)
    result = restored.load_state_dict(torch.load(buffer, weights_only=True), strict=False)
    assert set(result.missing_keys) == frozen and not result.unexpected_keys
    method.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(method({"pixel_values": pixels}), restored({"pixel_values": pixels}))


def test_methods_are_registered_with_typed_helped_fields() -> None:
    from dataclasses import fields

    from medsweep.trainables.methods import get_method

    for name in ("cdtm", "staged", "truncated"):
        entry = get_method(name)
        assert all(f.metadata.get("help") for f in fields(entry.config_cls)), name
