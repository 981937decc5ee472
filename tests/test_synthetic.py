"""The built-in synthetic set: layout, determinism, idempotent atomic writes, scale, learnability."""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from medsweep.datasets import load_imagefolder, make_synthetic, synthetic
from medsweep.datasets.synthetic import MANIFEST, lesion_ranges
from medsweep.errors import DatasetError

SMALL = dict(n_train=6, n_val=3, n_test=3)


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The default set (600 images at 64 px) and how long it took to write."""
    root = tmp_path_factory.mktemp("synthetic") / "set"
    start = time.perf_counter()
    make_synthetic(root)
    return root, time.perf_counter() - start


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def _pixels(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    files = sorted(root.glob(f"{split}/*/*.png"))
    images = np.stack([np.asarray(Image.open(f)) for f in files]).astype(np.float32) / 255
    return images, np.array([int(f.parent.name.removeprefix("grade")) for f in files])


def _dark_red_count(images: np.ndarray) -> np.ndarray:
    """Pixels whose green is far below their red: lesions, not the orange disc or its edge."""
    red, green = images[..., 0], images[..., 1]
    return ((red > 0.08) & (green < 0.35 * red)).sum(axis=(1, 2))[:, None].astype(float)


def _val_auc(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> float:
    scaler = StandardScaler().fit(train_x)
    model = LogisticRegression(max_iter=2000).fit(scaler.transform(train_x), train_y)
    return roc_auc_score(val_y, model.predict_proba(scaler.transform(val_x)), multi_class="ovr", average="macro")


def test_default_set_layout_balance_and_speed(default_set: tuple[Path, float]) -> None:
    root, seconds = default_set
    assert seconds < 5.0, f"600 images at 64 px took {seconds:.1f} s"
    spec = load_imagefolder(root, name="synthetic")
    assert spec.classes == ["grade0", "grade1", "grade2"]
    for split, n in (("train", 360), ("val", 120), ("test", 120)):
        counts = np.bincount([s.label for s in spec.splits[split]], minlength=3)
        assert counts.tolist() == [n // 3] * 3
    stems = [s.path.stem for split in spec.splits.values() for s in split]
    assert len(set(stems)) == 600  # unique across splits
    assert Image.open(spec.splits["val"][0].path).size == (64, 64)
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["seed"] == 0 and manifest["image_size"] == 64 and len(manifest["files"]) == 600
    assert manifest["classes"] == spec.classes


def test_lesion_ranges_are_close_but_disjoint() -> None:
    assert lesion_ranges(3) == [(0, 1), (3, 5), (7, 10)]
    ranges = lesion_ranges(5)
    assert all(high + 1 < next_low for (_, high), (next_low, _) in itertools.pairwise(ranges))


def test_learnable_from_lesions_but_not_trivial_from_raw_pixels(default_set: tuple[Path, float]) -> None:
    root, _ = default_set
    train_x, train_y = _pixels(root, "train")
    val_x, val_y = _pixels(root, "val")
    lesion_auc = _val_auc(_dark_red_count(train_x), train_y, _dark_red_count(val_x), val_y)
    assert lesion_auc >= 0.95  # measured 0.996

    def thumbnails(images: np.ndarray) -> np.ndarray:
        small = [Image.fromarray((x * 255).astype(np.uint8)).resize((16, 16), Image.BILINEAR) for x in images]
        return np.stack([np.asarray(s) for s in small]).reshape(len(images), -1) / 255.0

    pixel_auc = _val_auc(thumbnails(train_x), train_y, thumbnails(val_x), val_y)
    assert 0.75 <= pixel_auc < 0.97  # measured 0.90: learnable, not trivially perfect


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    make_synthetic(tmp_path / "a", seed=3, **SMALL)
    make_synthetic(tmp_path / "b", seed=3, **SMALL)
    make_synthetic(tmp_path / "c", seed=4, **SMALL)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    assert _hashes(tmp_path / "a") != _hashes(tmp_path / "c")


def test_complete_set_is_reused_untouched(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "s", **SMALL)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert make_synthetic(tmp_path / "s", **SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes


def test_partial_or_mismatched_set_is_replaced_atomically(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "s", **SMALL)
    victim = next(root.rglob("*.png"))
    victim.unlink()
    make_synthetic(root, **SMALL)
    assert victim.is_file()
    make_synthetic(root, seed=9, **SMALL)
    assert json.loads((root / MANIFEST).read_text())["seed"] == 9
    assert len(list(root.rglob("*.png"))) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no staging or retired folders left


def test_interrupted_generation_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_synthetic(tmp_path / "s", **SMALL)
    before = _hashes(root)
    real_render = synthetic.render_image

    def failing_render(params: synthetic.SyntheticParams, split: str, index: int) -> tuple[np.ndarray, int]:
        if index == 2:
            raise KeyboardInterrupt
        return real_render(params, split, index)

    monkeypatch.setattr(synthetic, "render_image", failing_render)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(root, seed=5, **SMALL)  # a different set, interrupted half-way
    assert _hashes(root) == before  # the old complete set is still whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_foreign_folder_is_never_deleted(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match=r"mine.*not a medsweep synthetic set"):
        make_synthetic(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_512px_is_the_same_scene_redrawn(tmp_path: Path) -> None:
    small = make_synthetic(tmp_path / "64", n_train=3, n_val=3, n_test=3)
    large = make_synthetic(tmp_path / "512", image_size=512, n_train=3, n_val=3, n_test=3)
    for path in sorted(small.glob("train/*/*.png")):
        big = Image.open(large / path.relative_to(small))
        assert big.size == (512, 512)
        # at 32 px the per-pixel noise averages out on both sides, the scene remains
        both = [np.asarray(im.resize((32, 32), Image.BOX))[None] / 255.0 for im in (Image.open(path), big)]
        assert np.abs(both[0] - both[1]).mean() < 0.03
        lesion_pixels = [_dark_red_count(x)[0, 0] for x in both]
        assert lesion_pixels[1] == pytest.approx(lesion_pixels[0], rel=0.3, abs=3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "num_classes must be 2 to"),
        ({"num_classes": 9}, "num_classes must be 2 to"),
        ({"n_val": 2}, "n_val=2 is below num_classes=3"),
        ({"image_size": 8}, "at least 16 px"),
    ],
)
def test_bad_parameters_are_rejected(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        make_synthetic(tmp_path / "s", **{**SMALL, **kwargs})
