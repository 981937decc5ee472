"""The shared test matrix: every registered method, on a tiny config, passes the same checks.

Rows come from ``list_methods()`` at run time, so a new method module is tested
as soon as it registers. A method that cannot run on the default tiny config
gets a row in ``TINY_OVERRIDES``; one that trains its whole network goes in
``TRAINS_EVERYTHING``. The last section holds the checks specific to
``full``, ``prompt``, ``adapter`` and ``lora``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F

from medsweep.errors import ConfigError
from medsweep.trainables.backbones import build_backbone, pooled_features
from medsweep.trainables.methods import Method, build_method, get_method, list_methods, make_config

TINY_DEFAULT: dict[str, Any] = {"backbone": "vit-tiny", "image_size": 64, "num_classes": 3}
TINY_OVERRIDES: dict[str, dict[str, Any]] = {"truncated": {"backbone": "resnet-tiny-test"}}
TRAINS_EVERYTHING = {"full", "truncated"}
METHODS = list_methods()
PRELOADABLE = [name for name in METHODS if get_method(name).model_cls.preloadable]
BATCH = 2
STEPS = 3


def tiny_values(name: str) -> dict[str, Any]:
    return {**TINY_DEFAULT, **TINY_OVERRIDES.get(name, {})}


def build(name: str, seed: int = 0, **values: Any) -> Method:
    torch.manual_seed(seed)
    return build_method(name, {**tiny_values(name), **values})


def make_batch(method: Method, preloaded: bool = False) -> dict[str, torch.Tensor]:
    """Random normalised images ``[B, 3, S, S]`` for every input the loop would supply."""
    generator = torch.Generator().manual_seed(1)
    return {
        key: torch.randn(BATCH, 3, image.size, image.size, generator=generator)
        for key, image in method.stored_inputs(preloaded=preloaded).items()
    }


def labels(method: Method) -> torch.Tensor:
    return torch.arange(BATCH) % method.config.num_classes


@torch.no_grad()
def eval_logits(method: Method, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    method.eval()
    return method(batch)


class Trained(NamedTuple):
    method: Method
    before: dict[str, torch.Tensor]  # every parameter and buffer before training
    batch: dict[str, torch.Tensor]


@cache
def trained(name: str) -> Trained:
    """The tiny method after ``STEPS`` AdamW steps over its own parameter groups (built once per run)."""
    method = build(name)
    before = {key: value.detach().clone() for key, value in method.state_dict().items()}
    batch = make_batch(method)
    optimizer = torch.optim.AdamW(method.param_groups(weight_decay=0.1), lr=1e-2)
    method.train()
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(method(batch), labels(method)).backward()
        optimizer.step()
    return Trained(method, before, batch)


# -- the matrix ---------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_forward_is_finite(name: str) -> None:
    method = build(name)
    method.train()
    logits = method(make_batch(method))
    assert logits.shape == (BATCH, method.config.num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", METHODS)
def test_backward_reaches_exactly_the_learnable_parameters(name: str) -> None:
    method = build(name)
    method.train()
    F.cross_entropy(method(make_batch(method)), labels(method)).backward()
    frozen_with_grad = [n for n, p in method.named_parameters() if not p.requires_grad and p.grad is not None]
    learnable_without_grad = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not frozen_with_grad
    assert not learnable_without_grad, "learnable but unused parameters inflate the learnable count"


@pytest.mark.parametrize("name", METHODS)
def test_optimizer_groups_cover_exactly_the_learnable_parameters(name: str) -> None:
    method = build(name)
    grouped = [id(p) for group in method.param_groups(weight_decay=0.1) for p in group["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in method.parameters() if p.requires_grad}


@pytest.mark.parametrize("name", METHODS)
def test_training_leaves_frozen_parameters_untouched(name: str) -> None:
    method, before, _ = trained(name)
    after = method.state_dict()
    frozen = [n for n, p in method.named_parameters() if not p.requires_grad]
    for pname in frozen:
        assert torch.equal(after[pname], before[pname]), pname
        assert method.get_parameter(pname).grad is None, pname
    changed = [n for n, p in method.named_parameters() if p.requires_grad and not torch.equal(after[n], before[n])]
    assert changed, "no learnable parameter moved in training"
    # frozen submodules run as at inference: their buffers (BatchNorm statistics...) do not move either
    prefixes = {id(m): n for n, m in method.named_modules()}
    for module in method.frozen_modules():
        for bname, _ in module.named_buffers():
            key = f"{prefixes[id(module)]}.{bname}"
            assert torch.equal(after[key], before[key]), key


@pytest.mark.parametrize("name", METHODS)
def test_parameter_counts(name: str) -> None:
    method = build(name)
    learnable, total = method.parameter_counts()
    assert learnable == sum(p.numel() for p in method.parameters() if p.requires_grad)
    assert learnable > 0
    if name in TRAINS_EVERYTHING:
        assert learnable == total
    else:
        assert learnable < total


@pytest.mark.parametrize("name", METHODS)
def test_trainable_state_dict_round_trip(name: str) -> None:
    method, _, batch = trained(name)
    state = method.trainable_state_dict()
    frozen = {n for n, p in method.named_parameters() if not p.requires_grad}
    assert not frozen & set(state), "a checkpoint must not carry the frozen weights"

    fresh = build(name)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= {n for n, p in fresh.named_parameters() if not p.requires_grad}
    assert torch.equal(eval_logits(fresh, batch), eval_logits(method, batch))


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_initial_outputs(name: str) -> None:
    first, second = build(name, seed=0), build(name, seed=0)
    batch = make_batch(first)
    assert torch.equal(eval_logits(first, batch), eval_logits(second, batch))


@pytest.mark.parametrize("name", METHODS)
def test_config_round_trip(name: str) -> None:
    config = build(name).config
    assert type(config).from_dict(config.to_dict()) == config
    assert make_config(name, json.loads(config.to_json())) == config
    assert make_config(name, {**config.to_dict(), "lr": 1e-3, "method": name}) == config  # other namespaces ignored


@pytest.mark.parametrize("name", METHODS)
def test_every_config_field_has_help(name: str) -> None:
    for spec in dataclasses.fields(get_method(name).config_cls):
        assert spec.metadata.get("help"), f"{name}.{spec.name} has no help text"


@pytest.mark.parametrize("name", PRELOADABLE)
def test_preloaded_features_give_the_same_logits(name: str) -> None:
    method = build(name)
    method.eval()
    full_batch = make_batch(method)
    features = method.frozen_features(full_batch[method.frozen_input])
    assert set(features) == set(method.feature_keys())
    preloaded = {key: full_batch[key] for key in method.stored_inputs(preloaded=True)}
    preloaded.update({key: value.float() for key, value in features.items()})  # stored as float32
    torch.testing.assert_close(eval_logits(method, preloaded), eval_logits(method, full_batch))


# -- checks specific to full, prompt, adapter and lora -------------------------------------

VIT_ONLY = ["prompt", "adapter", "lora"]


@pytest.mark.parametrize("name", VIT_ONLY)
def test_vit_methods_refuse_other_backbones(name: str) -> None:
    with pytest.raises(ConfigError, match="ViT"):
        build(name, backbone="resnet-tiny-test")


@pytest.mark.parametrize("name", VIT_ONLY)
def test_vit_methods_run_a_loaded_checkpoint_at_another_resolution(name: str, tmp_path: Path) -> None:
    """FPT runs 384 px checkpoints at 512 px: position embeddings are interpolated (here 64 px -> 48 px)."""
    build_backbone("vit-tiny").model.save_pretrained(tmp_path)
    method = build(name, backbone=str(tmp_path), image_size=48)
    logits = eval_logits(method, make_batch(method))
    assert logits.shape == (BATCH, 3)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("prompt", {"num_prompts": 0}),
        ("prompt", {"prompt_dropout": 1.0}),
        ("adapter", {"bottleneck": 0}),
        ("lora", {"rank": 0}),
        ("lora", {"alpha": 0.0}),
        ("lora", {"lora_dropout": -0.1}),
        ("lora", {"target_modules": "query,qkv"}),
        ("lora", {"target_modules": " , "}),
        ("lora", {"pool": "max"}),
    ],
)
def test_bad_values_are_config_errors(name: str, values: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        make_config(name, {**tiny_values(name), **values})


@pytest.mark.parametrize(("name", "values"), [("adapter", {}), ("lora", {"pool": "cls"})])
def test_zero_initialised_methods_start_as_the_pretrained_network(name: str, values: dict[str, Any]) -> None:
    """Zero ``up`` / ``B`` matrices: before training, the logits are the head on the plain backbone's feature."""
    method = build(name, **values)
    batch = make_batch(method)
    plain = build_backbone(TINY_DEFAULT["backbone"], TINY_DEFAULT["image_size"]).freeze()
    with torch.no_grad():
        expected = method.head(pooled_features(plain, batch["pixel_values"]))
    torch.testing.assert_close(eval_logits(method, batch), expected)


def test_lora_dropout_follows_train_mode_while_the_backbone_stays_in_eval() -> None:
    method = build("lora")
    method.train()
    dropouts = [m for n, m in method.encoder.named_modules() if n.endswith("lora_dropout.default")]
    assert len(dropouts) == 2 * len(method.encoder.layers)  # query and value of every block
    assert all(m.training for m in dropouts)
    assert not method.encoder.embeddings.training
    assert not method.encoder.layers[0].mlp.training


def test_lora_pools_differ() -> None:
    cls, mean = build("lora", pool="cls"), build("lora", pool="mean")
    batch = make_batch(cls)
    assert not torch.allclose(eval_logits(cls, batch), eval_logits(mean, batch))


def test_adapter_hooks_follow_a_deep_copy() -> None:
    """The hooks must call the copy's own adapters (Ray and checkpoint helpers copy models)."""
    method = build("adapter")
    clone = copy.deepcopy(method)
    batch = make_batch(method)
    with torch.no_grad():
        for adapter in clone.adapters:
            adapter.up.weight.normal_()
    assert torch.equal(eval_logits(method, batch), eval_logits(build("adapter"), batch))
    assert not torch.allclose(eval_logits(clone, batch), eval_logits(method, batch))


@pytest.mark.parametrize("deep", [True, False])
def test_prompts_change_the_output(deep: bool) -> None:
    method = build("prompt", deep=deep)
    batch = make_batch(method)
    before = eval_logits(method, batch)
    with torch.no_grad():
        method.prompts.normal_()
    assert not torch.allclose(eval_logits(method, batch), before)


@pytest.mark.parametrize("backbone", ["resnet-tiny-test", "convnext-tiny-test", "clip-tiny"])
def test_full_fine_tuning_runs_on_every_family(backbone: str) -> None:
    method = build("full", backbone=backbone)
    method.train()
    F.cross_entropy(method(make_batch(method)), labels(method)).backward()
    learnable, total = method.parameter_counts()
    assert learnable == total
    assert all(p.grad is not None for p in method.parameters())


@pytest.mark.parametrize("name", PRELOADABLE)
def test_a_method_built_without_frozen_weights_trains_as_one_built_with_them(name: str) -> None:
    """What a trial on preloaded features builds: a weightless frozen model, the very same learnable start,
    the same logits and checkpoint, less memory."""
    from medsweep.trainables.backbones import frozen_weights_unused
    from medsweep.trainables.memory import parameter_bytes

    full = build(name)
    with frozen_weights_unused():
        light = build(name)
    assert all(p.is_meta for m in light.frozen_modules() for p in m.parameters())
    assert light.parameter_counts() == full.parameter_counts()
    frozen_bytes = sum(p.numel() * p.element_size() for m in full.frozen_modules() for p in m.parameters())
    assert frozen_bytes > 0 and parameter_bytes(light, "adamw") == parameter_bytes(full, "adamw") - frozen_bytes
    learnable = {k: v for k, v in full.trainable_state_dict().items()}
    assert light.trainable_state_dict().keys() <= learnable.keys()
    for key, value in light.trainable_state_dict().items():  # same seeded initialisation of what trains
        assert torch.equal(value, learnable[key]), key
    light.to_device(torch.device("cpu"))
    images = make_batch(full)
    batch = {**make_batch(full, preloaded=True), **full.frozen_features(images[full.frozen_input])}
    before = eval_logits(full, batch)
    assert torch.equal(eval_logits(light, batch), before)
    fresh = build(name, seed=1)
    fresh.load_state_dict(light.trainable_state_dict(), strict=False)  # checkpoints hold no meta tensor
    assert torch.equal(eval_logits(fresh, batch), before)


@pytest.mark.parametrize("name", ["vit-tiny", "clip-tiny", "convnext-tiny-test", "resnet-tiny-test"])
def test_a_saved_backbone_builds_without_reading_its_weights(name: str, tmp_path: Path) -> None:
    from medsweep.trainables.backbones import frozen_weights_unused

    saved = build_backbone(name)
    saved.model.save_pretrained(tmp_path / name)
    for weights in (tmp_path / name).glob("*.safetensors"):
        weights.write_bytes(b"")  # a weightless build must not need them
    with frozen_weights_unused():
        backbone = build_backbone(str(tmp_path / name))
    assert all(p.is_meta for p in backbone.model.parameters())
    assert type(backbone.model) is type(saved.model) and backbone.family == saved.family
    assert sum(p.numel() for p in backbone.model.parameters()) == sum(p.numel() for p in saved.model.parameters())
    assert "weights not loaded" in backbone.identity
