"""Pictures a person would rather look at than read: images with their masks outlined.

Only numpy and OpenCV: no plotting backend is needed to write a contact sheet.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ssl_ptx.fileio import atomic_write_bytes

__all__ = ["cache_contact_sheet", "contact_sheet", "outline_mask", "write_png"]

OUTLINE_BGR = (0, 0, 255)  # red outline on the grey X-ray


def outline_mask(
    image: np.ndarray, mask: np.ndarray | None, *, color: tuple[int, int, int] = OUTLINE_BGR
) -> np.ndarray:
    """Draw the outline of ``mask`` on a grey image.

    Args:
        image: uint8 H×W grey image.
        mask: H×W array (nonzero = foreground) or None for no outline.
        color: BGR colour of the outline.

    Returns:
        uint8 H×W×3 BGR image.
    """
    canvas = cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), cv2.COLOR_GRAY2BGR)
    if mask is not None and np.any(mask):
        binary = (np.asarray(mask) != 0).astype(np.uint8)
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        thickness = max(1, image.shape[0] // 256)
        cv2.drawContours(canvas, contours, -1, color, thickness)
    return canvas


def contact_sheet(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    titles: Sequence[str] | None = None,
    *,
    columns: int = 6,
    tile: int = 256,
) -> np.ndarray:
    """Tile images with outlined masks and a caption each into one BGR picture.

    Args:
        images: uint8 H×W grey images (any sizes; each is resized to ``tile``×``tile``).
        masks: matching masks (or None) at each image's own size.
        titles: optional caption per tile, written in its top-left corner.
        columns: tiles per row.
        tile: side of a tile in pixels.

    Returns:
        uint8 BGR array of shape [rows·tile, columns·tile, 3].
    """
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    rows = -(-len(images) // columns)
    sheet = np.zeros((rows * tile, columns * tile, 3), np.uint8)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        small = cv2.resize(image, (tile, tile), interpolation=cv2.INTER_AREA)
        small_mask = None
        if mask is not None:
            small_mask = cv2.resize(
                np.asarray(mask, np.uint8), (tile, tile), interpolation=cv2.INTER_NEAREST
            )
        cell = outline_mask(small, small_mask)
        if titles is not None:
            cv2.putText(cell, titles[i], (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1)
        r, c = divmod(i, columns)
        sheet[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = cell
    return sheet


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a PNG atomically (temporary file in the same folder, then rename)."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"could not encode an image of shape {image.shape} as PNG for {path}")
    return atomic_write_bytes(path, data.tobytes())


def cache_contact_sheet(
    cache_path: str | Path, *, n: int = 24, seed: int = 0, columns: int = 6, tile: int = 256
) -> np.ndarray:
    """A contact sheet of images from an HDF5 cache, masks outlined, half of them positive.

    Args:
        cache_path: a cache written by :func:`ssl_ptx.data.cache.build_cache`.
        n: number of images (fewer when the cache is smaller).
        seed: which images are drawn.
        columns: tiles per row.
        tile: side of a tile in pixels.

    Returns:
        uint8 BGR array; each caption is the image id's tail and its label (``+`` positive,
        ``-`` negative, ``?`` unlabelled).
    """
    from ssl_ptx.data.cache import CacheReader

    with CacheReader(cache_path) as cache:
        labels = cache.labels
        rng = np.random.default_rng(seed)
        positives = rng.permutation(np.flatnonzero(labels == 1))[: n // 2]
        others = rng.permutation(np.flatnonzero(labels != 1))[: n - len(positives)]
        rows = np.sort(np.concatenate([positives, others]))
        pairs = [cache[int(row)] for row in rows]
        marks = {1.0: "+", 0.0: "-"}
        titles = [f"{cache.image_ids[r][-10:]} {marks.get(float(labels[r]), '?')}" for r in rows]
    return contact_sheet(
        [image for image, _ in pairs],
        [mask for _, mask in pairs],
        titles,
        columns=columns,
        tile=tile,
    )
