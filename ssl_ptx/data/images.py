"""Read any chest X-ray file as an 8-bit grey image, and resize images and masks.

:func:`read_image` is the one entry point the cache and the datasets use: DICOM (through
:mod:`ssl_ptx.data.dicom`), PNG, JPEG and the other formats Pillow reads. Rules:

* colour → grey with Pillow's ITU-R 601 luma (``L = 0.299 R + 0.587 G + 0.114 B``); an alpha
  channel is dropped, never composited; palette images go through their palette;
* 16-bit (and 32-bit / float) images are stretched min–max over the image's actual range to
  0..255 (not ``>> 8``: 12-bit data stored in 16-bit PNGs would come out nearly black); a
  constant image becomes all zeros;
* Pillow is used rather than OpenCV because it refuses truncated files, where OpenCV returns a
  half-grey image with only a warning.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from ssl_ptx.data.dicom import DicomError, read_dicom, stretch_to_uint8

__all__ = ["ImageReadError", "read_image", "resize_image", "resize_mask"]

_DICOM_SUFFIXES = (".dcm", ".dicom")
_RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_DICOM_MAGIC_OFFSET = 128


class ImageReadError(ValueError):
    """An image file could not be read; the message names the file and the problem."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as a grey 8-bit array.

    A file is read as DICOM when its suffix is ``.dcm`` / ``.dicom``, or when it has no known
    raster suffix and carries the ``DICM`` marker at byte 128.

    Args:
        path: a DICOM, PNG, JPEG (or other Pillow-readable) file.

    Returns:
        ``uint8`` H×W, bright = dense.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageReadError: the file is empty, truncated, or cannot be decoded.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: the file is empty (0 bytes)")
    if _is_dicom(path):
        try:
            image, _ = read_dicom(path)
        except DicomError as exc:
            raise ImageReadError(str(exc)) from exc
        return image
    return _read_raster(path)


def _is_dicom(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in _DICOM_SUFFIXES:
        return True
    if suffix in _RASTER_SUFFIXES:
        return False
    with path.open("rb") as file:
        file.seek(_DICOM_MAGIC_OFFSET)
        return file.read(4) == b"DICM"


def _read_raster(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            return _to_grey_uint8(image)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # Pillow reports truncated or corrupt data as OSError / SyntaxError / ValueError.
        raise ImageReadError(f"{path}: cannot decode the image ({exc})") from exc


def _to_grey_uint8(image: Image.Image) -> np.ndarray:
    if image.mode == "L":
        return np.array(image)
    if image.mode.startswith(("I", "F")):
        return stretch_to_uint8(np.array(image))
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    return np.array(image.convert("L"))


def _target_shape(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, (int, np.integer)) else size
    if int(height) <= 0 or int(width) <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return int(height), int(width)


def _interpolation(source: tuple[int, int], target: tuple[int, int]) -> int:
    """INTER_AREA when no side grows (anti-aliased shrink), INTER_LINEAR otherwise."""
    shrinking = target[0] <= source[0] and target[1] <= source[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an image with OpenCV.

    Args:
        image: H×W (or H×W×C) array of a dtype OpenCV resizes (uint8, uint16, float32, ...).
        size: the output side (square) or ``(height, width)`` in pixels.

    Returns:
        the resized array, same dtype; ``image`` itself (not a copy) when the size already
        matches. ``cv2.INTER_AREA`` is used when no side grows, ``cv2.INTER_LINEAR`` otherwise.
    """
    target = _target_shape(size)
    if image.shape[:2] == target:
        return image
    interpolation = _interpolation(image.shape[:2], target)
    return cv2.resize(image, (target[1], target[0]), interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a binary mask without losing small lesions.

    Rule: the mask (nonzero = foreground) is resampled as a float coverage map (area average
    when no side grows, bilinear otherwise) and an output pixel is foreground when its
    coverage is ``>= 0.5``. Then every 8-connected group of output pixels that the lesion
    touches (coverage > 0) but that has no foreground pixel gets its most covered pixel, so a
    lesion is never lost and nothing is dilated: a 1-pixel lesion shrunk ×2 becomes one output
    pixel, and so does a 2×2 lesion aligned to the grid.

    Args:
        mask: H×W array; any nonzero value is foreground.
        size: the output side (square) or ``(height, width)`` in pixels.

    Returns:
        ``uint8`` array of values 0/1 with shape ``size``.
    """
    if mask.ndim != 2:
        raise ValueError(f"resize_mask expects an H×W mask, got shape {mask.shape}")
    target = _target_shape(size)
    foreground = mask != 0
    if foreground.shape == target:
        return foreground.astype(np.uint8)
    if not foreground.any():
        return np.zeros(target, np.uint8)
    coverage = cv2.resize(
        foreground.astype(np.float32),
        (target[1], target[0]),
        interpolation=_interpolation(foreground.shape, target),
    )
    resized = (coverage >= 0.5).astype(np.uint8)
    _keep_touched_regions(coverage, resized)
    return resized


def _keep_touched_regions(coverage: np.ndarray, resized: np.ndarray) -> None:
    """Set, in place, the most covered pixel of each touched region left without foreground."""
    regions, n_regions = ndimage.label(coverage > 0, structure=np.ones((3, 3), bool))
    has_foreground = np.zeros(n_regions + 1, bool)
    has_foreground[regions[resized > 0]] = True
    lost = np.flatnonzero(~has_foreground[1:]) + 1
    if lost.size:
        rows, cols = np.array(ndimage.maximum_position(coverage, regions, lost)).T
        resized[rows, cols] = 1
