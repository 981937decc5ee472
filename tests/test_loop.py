"""The training loop over a real preload store, without Ray: learning, resume, divergence, stages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsweep.datasets.store import LABEL, decode_columns
from medsweep.trainables.backbones import backbone_normalisation
from medsweep.trainables.inputs import model_inputs
from medsweep.trainables.loop import CHECKPOINT_FILE, fit, load_trained, predict
from medsweep.trainables.methods import build_method
from medsweep.trainables.metrics import classification_metrics
from medsweep.trainables.preload import preload
from medsweep.trainables.store_io import StoreIO

LINEAR = {"method": "linear", "backbone": "vit-tiny", "image_size": 64, "lr": 1e-2, "batch_size": 16, "seed": 0}


@pytest.fixture(scope="module")
def linear_store(synthetic_spec, tmp_path_factory):
    config = {**LINEAR, "num_classes": synthetic_spec.num_classes}
    return preload(synthetic_spec, build_method("linear", config), tmp_path_factory.mktemp("cache")).store


def _config(spec, **overrides):
    return {**LINEAR, "num_classes": spec.num_classes, "task": spec.task, **overrides}


class _CrashAfter(StoreIO):
    """Raises after ``epochs`` reports, as a killed trial process would stop."""

    def __init__(self, store, epochs: int) -> None:
        super().__init__(store)
        self.limit = epochs

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if len(self.reports) == self.limit:
            raise KeyboardInterrupt("killed")


def test_linear_probe_learns_the_synthetic_grades(synthetic_spec, linear_store, tmp_path):
    io = StoreIO(linear_store)
    fit(_config(synthetic_spec, epochs=4), io, tmp_path)
    aucs = [r["val_auc"] for r in io.reports]
    assert [r["epoch"] for r in io.reports] == [1, 2, 3, 4]
    assert max(aucs) >= 0.75, aucs
    assert io.reports[-1]["train_loss"] < io.reports[0]["train_loss"]
    assert io.reports[-1]["learnable_params"] == 32 * 3 + 3  # the head only: frozen ViT, no-affine norm
    assert all(r["status"] == "running" for r in io.reports)


def test_a_linear_epoch_ending_in_a_one_image_batch_trains_it_with_the_running_statistics(synthetic_spec, linear_store, tmp_path):
    """A training split of 8k + 1 images at batch 8 (linear's recommended) ended every linear trial's first epoch
    with PyTorch's "Expected more than 1 value per channel when training" from the probe's BatchNorm."""
    from medsweep.trainables.methods.linear import FeatureNorm

    rows = linear_store.meta["splits"]["train"]["rows"]
    io = StoreIO(linear_store)
    fit(_config(synthetic_spec, epochs=2, batch_size=rows - 1), io, tmp_path)  # each epoch: rows - 1 images, then 1
    assert [r["status"] for r in io.reports] == ["running", "running"] and all(math.isfinite(r["train_loss"]) for r in io.reports)

    norm, reference = FeatureNorm(4, affine=False).train(), torch.nn.BatchNorm1d(4, affine=False).train()
    batch = torch.randn(5, 4)
    assert torch.equal(norm(batch), reference(batch)) and torch.equal(norm.running_mean, reference.running_mean)
    one = torch.randn(1, 4, requires_grad=True)
    standardised = norm(one)
    assert torch.allclose(standardised, (one - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps))
    assert torch.equal(norm.running_mean, reference.running_mean)  # not updated by a batch of one
    standardised.sum().backward()
    assert one.grad is not None


def test_resumed_run_continues_from_its_checkpoint_and_matches_an_uninterrupted_one(synthetic_spec, linear_store, tmp_path):
    config = _config(synthetic_spec, epochs=4)
    straight = StoreIO(linear_store)
    fit(config, straight, tmp_path / "a")

    crashed = _CrashAfter(linear_store, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        fit(config, crashed, tmp_path / "b")
    resumed = StoreIO(linear_store)
    resumed.checkpoints = list(crashed.checkpoints)  # what Tune hands a restarted trial
    fit(config, resumed, tmp_path / "c")

    assert [r["epoch"] for r in resumed.reports] == [3, 4]
    for mine, reference in zip(resumed.reports, straight.reports[2:], strict=True):
        assert mine["val_auc"] == pytest.approx(reference["val_auc"], abs=1e-6)
        assert mine["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)


def test_divergent_loss_stops_the_trial_as_diverged(synthetic_spec, linear_store, tmp_path):
    io = StoreIO(linear_store)
    fit(_config(synthetic_spec, epochs=5, lr=1e12, optimizer="sgd", grad_clip=0.0), io, tmp_path)
    last = io.reports[-1]
    assert last["status"] == "diverged"
    assert len(io.reports) < 5
    assert not io.checkpoints[len(io.reports) - 1 :]  # no checkpoint of a diverged epoch


def test_trained_weights_load_back(synthetic_spec, linear_store, tmp_path):
    """The loaded model is the trained one: its weights are the checkpoint's, bit for bit, and it predicts
    the validation metrics the loop reported for that epoch. A fresh model (what a load that loads
    nothing would return) differs in both."""
    io = StoreIO(linear_store)
    config = _config(synthetic_spec, epochs=2)
    fit(config, io, tmp_path)
    saved = torch.load(io.checkpoints[-1] / CHECKPOINT_FILE, map_location="cpu", weights_only=False)["model"]
    method = load_trained("linear", config, io.checkpoints[-1])
    fresh = build_method("linear", config)

    loaded = method.trainable_state_dict()
    assert set(loaded) == set(saved) and saved
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert not all(torch.equal(fresh.trainable_state_dict()[k], saved[k]) for k in saved)

    reported = io.reports[-1]
    metrics, _, _ = predict(method, StoreIO(linear_store), "val", batch_size=config["batch_size"])
    assert metrics["loss"] == pytest.approx(reported["val_loss"], rel=1e-6)
    assert metrics["auc"] == pytest.approx(reported["val_auc"], abs=1e-9)
    fresh_metrics, _, _ = predict(fresh, StoreIO(linear_store), "val", batch_size=config["batch_size"])
    assert fresh_metrics["loss"] != pytest.approx(reported["val_loss"], rel=1e-3)


def _predict_as_final_did(method, store, split, batch_size=64):
    """The batch loop ``search/final.py`` had before it called the loop's evaluation: the reference
    :func:`predict` must reproduce exactly."""
    device = torch.device("cpu")
    method.to(device).eval()
    io = StoreIO(store)
    mean, std = backbone_normalisation(method.config.backbone)
    stored = {c.name for c in io.columns}
    images = {k: v for k, v in method.image_inputs().items() if k in stored}
    features = tuple(k for k in method.feature_keys() if k in stored)
    logits, labels = [], []
    with torch.no_grad():
        for arrays in io.batches(split, batch_size, epoch=0, shuffle=False):
            inputs = model_inputs(decode_columns(arrays, io.columns), images, features, mean, std, device, None)
            logits.append(method(inputs).float().cpu().numpy())
            labels.append(arrays[LABEL])
    return np.concatenate(logits), np.concatenate(labels)


def test_predict_returns_the_logits_and_labels_of_the_old_final_batch_loop(synthetic_spec, linear_store, tmp_path):
    io = StoreIO(linear_store)
    config = _config(synthetic_spec, epochs=1)
    fit(config, io, tmp_path)
    method = load_trained("linear", config, io.checkpoints[-1])
    metrics, logits, labels = predict(method, StoreIO(linear_store), "test")
    expected_logits, expected_labels = _predict_as_final_did(method, linear_store, "test")
    assert logits.dtype == expected_logits.dtype == np.float32
    np.testing.assert_array_equal(logits, expected_logits)
    assert labels.dtype == expected_labels.dtype
    np.testing.assert_array_equal(labels, expected_labels)
    assert len(labels) == linear_store.num_rows("test")
    assert {k: v for k, v in metrics.items() if k != "loss"} == classification_metrics(expected_logits, expected_labels, config["task"])


def test_staged_method_switches_stage_and_counts_more_parameters(synthetic_spec, tmp_path):
    config = _config(
        synthetic_spec, method="staged", stage1="linear", stage1_epochs=1, epochs=2, lr=1e-3, batch_size=32
    )
    store = preload(synthetic_spec, build_method("staged", config), tmp_path / "cache").store
    io = StoreIO(store)
    fit(config, io, tmp_path / "ckpt")
    first, second = io.reports
    assert second["learnable_params"] > first["learnable_params"]  # the backbone unfroze at stage 2
    assert math.isfinite(second["val_auc"])
