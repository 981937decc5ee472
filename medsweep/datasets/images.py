"""Read medical images as they really come, and give back 8-bit RGB.

Medical archives mix formats a plain ``Image.open(p).convert("RGB")`` gets
wrong: 12/16-bit X-rays in PNG or TIFF (PIL's ``convert`` clips them to 255,
so a 0..4095 image turns almost all white), CMYK JPEGs from scanners,
palette and RGBA dermoscopy crops, multi-page TIFFs, and DICOM with rescale
slope/intercept and inverted (MONOCHROME1) grey levels. :func:`load_image`
turns all of these into the same thing, an RGB ``PIL.Image``, so that every
method and the preload see identical pixels for a given file.

Rules, chosen to be predictable rather than clever:

* 8-bit data is kept as is (no contrast stretch).
* Anything wider (16-bit, 32-bit int, float) is min-max scaled over the image's
  own value range to 0..255 (its minimum becomes 0, its maximum 255), the usual
  treatment of X-ray data whose true bit depth (10, 12, 14 bits) is rarely the
  container's 16. A constant image becomes black.
* Alpha is composited onto black (colour x alpha): outside-the-field-of-view
  pixels in fundus and dermoscopy images are black, so transparent areas read
  as "no tissue" instead of as whatever colour the hidden RGB holds.
* Multi-page TIFF and multi-frame DICOM: the first page/frame. 16-bit colour
  TIFFs are read with tifffile (Pillow would keep only the high byte); a
  16-bit colour PNG keeps Pillow's high byte (65535 -> 255), as colour PNGs
  use their full range.
* DICOM: rescale slope/intercept applied, MONOCHROME1 inverted (so bone is
  bright as in MONOCHROME2), then the wide-data rule above. No VOI windowing:
  min-max over the whole range is what the reference pipelines feed models.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from medsweep.errors import DatasetError

_TIFF_SUFFIXES = (".tif", ".tiff")
_DICOM_MAGIC_OFFSET = 128
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, Image.DecompressionBombError)


def load_image(path: Path) -> Image.Image:
    """Read one image file of any supported format as an 8-bit RGB image.

    Raises :class:`DatasetError` naming the file when it cannot be decoded, so
    one corrupt file in a 100k-image set stops with a message, not a traceback
    from deep inside a preload worker.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".dcm":
        return _load_dicom(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, inside our error handling
            if suffix in _TIFF_SUFFIXES and _pil_drops_low_bits(img):
                return _load_tiff_with_tifffile(path)
            return _pil_to_rgb(img)
    except (*_READ_ERRORS, UnidentifiedImageError) as error:
        if _has_dicom_magic(path):
            return _load_dicom(path)
        if suffix in _TIFF_SUFFIXES:
            return _load_tiff_with_tifffile(path)
        raise _unreadable(path, error) from error


def resize_square(img: Image.Image, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` (aspect ratio not kept) as a uint8 [size, size, 3] array.

    A plain square resize, as the FPT code does: medical images are usually
    already framed (fundus disc, cropped lesion, whole chest), and padding or
    cropping would change what the frozen model sees relative to the published
    setup. Bicubic with Pillow's area-aware (antialiased) kernel on downscale,
    so fine structure at 2048 px does not alias at 224 px.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).copy()


def check_image_headers(paths: Iterable[Path]) -> None:
    """Fail on the first file that is not an image at all, reading headers only (no pixels).

    A sweep runs this over every image before Ray starts, so a stray text file
    or a zero-byte download is one line in a second, not a preload failure
    minutes later. A file whose header is fine but whose pixels are truncated
    is still found by the preload. DICOM and TIFF files Pillow does not
    identify are left to :func:`load_image`, which reads them another way.
    """
    for path in paths:
        path = Path(path)
        if path.suffix.lower() in (".dcm", *_TIFF_SUFFIXES):
            continue
        try:
            with Image.open(path):
                pass
        except (*_READ_ERRORS, UnidentifiedImageError) as error:
            if not _has_dicom_magic(path):
                raise _unreadable(path, error) from error


def _unreadable(path: Path, error: BaseException) -> DatasetError:
    reason = str(error).strip() or type(error).__name__
    return DatasetError(f"cannot read image {path}: {reason}; fix or remove it, or pass --skip-bad-images")


def _has_dicom_magic(path: Path) -> bool:
    """True for DICOM Part 10 files, which may come without a .dcm suffix (checked only after Pillow fails)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(_DICOM_MAGIC_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _pil_drops_low_bits(img: Image.Image) -> bool:
    """Pillow decodes 16-bit colour TIFFs to 8 bits by keeping the high byte.

    That darkens 12-bit data stored in 16 bits to 1/16 of its range, so such
    files go to tifffile and the wide-data rule instead.
    """
    bits = img.tag_v2.get(258, (8,)) if hasattr(img, "tag_v2") else (8,)
    bits = bits if isinstance(bits, tuple) else (bits,)
    return img.mode in ("RGB", "RGBA") and max(bits) > 8


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB following the module's rules."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode == "L":
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        return _composite_on_black(np.asarray(img.convert("RGBA")))
    if mode.startswith("I") or mode == "F":
        return _array_to_rgb(np.asarray(img))
    # CMYK (Pillow undoes Adobe's inverted CMYK), palette, 1-bit, YCbCr, LAB, HSV
    return img.convert("RGB")


def _load_tiff_with_tifffile(path: Path) -> Image.Image:
    """TIFFs Pillow cannot decode (tiles, odd compressions) or would reduce (16-bit colour)."""
    try:
        array = tifffile.imread(path, key=0)
    except Exception as error:  # tifffile raises many types for bad files
        raise _unreadable(path, error) from error
    return _array_to_rgb(_channels_last(array, path))


def _channels_last(array: np.ndarray, path: Path) -> np.ndarray:
    """Bring planar (C, H, W) data to (H, W, C); reject stacks we cannot interpret."""
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 2, 3, 4)):
        return array
    raise _unreadable(path, ValueError(f"unsupported pixel array shape {array.shape}"))


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    """(H, W) or (H, W, C) array of any numeric dtype to an RGB image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] in (2, 4):
        alpha = array[..., -1].astype(np.float32) / _full_scale(array.dtype)
        colour = _to_uint8(array[..., :-1]).astype(np.float32)
        if colour.shape[-1] == 1:
            colour = np.repeat(colour, 3, axis=-1)
        rgba = np.concatenate([colour, np.clip(alpha, 0, 1)[..., None] * 255], axis=-1)
        return _composite_on_black(rgba)
    grey_or_rgb = _to_uint8(array)
    if grey_or_rgb.ndim == 2:
        grey_or_rgb = np.repeat(grey_or_rgb[..., None], 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(grey_or_rgb))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """8-bit data unchanged; anything else min-max scaled to 0..255 over its own range."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float64)
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if not high > low:
        return np.zeros(array.shape, dtype=np.uint8)
    scaled = (np.nan_to_num(values, nan=low) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _full_scale(dtype: np.dtype) -> float:
    """The value that means 'opaque' for an alpha channel of this dtype."""
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def _composite_on_black(rgba: np.ndarray) -> Image.Image:
    rgba = rgba.astype(np.float32)
    rgb = rgba[..., :3] * (rgba[..., 3:4] / 255.0)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def _load_dicom(path: Path) -> Image.Image:
    try:
        import pydicom
    except ImportError as error:
        raise DatasetError(
            f"cannot read DICOM image {path}: pydicom is not installed; pip install medsweep[dicom]"
        ) from error
    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
    except Exception as error:  # pydicom raises many types (missing pixel data, no decoder plugin)
        raise _unreadable(path, error) from error
    return dicom_pixels_to_rgb(pixels, dataset)


def dicom_pixels_to_rgb(pixels: np.ndarray, dataset: Any) -> Image.Image:
    """Apply a DICOM dataset's grey-level semantics to its pixel array, to RGB.

    Separate from file reading so the conversion is testable without pydicom:
    ``dataset`` only needs the attributes read below (``getattr`` defaults
    follow the DICOM standard when an element is absent).
    """
    samples = int(getattr(dataset, "SamplesPerPixel", 1))
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[0]
    if samples > 1:
        return _array_to_rgb(pixels)  # pydicom hands colour data over as RGB
    values = pixels.astype(np.float64) * float(getattr(dataset, "RescaleSlope", 1.0)) + float(
        getattr(dataset, "RescaleIntercept", 0.0)
    )
    if str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        values = values.max() + values.min() - values
    return _array_to_rgb(values)
