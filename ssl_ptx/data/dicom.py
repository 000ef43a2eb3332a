"""Read chest X-ray DICOM files into 8-bit display images and a small metadata dict.

Display convention: the returned image is ``uint8`` H×W with bright = dense (bone white), so a
``MONOCHROME1`` file is inverted. The grey levels follow the file's own display rules:

1. Modality LUT: *Modality LUT Sequence* or *RescaleSlope* / *RescaleIntercept*
   (an identity rescale, slope 1 and intercept 0, is skipped);
2. VOI LUT: a *VOI LUT Sequence* when present (its lowest entry maps to 0, its highest to 255),
   else *WindowCenter* / *WindowWidth* (the first window when several are listed; the window
   is stretched over 0..255);
3. without a VOI LUT: unsigned 8-bit pixels are returned as stored (the SIIM case: identical to
   ``pixel_array``, no arithmetic); anything else is stretched min–max over the image's actual
   value range (a constant image becomes all zeros).

Colour files (RGB, or YBR which pydicom converts to RGB) are reduced to grey with the ITU-R
601 luma weights. Multi-frame files return their FIRST frame. JPEG and other compressed
transfer syntaxes are decoded by pydicom through the installed plugins (pylibjpeg-libjpeg).

Every failure to read an image raises :class:`DicomError` whose message starts with the path,
except a missing file, which raises :class:`FileNotFoundError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, pixel_array

__all__ = [
    "METADATA_KEYS",
    "DicomError",
    "read_dicom",
    "read_dicom_metadata",
    "stretch_to_uint8",
]

METADATA_KEYS: tuple[str, ...] = (
    "SOPInstanceUID",
    "PatientID",
    "ViewPosition",
    "PatientSex",
    "PatientAge",
    "PixelSpacing",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
)

_TEXT_KEYS = (
    "SOPInstanceUID",
    "PatientID",
    "ViewPosition",
    "PatientSex",
    "PatientAge",
    "PhotometricInterpretation",
)
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


class DicomError(ValueError):
    """A file could not be read as a DICOM image; the message names the file and the problem."""


def read_dicom(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a DICOM file as an 8-bit display image (see the module docstring for the rules).

    Args:
        path: the ``.dcm`` file.

    Returns:
        ``(image, metadata)``: ``image`` is ``uint8`` H×W, bright = dense; ``metadata`` is the
        dict of :func:`read_dicom_metadata`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DicomError: not a DICOM file, a truncated file, no pixel data, a transfer syntax that
            cannot be decoded, or an unsupported photometric interpretation (e.g. PALETTE COLOR).
    """
    path = Path(path)
    dataset = _read_dataset(path, stop_before_pixels=False)
    if "PixelData" not in dataset:
        raise DicomError(
            f"{path}: has no pixel data (no PixelData element in {path.stat().st_size} bytes: "
            "the file is truncated or holds no image)"
        )
    try:
        pixels = pixel_array(dataset, index=0)
    except Exception as exc:  # pydicom and its plugins raise many types for broken pixel data
        raise DicomError(
            f"{path}: cannot decode the pixel data ({_transfer_syntax_name(dataset)}): {exc}"
        ) from exc
    return _to_display(pixels, dataset, path), _metadata(dataset)


def read_dicom_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read the tags in :data:`METADATA_KEYS` without touching the pixel data (fast).

    Args:
        path: the ``.dcm`` file.

    Returns:
        ``{SOPInstanceUID, PatientID, ViewPosition, PatientSex, PatientAge,
        PhotometricInterpretation}`` as stripped strings (``""`` when missing; the age is the
        raw text, e.g. ``"038Y"`` or SIIM's ``"38"``), ``PixelSpacing`` as a ``(row, column)``
        tuple of floats in mm (``None`` when missing or unparsable), ``Rows`` and ``Columns``
        as ints (``None`` when missing).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DicomError: the file is not a DICOM file or its header cannot be parsed.
    """
    return _metadata(_read_dataset(Path(path), stop_before_pixels=True))


def _read_dataset(path: Path, stop_before_pixels: bool) -> Dataset:
    """``pydicom.dcmread`` with its errors turned into :class:`DicomError` naming ``path``."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except FileNotFoundError:
        raise
    except InvalidDicomError as exc:
        raise DicomError(f"{path}: not a DICOM file ({exc})") from exc
    except Exception as exc:  # struct.error, EOFError, ... on truncated or corrupt headers
        raise DicomError(
            f"{path}: cannot parse the DICOM header (truncated or corrupt): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _metadata(dataset: Dataset) -> dict[str, Any]:
    metadata: dict[str, Any] = {key: _text(dataset, key) for key in _TEXT_KEYS}
    metadata["PixelSpacing"] = _pixel_spacing(dataset)
    for key in ("Rows", "Columns"):
        value = dataset.get(key)
        metadata[key] = None if value is None else int(value)
    return {key: metadata[key] for key in METADATA_KEYS}


def _text(dataset: Dataset, keyword: str) -> str:
    """The tag's text without pydicom's value validation.

    The raw element is read so that values that break the VR rules but are common in public
    data (SIIM writes the age as ``"38"`` instead of ``"038Y"``) raise no warning per file.
    """
    if keyword not in dataset:
        return ""
    value = dataset.get_item(keyword).value
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value).strip(" \x00")


def _pixel_spacing(dataset: Dataset) -> tuple[float, float] | None:
    parts = _text(dataset, "PixelSpacing").split("\\")
    try:
        row, column = (float(part) for part in parts)
    except ValueError:
        return None
    return row, column


def _transfer_syntax_name(dataset: Dataset) -> str:
    uid = dataset.file_meta.get("TransferSyntaxUID")
    return "no transfer syntax in the file meta" if uid is None else f"{uid.name}, {uid}"


def _to_display(pixels: np.ndarray, dataset: Dataset, path: Path) -> np.ndarray:
    """Apply the modality and VOI LUTs and the photometric interpretation → uint8 H×W."""
    if pixels.ndim == 3:
        grey = pixels.astype(np.float64) @ _LUMA_WEIGHTS
        if pixels.dtype == np.uint8:
            return np.rint(grey).astype(np.uint8)
        return stretch_to_uint8(grey)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in _MONOCHROME:
        raise DicomError(
            f"{path}: photometric interpretation {photometric!r} is not supported "
            "(expected MONOCHROME1, MONOCHROME2, RGB or YBR)"
        )
    try:
        image = _grey_levels(pixels, dataset)
    except (ValueError, NotImplementedError) as exc:
        raise DicomError(f"{path}: cannot apply its modality / VOI LUT: {exc}") from exc
    if photometric == "MONOCHROME1":
        image = np.subtract(255, image, dtype=np.uint8)
    return image


def _grey_levels(pixels: np.ndarray, dataset: Dataset) -> np.ndarray:
    values = pixels
    if _has_modality_lut(dataset):
        values = apply_modality_lut(values, dataset)
    if dataset.get("VOILUTSequence"):
        values = apply_voi(np.rint(values).astype(np.int64), dataset)
        entries = _voi_lut_entries(dataset)
        return stretch_to_uint8(values, entries.min(), entries.max())
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        values = apply_windowing(values, dataset)
        # pydicom maps the window onto [y_min, y_max], which depend on the bit depth and the
        # rescale; the images of -inf and +inf are exactly those two bounds.
        low, high = apply_windowing(np.array([-np.inf, np.inf]), dataset)
        return stretch_to_uint8(values, low, high)
    if values.dtype == np.uint8:
        return values
    return stretch_to_uint8(values)


def _has_modality_lut(dataset: Dataset) -> bool:
    if dataset.get("ModalityLUTSequence"):
        return True
    slope = dataset.get("RescaleSlope")
    intercept = dataset.get("RescaleIntercept")
    if slope is None or intercept is None:
        return False
    return float(slope) != 1.0 or float(intercept) != 0.0


def _voi_lut_entries(dataset: Dataset) -> np.ndarray:
    """All output values of the first VOI LUT (to map its range onto 0..255)."""
    n_entries, first_mapped, _ = dataset.VOILUTSequence[0].LUTDescriptor
    inputs = np.arange(first_mapped, first_mapped + (n_entries or 2**16), dtype=np.int64)
    return apply_voi(inputs, dataset)


def stretch_to_uint8(
    values: np.ndarray, low: float | None = None, high: float | None = None
) -> np.ndarray:
    """Map ``[low, high]`` linearly onto 0..255, clipped and rounded, as uint8.

    Args:
        values: array of any real dtype and shape.
        low, high: the values that become 0 and 255; default: the array's own min and max.

    Returns:
        uint8 array of ``values``' shape; all zeros when ``high <= low`` (a constant image).
    """
    low = float(values.min()) if low is None else float(low)
    high = float(values.max()) if high is None else float(high)
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (np.asarray(values, np.float64) - low) * (255.0 / (high - low))
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)
