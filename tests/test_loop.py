"""The training loop over a real preload store, without Ray: learning, resume, divergence, stages."""

from __future__ import annotations

import math

import pytest

from medsweep.trainables.loop import fit, load_trained
from medsweep.trainables.methods import build_method
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
    for mine, reference in zip(resumed.reports, straight.reports[2:]):
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
    io = StoreIO(linear_store)
    config = _config(synthetic_spec, epochs=2)
    fit(config, io, tmp_path)
    method = load_trained("linear", config, io.checkpoints[-1]).eval()
    fresh = build_method("linear", config)
    assert not all(
        (a == b).all() for a, b in zip(method.head.parameters(), fresh.head.parameters())
    ), "checkpoint weights should differ from a fresh head"


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
