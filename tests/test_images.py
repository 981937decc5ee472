"""load_image / resize_square on the formats medical images really come in (tiny files written here)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from PIL import Image

from medsweep.datasets import load_image, resize_square
from medsweep.datasets.images import dicom_pixels_to_rgb
from medsweep.errors import DatasetError


def _ramp16(low: int, high: int) -> np.ndarray:
    return np.linspace(low, high, 64).reshape(8, 8).round().astype(np.uint16)


def test_8bit_grey_png_is_kept_as_is(tmp_path: Path) -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    Image.fromarray(grey).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.mode == "RGB"
    assert np.array_equal(np.asarray(img)[..., 1], grey)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grey_is_scaled_over_its_range_not_clipped(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"xray{suffix}"
    Image.fromarray(_ramp16(0, 4095)).save(path)
    assert Image.open(path).mode.startswith("I")  # really 16-bit on disk
    pixels = np.asarray(load_image(path))
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 8, 3)
    assert pixels.max() == 255 and pixels.min() == 0
    assert (pixels == 255).sum() == 3  # only the maximum, not everything above 255 (clipping)
    assert 120 <= pixels[..., 0].ravel()[32] <= 135  # middle of the ramp stays mid-grey


def test_16bit_offset_range_maps_min_to_zero(tmp_path: Path) -> None:
    Image.fromarray(_ramp16(1000, 3000)).save(tmp_path / "x.png")
    pixels = np.asarray(load_image(tmp_path / "x.png"))
    assert pixels.min() == 0 and pixels.max() == 255


def test_constant_16bit_image_is_black(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 700, np.uint16)).save(tmp_path / "flat.png")
    assert np.asarray(load_image(tmp_path / "flat.png")).max() == 0


def test_rgba_is_composited_onto_black(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = [[255, 0], [128, 255]]
    Image.fromarray(rgba).save(tmp_path / "a.png")
    pixels = np.asarray(load_image(tmp_path / "a.png")).astype(int)
    assert pixels[0, 0].tolist() == [200, 100, 50]
    assert pixels[0, 1].tolist() == [0, 0, 0]
    assert np.abs(pixels[1, 0] - np.array([100, 50, 25])).max() <= 1


def test_palette_with_transparency_and_grey_alpha(tmp_path: Path) -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putdata([0, 1])
    palette.save(tmp_path / "p.png", transparency=1)
    assert np.asarray(load_image(tmp_path / "p.png")).tolist() == [[[255, 0, 0], [0, 0, 0]]]
    Image.new("LA", (1, 1), (90, 255)).save(tmp_path / "la.png")
    assert np.asarray(load_image(tmp_path / "la.png")).tolist() == [[[90, 90, 90]]]


def test_cmyk_jpeg_converts_to_the_right_colour(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "red.jpg", quality=95)
    assert Image.open(tmp_path / "red.jpg").mode == "CMYK"
    r, g, b = np.asarray(load_image(tmp_path / "red.jpg")).reshape(-1, 3).mean(0)
    assert r > 230 and g < 30 and b < 30


def test_16bit_rgb_tiff_goes_through_tifffile(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), np.uint16)
    rgb[..., 0] = 60000  # red channel at the top of the range
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb, photometric="rgb")
    pixels = np.asarray(load_image(tmp_path / "rgb16.tif"))
    assert pixels[0, 0].tolist() == [255, 0, 0]


def test_planar_tiff_is_channels_last(tmp_path: Path) -> None:
    planar = np.zeros((3, 4, 5), np.uint16)
    planar[2] = 1000  # blue plane
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    pixels = np.asarray(load_image(tmp_path / "planar.tif"))
    assert pixels.shape == (4, 5, 3) and pixels[0, 0].tolist() == [0, 0, 255]


def test_multipage_tiff_reads_the_first_page(tmp_path: Path) -> None:
    with tifffile.TiffWriter(tmp_path / "stack.tif") as tiff:
        tiff.write(_ramp16(0, 4095))
        tiff.write(_ramp16(4095, 0))
    assert len(tifffile.TiffFile(tmp_path / "stack.tif").pages) == 2
    grey = np.asarray(load_image(tmp_path / "stack.tif"))[..., 0]
    assert grey[0, 0] == 0 and grey[-1, -1] == 255  # the ascending first page


def test_float_tiff_is_scaled(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "f.tif", np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4))
    pixels = np.asarray(load_image(tmp_path / "f.tif"))
    assert pixels.min() == 0 and pixels.max() == 255


@pytest.mark.parametrize("name", ["truncated.png", "garbage.png", "empty.jpg", "garbage.tif"])
def test_unreadable_file_raises_dataset_error_naming_it(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "truncated.png":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:300])
    elif name.startswith("garbage"):
        path.write_bytes(b"this is not an image at all" * 10)
    else:
        path.write_bytes(b"")
    with pytest.raises(DatasetError, match="cannot read image .*" + name + ".*--skip-bad-images"):
        load_image(path)


def test_dicom_without_pydicom_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import fails as if not installed
    (tmp_path / "a.dcm").write_bytes(b"\0" * 132)
    with pytest.raises(DatasetError, match=r"a\.dcm.*pip install medsweep\[dicom\]"):
        load_image(tmp_path / "a.dcm")


def test_dicom_rescale_and_monochrome1_inversion() -> None:
    pixels = np.array([[0, 100], [200, 300]], np.uint16)
    mono2 = np.asarray(dicom_pixels_to_rgb(pixels, SimpleNamespace(RescaleSlope=2, RescaleIntercept=-1024)))
    assert mono2[..., 0].tolist() == [[0, 85], [170, 255]]
    mono1 = np.asarray(dicom_pixels_to_rgb(pixels, SimpleNamespace(PhotometricInterpretation="MONOCHROME1")))
    assert mono1[..., 0].tolist() == [[255, 170], [85, 0]]
    frames = np.stack([pixels, pixels[::-1]])
    first = np.asarray(dicom_pixels_to_rgb(frames, SimpleNamespace(NumberOfFrames=2)))
    assert first[..., 0].tolist() == [[0, 85], [170, 255]]


def test_real_dicom_file_round_trip(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 2, 2, 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = np.array([[0, 1000], [2000, 4095]], np.uint16).tobytes()
    pydicom.dcmwrite(tmp_path / "x.dcm", ds, enforce_file_format=True)
    (tmp_path / "no_suffix").write_bytes((tmp_path / "x.dcm").read_bytes())  # recognised by its DICM magic
    for path in (tmp_path / "x.dcm", tmp_path / "no_suffix"):
        grey = np.asarray(load_image(path))[..., 0]
        assert grey[0, 0] == 255 and grey[1, 1] == 0  # MONOCHROME1: low values are bright


def test_resize_square_shape_and_antialiasing() -> None:
    checker = (np.indices((64, 96)).sum(0) % 2 * 255).astype(np.uint8)
    out = resize_square(Image.fromarray(checker), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - 128).max() <= 8  # averaged, not aliased to black/white
    rgb = Image.new("RGB", (10, 10), (1, 2, 3))
    assert resize_square(rgb, 10)[0, 0].tolist() == [1, 2, 3]
