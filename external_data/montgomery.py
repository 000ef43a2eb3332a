"""Read the Montgomery County chest X-ray set (lung masks) into a manifest.

Layout, as published::

    <root>/MontgomerySet/CXR_png/MCUCXR_0001_0.png        grey, ~4020×4892 (either way round)
    <root>/MontgomerySet/ManualMask/leftMask/MCUCXR_0001_0.png     0/255, same size
    <root>/MontgomerySet/ManualMask/rightMask/MCUCXR_0001_0.png
    <root>/MontgomerySet/ClinicalReadings/MCUCXR_0001_0.txt       (not read)

The name ends in ``_1`` for tuberculosis and ``_0`` for a normal film. The target of an image is
its lung fields, ``leftMask OR rightMask``, stored in the manifest as one SIIM RLE at the
image's own size (``rle`` column), so the cache and the datasets read it as they read SIIM.
Every image and both of its masks are decoded once here (that is how sizes are checked).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from external_data._common import finish_manifest, warn_count
from ssl_ptx.data import rle
from ssl_ptx.data.images import ImageReadError, read_image

__all__ = [
    "DATASET_FOLDER",
    "IMAGE_FOLDER",
    "MASK_FOLDERS",
    "find_dataset_dir",
    "list_images",
    "load",
    "read_lung_mask",
]

logger = logging.getLogger(__name__)

DATASET_FOLDER = "MontgomerySet"
IMAGE_FOLDER = "CXR_png"
#: the two mask folders, relative to the dataset folder; the target is their union
MASK_FOLDERS: tuple[str, ...] = ("ManualMask/leftMask", "ManualMask/rightMask")
_TUBERCULOSIS = {"1": 1.0, "0": 0.0}


def find_dataset_dir(root: str | os.PathLike) -> Path:
    """``root/MontgomerySet`` when it exists, else ``root`` itself; it must hold ``CXR_png/``.

    Raises:
        FileNotFoundError: no ``CXR_png`` folder.
    """
    root = Path(root)
    dataset_dir = root / DATASET_FOLDER if (root / DATASET_FOLDER).is_dir() else root
    if not (dataset_dir / IMAGE_FOLDER).is_dir():
        raise FileNotFoundError(
            f"{root}: no Montgomery set found (neither {IMAGE_FOLDER}/ in it nor "
            f"{DATASET_FOLDER}/{IMAGE_FOLDER}/)"
        )
    return dataset_dir


def list_images(dataset_dir: str | os.PathLike) -> list[Path]:
    """The PNGs of ``<dataset_dir>/CXR_png`` sorted by name (hidden files skipped, suffix
    matched case-insensitively)."""
    folder = Path(dataset_dir) / IMAGE_FOLDER
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() == ".png"
    )


def read_lung_mask(dataset_dir: str | os.PathLike, image_name: str) -> np.ndarray:
    """The lung target of one image: ``leftMask OR rightMask`` of the same file name.

    Returns:
        ``uint8`` H×W with values 0/1 (any nonzero mask pixel is lung).

    Raises:
        FileNotFoundError: a mask file is missing.
        ImageReadError: a mask file cannot be decoded.
        ValueError: the two masks differ in size.
    """
    dataset_dir = Path(dataset_dir)
    masks = [read_image(dataset_dir / folder / image_name) for folder in MASK_FOLDERS]
    if masks[0].shape != masks[1].shape:
        raise ValueError(
            f"{MASK_FOLDERS[0]} is {_size(masks[0])} but {MASK_FOLDERS[1]} is {_size(masks[1])}"
        )
    return ((masks[0] > 0) | (masks[1] > 0)).astype(np.uint8)


def _size(array: np.ndarray) -> str:
    return f"{array.shape[0]}×{array.shape[1]}"


def _read_row(dataset_dir: Path, image_path: Path) -> dict[str, object]:
    """The manifest row of one image (reads the image and both masks).

    Raises:
        FileNotFoundError, ImageReadError, ValueError: as :func:`read_lung_mask`, or the image
            cannot be read, or the masks' size differs from the image's.
    """
    image = read_image(image_path)
    try:
        lungs = read_lung_mask(dataset_dir, image_path.name)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no mask {error.filename}") from None
    if lungs.shape != image.shape[:2]:
        raise ValueError(f"the masks are {_size(lungs)} but the image is {_size(image)}")
    return {
        "image_id": image_path.stem,
        "path": os.path.abspath(image_path),
        "label": np.nan,
        "rle": rle.encode(lungs),
        "height": image.shape[0],
        "width": image.shape[1],
        "mask_area": int(np.count_nonzero(lungs)),
        "tuberculosis": _TUBERCULOSIS.get(image_path.stem.rpartition("_")[2], np.nan),
    }


def _try_read_row(
    dataset_dir: Path, image_path: Path
) -> tuple[dict[str, object] | None, str | None]:
    """``(row, None)``, or ``(None, reason)`` when the image has to be skipped."""
    try:
        return _read_row(dataset_dir, image_path), None
    except (OSError, ImageReadError, ValueError) as error:
        return None, str(error)


def load(root: str | os.PathLike, *, workers: int = 4, progress: bool = True) -> pd.DataFrame:
    """Read a Montgomery set into a manifest with the lung fields as each image's target.

    An image whose file cannot be read, whose ``leftMask`` or ``rightMask`` is missing or
    unreadable, or whose masks differ in size from it, is skipped: logged (a warning with the
    count and examples) and listed in ``df.attrs["skipped"]`` (``{image_id: reason}``).

    Args:
        root: the folder holding ``MontgomerySet/``, or that folder itself.
        workers: threads that decode images at once (decoding releases the GIL); each
            holds about 0.3 GB at the published ~4000×4900 size.
        progress: show a progress bar (every image and both masks are decoded).

    Returns:
        The validated manifest sorted by image name: ``source`` ``"montgomery"``, ``path``
        absolute, ``label`` NaN (no pneumothorax label), ``rle`` the lung union at native size,
        ``height`` / ``width`` the image's, ``mask_area`` the union's pixels, ``fold`` -1,
        ``mask_path`` NaN, ``view`` / ``patient_id`` ``""``; extra column ``tuberculosis``
        (float64: 1.0 for a ``_1`` name, 0.0 for ``_0``, NaN otherwise).
        ``df.attrs["dataset_dir"]``: the dataset folder read.

    Raises:
        FileNotFoundError: no ``CXR_png`` folder under ``root`` (see :func:`find_dataset_dir`).
    """
    dataset_dir = find_dataset_dir(root)
    image_paths = list_images(dataset_dir)
    rows, skipped = [], {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(partial(_try_read_row, dataset_dir), image_paths)
        bar = tqdm(
            results, total=len(image_paths), desc="Montgomery", unit="img", disable=not progress
        )
        for image_path, (row, error) in zip(image_paths, bar, strict=True):
            if error is None:
                rows.append(row)
            else:
                skipped[image_path.stem] = error
    warn_count(
        logger,
        [f"{image_id}: {reason}" for image_id, reason in skipped.items()],
        "image(s) of %s skipped",
        dataset_dir,
    )
    columns = ["image_id", "path", "label", "rle", "height", "width", "mask_area", "tuberculosis"]
    table = pd.DataFrame(rows, columns=columns).astype(
        {"image_id": object, "path": object, "rle": object, "tuberculosis": np.float64}
    )
    manifest = finish_manifest(table, source="montgomery", name=str(dataset_dir))
    manifest.attrs["skipped"] = skipped
    manifest.attrs["dataset_dir"] = str(dataset_dir)
    return manifest
