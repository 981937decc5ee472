"""Mixed precision of trials (``--precision``) and gradient accumulation (``accumulate_steps``).

bf16 runs on CPU here, so every method's bf16 path is tested everywhere; the
fp16 path (autocast with a loss scaler) needs CUDA and is marked ``gpu``.
"""

from __future__ import annotations

import math

import pytest
import torch

from medsweep.errors import ConfigError
from medsweep.search.settings import SweepSettings, fixed_config, resolve_trial_precision
from medsweep.trainables.config import TrainConfig
from medsweep.trainables.loop import CHECKPOINT_FILE, fit, precise_loss
from medsweep.trainables.methods import build_method, list_methods
from medsweep.trainables.precision import autocast, grad_scaler, resolve_precision
from medsweep.trainables.preload import preload
from medsweep.trainables.store_io import StoreIO

CPU = torch.device("cpu")
TINY = {"backbone": "vit-tiny", "image_size": 64, "num_classes": 3}
TINY_OVERRIDES = {"truncated": {"backbone": "resnet-tiny-test"}}
STEPS = 3
BATCH = 4
# bf16 keeps 8 bits of mantissa: after STEPS AdamW steps at lr 1e-3 the fp32-evaluated loss of the bf16-trained
# model stays within this of the fp32-trained one's (measured: at most 0.012, truncated on the ResNet).
BF16_LOSS_TOLERANCE = 0.05
# CDTM trains on preloaded features alone: no augmentation draws and no batch statistics (the linear probe's
# BatchNorm has them), so a micro-batch sees what its rows of the whole batch see.
CDTM = {"method": "cdtm", "backbone": "vit-tiny", "image_size": 64, "num_centers": 8, "lr": 1e-3, "epochs": 1, "seed": 0}


# -- resolving --precision -----------------------------------------------------------


def test_auto_is_fp32_on_cpu_and_a_named_precision_stays() -> None:
    assert resolve_precision("auto", "cpu") == "fp32"
    assert [resolve_precision(name, "cpu") for name in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ConfigError, match="--precision"):
        resolve_precision("fp8", "cpu")


def test_trials_resolve_auto_like_the_frozen_pass_on_gpus_and_to_fp32_on_cpus() -> None:
    assert resolve_trial_precision("auto", "bf16", None) == "bf16"  # auto GPU fractions on a GPU cluster
    assert resolve_trial_precision("auto", "bf16", 0.0) == "fp32"  # --gpus-per-trial 0: CPU trials
    assert resolve_trial_precision("auto", "fp32", None) == "fp32"  # a CPU-only cluster
    assert resolve_trial_precision("fp16", "fp16", 0.0) == "fp16"  # named: as asked


def test_the_sweep_sets_every_trials_precision_and_refuses_set_precision(synthetic_spec, tmp_path) -> None:
    settings = SweepSettings(methods=["linear"], out=tmp_path / "out", precision="bf16", trial_precision="bf16")
    assert fixed_config(settings, synthetic_spec, "linear")["precision"] == "bf16"
    with pytest.raises(ConfigError, match="use --precision"):
        SweepSettings(methods=["linear"], out=tmp_path / "out", fixed={"precision": "bf16"})


def test_accumulation_must_divide_the_batch() -> None:
    assert TrainConfig(batch_size=16, accumulate_steps=4).micro_batch_size(2) == 2
    with pytest.raises(ConfigError, match="batch_size 10 is not divisible by accumulate_steps 4"):
        TrainConfig(batch_size=10, accumulate_steps=4)
    with pytest.raises(ConfigError, match="multiple of 8"):
        TrainConfig(batch_size=12, accumulate_steps=4).micro_batch_size(2)


# -- bf16 on CPU trains every method --------------------------------------------------


def _train(name: str, precision: str) -> tuple[float, torch.dtype]:
    """The fp32 loss of the tiny method after STEPS AdamW steps at ``precision``, and its logits' dtype under autocast."""
    torch.manual_seed(0)
    method = build_method(name, {**TINY, **TINY_OVERRIDES.get(name, {})})
    generator = torch.Generator().manual_seed(1)
    batch = {key: torch.randn(BATCH, 3, spec.size, spec.size, generator=generator) for key, spec in method.stored_inputs(preloaded=False).items()}
    labels = torch.arange(BATCH) % 3
    optimizer = torch.optim.AdamW(method.param_groups(weight_decay=0.1), lr=1e-3)
    method.train()
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        precise_loss(method, batch, labels, "multiclass", precision).backward()
        optimizer.step()
    method.eval()
    with torch.no_grad(), autocast(precision, CPU):
        dtype = method(batch).dtype
    with torch.no_grad():
        return precise_loss(method, batch, labels, "multiclass", "fp32").item(), dtype


@pytest.mark.parametrize("name", list_methods())
def test_bf16_on_cpu_trains_every_method_within_tolerance_of_fp32(name: str) -> None:
    fp32, fp32_dtype = _train(name, "fp32")
    bf16, bf16_dtype = _train(name, "bf16")
    assert (fp32_dtype, bf16_dtype) == (torch.float32, torch.bfloat16)  # the bf16 run really ran in bf16
    assert math.isfinite(bf16)
    assert abs(bf16 - fp32) <= BF16_LOSS_TOLERANCE, (fp32, bf16)


# -- the loop: accumulation and precision over a real store ----------------------------


@pytest.fixture(scope="module")
def cdtm_store(synthetic_spec, tmp_path_factory):
    config = {**CDTM, "num_classes": synthetic_spec.num_classes}
    return preload(synthetic_spec, build_method("cdtm", config), tmp_path_factory.mktemp("cache")).store


def _fit(spec, store, folder, **overrides) -> tuple[dict, dict]:
    """The last report and the last checkpoint of CDTM trained over ``store``."""
    io = StoreIO(store)
    fit({**CDTM, "num_classes": spec.num_classes, "task": spec.task, **overrides}, io, folder)
    return io.reports[-1], torch.load(io.checkpoints[-1] / CHECKPOINT_FILE, weights_only=False)


def test_accumulated_micro_batches_give_the_update_of_the_whole_batch(synthetic_spec, cdtm_store, tmp_path) -> None:
    # 90 training images: batches of 16 end with one of 10, micro-batches of 4 with one of 2 in a partial group.
    whole_report, whole = _fit(synthetic_spec, cdtm_store, tmp_path / "whole", batch_size=16, warmup_epochs=0.5, grad_clip=1.0)
    accum_report, accum = _fit(synthetic_spec, cdtm_store, tmp_path / "accum", batch_size=16, accumulate_steps=4, warmup_epochs=0.5, grad_clip=1.0)
    assert whole["scheduler"]["last_epoch"] == accum["scheduler"]["last_epoch"] == 6  # the schedule counts optimizer steps
    for key, value in whole["model"].items():
        torch.testing.assert_close(accum["model"][key], value, rtol=1e-4, atol=1e-5)
    assert accum_report["val_auc"] == pytest.approx(whole_report["val_auc"], abs=1e-3)
    assert accum_report["peak_mem_mb"] < whole_report["peak_mem_mb"]  # measured at the micro-batch


def test_a_bf16_trial_on_cpu_lands_near_fp32(synthetic_spec, cdtm_store, tmp_path) -> None:
    fp32, _ = _fit(synthetic_spec, cdtm_store, tmp_path / "fp32", batch_size=16, epochs=2)
    bf16, _ = _fit(synthetic_spec, cdtm_store, tmp_path / "bf16", batch_size=16, epochs=2, precision="bf16")
    assert bf16["train_loss"] == pytest.approx(fp32["train_loss"], abs=0.05)
    assert bf16["val_loss"] == pytest.approx(fp32["val_loss"], abs=0.05)


def test_the_scaler_is_on_only_for_fp16_on_cuda() -> None:
    assert not grad_scaler("fp16", CPU).is_enabled()
    assert not grad_scaler("bf16", torch.device("cuda")).is_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_trial_on_cuda_scales_its_loss_and_lands_near_fp32(synthetic_spec, cdtm_store, tmp_path) -> None:
    fp32, _ = _fit(synthetic_spec, cdtm_store, tmp_path / "fp32", batch_size=16, epochs=2)
    fp16, blob = _fit(synthetic_spec, cdtm_store, tmp_path / "fp16", batch_size=16, epochs=2, precision="fp16")
    assert blob["scaler"]["scale"] > 1  # the scaler ran and its state is in the checkpoint
    assert fp16["train_loss"] == pytest.approx(fp32["train_loss"], abs=0.05)
    assert fp16["val_loss"] == pytest.approx(fp32["val_loss"], abs=0.05)
