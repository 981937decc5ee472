"""class_weights, layer_decay and decay: the weights, the lr each parameter trains at, what decays, and their effect."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medsweep.datasets.store import ColumnSpec, PreloadStore, StoreWriter
from medsweep.errors import ConfigError
from medsweep.spaces import recommended
from medsweep.trainables.class_weights import balanced_weights
from medsweep.trainables.config import TrainConfig
from medsweep.trainables.loop import cosine_schedule, fit, load_trained, make_optimizer, predict
from medsweep.trainables.methods import build_method
from medsweep.trainables.store_io import StoreIO

TINY = {"backbone": "vit-tiny", "image_size": 64, "num_classes": 3}


# -- balanced weights from counts ------------------------------------------------------


def test_balanced_multiclass_weights_are_inverse_frequencies() -> None:
    weights = balanced_weights([90, 10], rows=100, num_classes=2, task="multiclass")
    assert weights.tolist() == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])
    # A balanced split weighs every class 1; a class absent from the split (trailing or not) keeps 1.
    assert balanced_weights([5, 5, 5], rows=15, num_classes=3, task="multiclass").tolist() == pytest.approx([1, 1, 1])
    assert balanced_weights([6, 0], rows=8, num_classes=3, task="multiclass").tolist() == pytest.approx([8 / 18, 1.0, 1.0])


def test_balanced_multilabel_pos_weight_is_negatives_over_positives() -> None:
    weights = balanced_weights([10, 0, 50, 25], rows=50, num_classes=4, task="multilabel")
    assert weights.tolist() == pytest.approx([40 / 10, 1.0, 1.0, 1.0])  # no positive / no negative: 1


def _store(root: Path, labels: dict[str, np.ndarray], features: dict[str, np.ndarray], task: str = "multiclass") -> PreloadStore:
    """A store written directly: a ``pooled`` feature column (what the linear probe preloads) and labels."""
    width = next(iter(features.values())).shape[1]
    writer = StoreWriter(root, [ColumnSpec("pooled", (width,), "float32")], task, {"test": root.name})
    for split, split_labels in labels.items():
        half = len(split_labels) // 2  # two shards, so counts add up across shards
        for shard, rows in enumerate((slice(0, half), slice(half, None))):
            index = np.arange(len(split_labels))[rows]
            writer.write_shard(split, shard, index, split_labels[rows], {"pooled": features[split][rows]})
    return writer.finish({s: len(v) for s, v in labels.items()}, dict.fromkeys(labels, 2), {})


def test_store_counts_its_labels(tmp_path: Path) -> None:
    multiclass = _store(tmp_path / "mc", {"train": np.array([0, 2, 2, 0, 2])}, {"train": np.zeros((5, 4))})
    assert multiclass.label_counts("train") == [2, 0, 3]
    labels = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1], [1, 0, 1]], dtype=np.float32)
    multilabel = _store(tmp_path / "ml", {"train": labels}, {"train": np.zeros((4, 4))}, task="multilabel")
    assert multilabel.label_counts("train") == [3, 0, 3]
    assert StoreIO(multilabel).label_counts("train") == [3, 0, 3]


# -- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"class_weights": "inverse"}, "class_weights must be one of none, balanced, got 'inverse'"),
        ({"layer_decay": 0.0}, r"layer_decay must be in \(0, 1\], got 0.0"),
        ({"layer_decay": 1.5}, r"layer_decay must be in \(0, 1\], got 1.5"),
        ({"decay": "biases"}, "decay must be one of matrices, all, got 'biases'"),
    ],
)
def test_bad_values_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_layer_decay_without_a_vit_is_refused_naming_the_fix() -> None:
    method = build_method("truncated", {"method": "truncated", **TINY, "backbone": "resnet-tiny-test"})
    with pytest.raises(ConfigError, match=r"layer_decay 0\.65 needs a ViT backbone.*'truncated'.*set layer_decay 1"):
        make_optimizer(method, TrainConfig(layer_decay=0.65), lr=1e-3)
    make_optimizer(method, TrainConfig(layer_decay=1.0), lr=1e-3)  # off: any backbone


# -- layer_decay and decay -------------------------------------------------------------------


def _lr_of_each_parameter(method, cfg: TrainConfig, lr: float) -> dict[str, float]:
    """Each trainable parameter's lr after one step of the loop's schedule."""
    optimizer = make_optimizer(method, cfg, lr)
    scheduler = cosine_schedule(optimizer, warmup_steps=0, total_steps=10)
    optimizer.step()
    scheduler.step()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return {name: lr_of[id(p)] for name, p in method.named_parameters() if p.requires_grad}


def test_layer_decay_scales_each_vit_block_by_depth() -> None:
    method = build_method("full", {"method": "full", **TINY})  # vit-tiny: 2 blocks
    lr, decay = 1e-2, 0.5
    factor = 0.5 * (1 + math.cos(math.pi * 1 / 10))  # the cosine after one of ten steps
    lrs = _lr_of_each_parameter(method, TrainConfig(layer_decay=decay), lr)
    expected = {
        "encoder.embeddings.cls_token": decay**3,
        "encoder.embeddings.patch_embeddings.projection.weight": decay**3,
        "encoder.layers.0.attention.q_proj.weight": decay**2,
        "encoder.layers.0.attention.q_proj.bias": decay**2,
        "encoder.layers.1.attention.q_proj.weight": decay,
        "encoder.layernorm.weight": 1.0,
        "head.weight": 1.0,
    }
    for name, scale in expected.items():
        assert lrs[name] == pytest.approx(lr * factor * scale), name
    off = _lr_of_each_parameter(method, TrainConfig(layer_decay=1.0), lr)
    assert list(off.values()) == pytest.approx([lr * factor] * len(off))


def test_lora_adamw_recipe_decays_layers_and_its_sgd_recipe_does_not() -> None:
    adamw = recommended("lora", weights="cxr_mae", dataset="nih", fraction=1)
    sgd = recommended("lora", weights="mrm", dataset="nih", fraction=1)
    assert (adamw["optimizer"], adamw["layer_decay"]) == ("adamw", 0.65)
    assert (sgd["optimizer"], sgd["layer_decay"]) == ("sgd", 1.0)
    method = build_method("lora", {**TINY, **adamw})
    lrs = _lr_of_each_parameter(method, TrainConfig.from_dict({**TINY, **adamw}), adamw["lr"])
    block0 = lrs["encoder.layers.0.attention.q_proj.lora_A.default.weight"]
    assert block0 == pytest.approx(lrs["head.weight"] * 0.65**2)


def test_decay_all_decays_biases_and_norms_too() -> None:
    method = build_method("full", {"method": "full", **TINY})
    names = {id(p): n for n, p in method.named_parameters()}

    def decayed(rule: str) -> set[str]:
        groups = method.param_groups(0.1, decay=rule)
        return {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}

    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert decayed("all") == trainable
    matrices = decayed("matrices")
    assert "head.weight" in matrices
    assert not {"head.bias", "encoder.layernorm.weight", "encoder.embeddings.cls_token"} & matrices


def test_published_defaults_per_method() -> None:
    assert recommended("truncated")["class_weights"] == "balanced"  # TTL utils/settings.py weighs every loss
    assert recommended("fpt_plus")["decay"] == recommended("fpt")["decay"] == "all"
    assert recommended("linear")["class_weights"] == "none" and recommended("linear")["decay"] == "matrices"


# -- balanced weights at work ------------------------------------------------------------------


@pytest.fixture(scope="module")
def imbalanced_store(tmp_path_factory) -> PreloadStore:
    """90/10 training split of two overlapping Gaussian classes (32-d, vit-tiny's feature width); balanced val."""
    rng = np.random.default_rng(0)

    def split(n0: int, n1: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.array([0] * n0 + [1] * n1)
        order = rng.permutation(len(labels))
        features = rng.normal(size=(len(labels), 32)) + 0.15 * labels[:, None]
        return labels[order], features[order].astype(np.float32)

    (train_y, train_x), (val_y, val_x) = split(180, 20), split(100, 100)
    return _store(tmp_path_factory.mktemp("imbalanced"), {"train": train_y, "val": val_y}, {"train": train_x, "val": val_x})


def _minority_recall(store: PreloadStore, class_weights: str, folder: Path) -> tuple[float, float, float]:
    """Val recall of class 1 after 5 epochs, the last reported val loss, and the plain CE of the same weights."""
    config = {"method": "linear", **TINY, "num_classes": 2, "lr": 5e-2, "batch_size": 20, "epochs": 5, "class_weights": class_weights}
    io = StoreIO(store)
    fit(config, io, folder)
    method = load_trained("linear", config, io.checkpoints[-1])
    _, logits, labels = predict(method, io, "val")
    plain_loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels).long()).item()
    return float((logits.argmax(1)[labels == 1] == 1).mean()), io.reports[-1]["val_loss"], plain_loss


def test_balanced_weights_raise_minority_recall_at_equal_epochs(imbalanced_store: PreloadStore, tmp_path: Path) -> None:
    assert imbalanced_store.label_counts("train") == [180, 20]
    plain, _, _ = _minority_recall(imbalanced_store, "none", tmp_path / "none")
    balanced, val_loss, plain_loss = _minority_recall(imbalanced_store, "balanced", tmp_path / "balanced")
    assert balanced > plain + 0.2, (plain, balanced)
    # Only the training loss is weighted: the reported val loss is the plain cross-entropy.
    assert val_loss == pytest.approx(plain_loss, rel=1e-4)


def test_sweep_refuses_a_set_layer_decay_on_a_resnet_before_ray_starts(synthetic_spec, tmp_path: Path) -> None:
    from medsweep.search.settings import SweepSettings
    from medsweep.search.sweep import check_methods

    settings = SweepSettings(methods=["truncated"], backbone="resnet-tiny-test", image_size=64, out=tmp_path, fixed={"layer_decay": 0.5})
    with pytest.raises(ConfigError, match="set layer_decay 1"):
        check_methods(settings, synthetic_spec)
    check_methods(SweepSettings(methods=["truncated"], backbone="resnet-tiny-test", image_size=64, out=tmp_path), synthetic_spec)
