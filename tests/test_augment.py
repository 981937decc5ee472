"""Training augmentation follows the official FPT recipe; evaluation resizes the larger stored image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsweep.trainables.inputs import CROP_ATTEMPTS, augment, crop_boxes, jitter, model_inputs
from medsweep.trainables.methods import build_method
from medsweep.trainables.methods.base import ImageInput
from medsweep.trainables.preload import store_columns

MEAN = STD = (0.5, 0.5, 0.5)


def test_an_augmented_input_is_stored_at_a_margin_to_crop_from() -> None:
    assert ImageInput(16, augment=True).stored_size == 20  # ceil(16 / 0.8)
    assert ImageInput(128, augment=True).stored_size == 160
    assert ImageInput(64, augment=False).stored_size == 64
    method = build_method("fpt_plus", {"image_size": 64, "num_classes": 3, "side_reduction": 2, "num_prompts": 4})
    columns = {c.name: c.shape for c in store_columns(method, "float16")}
    assert columns["side_pixel_values"] == (3, 20, 20)


def test_crop_boxes_stay_in_the_official_area_and_aspect_ranges() -> None:
    draws = torch.rand(500, CROP_ATTEMPTS, 4, generator=torch.Generator().manual_seed(0))
    boxes = crop_boxes(40, 40, draws)
    for top, left, h, w in boxes:
        assert 0 <= top <= 40 - h and 0 <= left <= 40 - w
        assert 0.8 * 1600 - 2 * 40 <= h * w <= 1600  # area 0.8-1.0, up to rounding of the sides
        assert 0.7 * 0.93 <= w / h <= 1.3 / 0.93
    assert len({(h, w) for _, _, h, w in boxes}) > 20  # aspect ratio and area vary, not only squares
    assert any(w != h for _, _, h, w in boxes)


def test_a_crop_that_never_fits_falls_back_to_the_whole_square() -> None:
    # area 1.0 at ratio 1.3: wider than the image on every attempt
    draws = torch.tensor([[1.0 - 1e-7, 1.0 - 1e-7, 0.5, 0.5]]).expand(1, CROP_ATTEMPTS, 4)
    assert crop_boxes(30, 30, draws) == [(0, 0, 30, 30)]


def test_jitter_is_torchvisions_brightness_and_contrast_in_the_drawn_order() -> None:
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    # factors 1.2 (brightness) and 0.8 (contrast); image 0 contrast first, image 1 brightness first
    draws = torch.tensor([[1.0, 0.0, 0.2], [1.0, 0.0, 0.7]])

    def brightness(x: torch.Tensor) -> torch.Tensor:
        return (x * 1.2).clamp(0, 1)

    def contrast(x: torch.Tensor) -> torch.Tensor:
        grey = 0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2]
        return (0.8 * x + 0.2 * grey.mean()).clamp(0, 1)

    out = jitter(images, draws)
    assert torch.allclose(out[0], brightness(contrast(images[0])), atol=1e-6)
    assert torch.allclose(out[1], contrast(brightness(images[1])), atol=1e-6)
    assert torch.allclose(jitter(images, torch.tensor([[0.5, 0.5, 0.0]] * 2)), images, atol=1e-6)  # factors 1


def test_augment_is_deterministic_per_generator_and_gives_the_training_size() -> None:
    images = torch.rand(4, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    first = augment(images, 16, torch.Generator().manual_seed(3))
    assert first.shape == (4, 3, 16, 16)
    assert torch.equal(first, augment(images, 16, torch.Generator().manual_seed(3)))
    assert not torch.allclose(first, augment(images, 16, torch.Generator().manual_seed(4)))
    assert first.min() >= 0 and first.max() <= 1


def test_a_flat_image_keeps_its_content_through_flip_and_crop() -> None:
    """Crop and flip move pixels without inventing any: a constant image stays constant (up to jitter)."""
    images = torch.full((3, 3, 20, 20), 0.5)
    out = augment(images, 16, torch.Generator().manual_seed(0))
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out), atol=1e-6)
    assert (out[:, 0, 0, 0] - 0.5).abs().max() <= 0.1 + 1e-6  # brightness 0.8-1.2 of 0.5, contrast leaves it


def test_model_inputs_resize_for_evaluation_and_augment_for_training() -> None:
    spec = {"side_pixel_values": ImageInput(16, augment=True)}
    stored = np.random.default_rng(0).integers(0, 256, (2, 3, 20, 20), dtype=np.uint8)
    arrays = {"side_pixel_values": stored}
    evaluated = model_inputs(arrays, spec, (), MEAN, STD, torch.device("cpu"), None)["side_pixel_values"]
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(stored).float() / 255, size=(16, 16), mode="bilinear", align_corners=False, antialias=True
    )
    assert torch.allclose(evaluated, (expected - 0.5) / 0.5, atol=1e-6)
    trained = model_inputs(arrays, spec, (), MEAN, STD, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert trained["side_pixel_values"].shape == (2, 3, 16, 16)
    assert not torch.allclose(trained["side_pixel_values"], evaluated, atol=1e-3)


@pytest.mark.parametrize("size", [16, 128])
def test_the_margin_keeps_the_smallest_crop_near_the_training_size(size: int) -> None:
    """The smallest crop side (area 0.8, ratio 1.3) of the stored image is still about the training size."""
    stored = ImageInput(size, augment=True).stored_size
    assert math.sqrt(0.8 / 1.3) * stored >= 0.97 * size
