"""Pieces shared by the demo's external parts (CheXpert, NIH, Montgomery).

Published labels are drawn with exact quotas (so small demos still hit the real frequencies),
then a *true* state is drawn per published value with the dataset's own noise: some published
positives show no pneumothorax, some negatives show one. The true masks go to a side folder,
``<root>/_truth/<dataset>/<image_id>.png`` (0/255), with one row per image in
``<root>/_truth/labels.csv``; the readers never look there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ssl_ptx.data._demo_findings import (
    DRAIN_WITH_PNEUMOTHORAX_SHARE,
    LOOKALIKE_SHARE,
    MULTI_INSTANCE_SHARE,
    OVERLAP_SHARE,
    PneumothoraxShapes,
)
from ssl_ptx.data._phantom import (
    ChestAnatomy,
    chest_frame,
    lateral_lung_mask,
    lung_masks,
)
from ssl_ptx.fileio import atomic_write_bytes

__all__ = [
    "TRUTH_COLUMNS",
    "ExternalSummary",
    "TruthRecorder",
    "aspect_shape",
    "clipped_normal",
    "draw_devices",
    "draw_truth",
    "encode_image",
    "frontal_pneumothorax",
    "lateral_pneumothorax",
    "quota_labels",
]

TRUTH_COLUMNS = ("dataset", "image_id", "path", "published_label", "true_label", "mask_area")
JPEG_QUALITY = 90


@dataclass(frozen=True)
class ExternalSummary:
    """What the demo wrote for one external dataset.

    Attributes:
        folder: the dataset's folder in the demo root (the one a user points the reader at).
        images: image files written.
        published_positives: images whose label file says positive (CheXpert ``1.0``, NIH
            ``Pneumothorax`` in ``Finding Labels``, Montgomery ``_1`` = tuberculosis).
        true_positives: images with a pneumothorax drawn (0 for Montgomery).
    """

    folder: Path
    images: int
    published_positives: int
    true_positives: int


def quota_labels(rng: np.random.Generator, n: int, shares: Mapping[str, float]) -> np.ndarray:
    """``n`` labels in random order whose counts follow ``shares`` as closely as integers allow.

    Counts are the largest-remainder rounding of ``n * share`` (shares are normalised), so even
    a small demo hits the real frequencies to within one image per label.

    Returns:
        Array of ``n`` strings (the keys of ``shares``).
    """
    keys = list(shares)
    weights = np.array([shares[k] for k in keys], dtype=float)
    exact = n * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    labels = np.repeat(np.array(keys, dtype=object), counts)
    return labels[rng.permutation(n)]


def draw_truth(
    rng: np.random.Generator, published: Sequence[str], true_share: Mapping[str, float]
) -> np.ndarray:
    """Whether each case truly has a pneumothorax, given its published label.

    Within each published value, exactly ``round(count * true_share[value])`` cases (chosen at
    random) are truly positive.

    Returns:
        bool array, one per case.
    """
    published = np.asarray(published, dtype=object)
    truth = np.zeros(len(published), bool)
    for value, share in true_share.items():
        where = np.flatnonzero(published == value)
        chosen = rng.permutation(where)[: round(len(where) * share)]
        truth[chosen] = True
    return truth


def draw_devices(rng: np.random.Generator, has_pneumothorax: bool) -> tuple[bool, bool]:
    """``(drain, skin_fold)`` as in the SIIM part: drains with a pneumothorax, look-alikes else."""
    if has_pneumothorax:
        return bool(rng.random() < DRAIN_WITH_PNEUMOTHORAX_SHARE), False
    if rng.random() >= LOOKALIKE_SHARE:
        return False, False
    drain = bool(rng.random() < 0.5)
    return drain, not drain


def frontal_pneumothorax(
    rng: np.random.Generator,
    shape: tuple[int, int],
    anatomy: ChestAnatomy,
    shapes: PneumothoraxShapes,
) -> np.ndarray:
    """A pneumothorax for a frontal film of ``shape``: real instances fitted to its lungs.

    One or several instances (several, overlapping or not, as often as in SIIM) are fitted in
    the chest square (:func:`~ssl_ptx.data._phantom.chest_frame`) and placed in the image.

    Returns:
        uint8 0/1 mask of ``shape``, nonempty, inside the lung fields.
    """
    side, top, left = chest_frame(shape)
    if side != shapes.size:
        raise ValueError(f"shapes are {shapes.size}² but the chest square is {side}²")
    crop = (slice(top, top + side), slice(left, left + side))
    image_left, image_right = (lung[crop] for lung in lung_masks(anatomy, shape))
    multi = bool(rng.random() < MULTI_INSTANCE_SHARE)
    overlap = multi and bool(rng.random() < OVERLAP_SHARE)
    instances = shapes.fit(image_left, image_right, multi=multi, overlap=overlap)
    mask = np.zeros(shape, np.uint8)
    mask[crop] = np.bitwise_or.reduce(instances)
    return mask


def lateral_pneumothorax(
    rng: np.random.Generator, shape: tuple[int, int], anatomy: ChestAnatomy
) -> np.ndarray:
    """A pneumothorax as a lateral film shows it: an apical-anterior crescent of the lung field.

    The crescent is the part of the lateral lung field not covered by itself moved down and
    back by 2–5 % of the chest square, above a random height in the upper 20–45 % of the lung.

    Returns:
        uint8 0/1 mask of ``shape``, nonempty, inside :func:`lateral_lung_mask`.
    """
    side, _, _ = chest_frame(shape)
    lung = lateral_lung_mask(anatomy, shape)
    down, back = (max(1, round(side * rng.uniform(0.02, 0.05))) for _ in range(2))
    moved = np.zeros_like(lung)
    moved[down:, back:] = lung[:-down, :-back]
    crescent = lung & (1 - moved)
    rows = np.flatnonzero(lung.any(axis=1))
    cut = rows[0] + round((rows[-1] - rows[0]) * rng.uniform(0.2, 0.45))
    crescent[cut:] = 0
    return crescent


def encode_image(pixels: np.ndarray, suffix: str) -> bytes:
    """Encode an image as ``.png`` (lossless) or ``.jpg`` (quality :data:`JPEG_QUALITY`)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if suffix == ".jpg" else []
    ok, buffer = cv2.imencode(suffix, pixels, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {pixels.dtype} {pixels.shape} {suffix}")
    return buffer.tobytes()


class TruthRecorder:
    """Writes true masks to ``<root>/_truth/<dataset>/`` and collects ``labels.csv`` rows.

    Args:
        root: the demo data root.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / "_truth"
        self.rows: list[tuple[str, str, str, str, int, int]] = []

    def add(
        self, dataset: str, image_id: str, image_path: Path, published: str, mask: np.ndarray
    ) -> None:
        """Record one image: its true mask (uint8 0/1, the image's H×W) and both labels.

        Args:
            dataset: ``chexpert`` or ``nih``.
            image_id: the reader's image id; the mask goes to ``<dataset>/<image_id>.png``.
            image_path: the image file (inside ``root``).
            published: the label as the label file states it (``1.0``, ``0.0``, ``-1.0`` or
                ``""`` for CheXpert; ``1.0`` or ``0.0`` for NIH).
            mask: the true pneumothorax mask; empty when none was drawn.
        """
        name = image_id if image_id.endswith(".png") else f"{image_id}.png"
        png = encode_image((mask != 0).astype(np.uint8) * 255, ".png")
        atomic_write_bytes(self.folder / dataset / name, png)
        area = int(np.count_nonzero(mask))
        relative = image_path.relative_to(self.root).as_posix()
        self.rows.append((dataset, image_id, relative, published, int(area > 0), area))

    def write_csv(self) -> Path:
        """Write ``labels.csv`` (header :data:`TRUTH_COLUMNS`) and return its path."""
        lines = [",".join(TRUTH_COLUMNS)]
        lines += [",".join(str(value) for value in row) for row in self.rows]
        return atomic_write_bytes(self.folder / "labels.csv", ("\n".join(lines) + "\n").encode())


def clipped_normal(
    rng: np.random.Generator, mean: float, std: float, low: float, high: float
) -> int:
    """An integer drawn from a normal distribution and clipped to [low, high] (ages)."""
    return int(np.clip(round(rng.normal(mean, std)), low, high))


def aspect_shape(size: int, aspect: float, *, portrait: bool = True) -> tuple[int, int]:
    """``(height, width)`` with the short side ``size`` and the long side ``size * aspect``."""
    long_side = math.floor(size * aspect + 0.5)
    return (long_side, size) if portrait else (size, long_side)
