"""Shared test setup: one torch thread (2-core CI), one Ray instance per session, tiny fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Tiny models run 5-10x faster with one thread on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs ~5 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20)
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic ImageFolder shared by the end-to-end tests (64 px, 3 grades)."""
    from medsweep.datasets import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synthetic"), seed=0, image_size=64, n_train=90, n_val=45, n_test=30)


@pytest.fixture(scope="session")
def synthetic_spec(synthetic_root):
    from medsweep.datasets import load_imagefolder

    return load_imagefolder(synthetic_root, name="synthetic")


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """One preload cache for the sweeps over ``synthetic_root`` that need a store, not a fresh one: each store
    (method x backbone x size) is built once per session, where each sweep's own cache paid the Ray Data frozen
    pass (~12 s of actor start-up on 2 cores) again. Tests about building stores (and ``tiny_sweep``, whose console
    must show its stores written) keep caches of their own."""
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, ray_session, synthetic_root):
    """One real sweep (FPT+ and linear on vit-tiny, 4 trials x 4 epochs, W&B offline), shared by tests.

    Returns (output folder, settings, console text).
    """
    from medsweep.search.console import SweepConsole
    from medsweep.search.settings import SweepSettings
    from medsweep.search.sweep import run_sweep

    out = tmp_path_factory.mktemp("sweep")
    settings = SweepSettings(
        dataset=str(synthetic_root),
        methods=["fpt_plus", "linear"],
        trials=4,
        # At this scale the published learning rates (1e-4 linear, 5e-4 FPT+, for 20-100 epochs on
        # thousands of images) barely move the tiny heads in a few steps, and such trials predict one
        # class for every validation image (collapsed, never selected). lr=0.01 without warm-up makes
        # the linear probe learn the grades within two epochs; FPT+ on the random-weight vit-tiny
        # may still collapse, which the tests allow.
        max_epochs=4,
        grace_period=2,
        backbone="vit-tiny",
        image_size=64,
        wandb="offline",
        out=out,
        cache_dir=tmp_path_factory.mktemp("cache"),  # its own: the console it records shows the stores written
        fixed={"side_reduction": 2, "lr": 0.01, "warmup_epochs": 0},
        final_seeds=0,
    )
    console = SweepConsole(record=True)
    run_sweep(settings, console)
    return out, settings, console.text()
