"""Pneumothorax shapes for the demo data: real SIIM masks (or parametric crescents) fitted to a
synthetic chest's lung fields, and how often look-alikes and drains appear.

Shared by every part of the demo root (:mod:`ssl_ptx.data.demo`): the SIIM part and the external
CheXpert and NIH parts draw their frontal pneumothoraces the same way, each from its own seed.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ssl_ptx.data import rle

__all__ = ["PneumothoraxShapes", "real_siim_shapes", "xrv_siim_csv"]

REAL_SIZE = 1024
REAL_CSV_NAME = "siim-pneumothorax-train-rle.csv.gz"
#: share of positive SIIM images with 2+ rows, and of those whose instances overlap (real file)
MULTI_INSTANCE_SHARE = 624 / 2669
OVERLAP_SHARE = 183 / 624
LOOKALIKE_SHARE = 0.15  # negatives with a skin fold or a chest drain
DRAIN_WITH_PNEUMOTHORAX_SHARE = 0.25  # positives that also have a drain, as in ward films
MIN_LUNG_FRACTION = 0.5  # keep a real instance if at least half of it falls in the lung fields
MAX_SHAPE_TRIES = 5000  # candidate shape sets tried per positive image before giving up


def _min_instance_area(size: int) -> int:
    """Smallest instance kept, in pixels: ~1,000 px at 1024² (the real 2 % quantile)."""
    return max(6, round(1000 * (size / REAL_SIZE) ** 2))


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a 0/1 mask to ``size``² by area averaging, then threshold at one half."""
    if mask.shape == (size, size):
        return mask
    shrunk = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return (shrunk > 0.5).astype(np.uint8)


def xrv_siim_csv() -> Path | None:
    """The real SIIM ``train-rle.csv`` shipped with torchxrayvision, or None if not installed."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / REAL_CSV_NAME
    return path if path.is_file() else None


def real_siim_shapes(
    csv_path: str | Path, rng: np.random.Generator, size: int, *, multi: bool
) -> Iterator[list[np.ndarray]]:
    """Endlessly yield the instance masks of real positive SIIM images, in a random order.

    Every real image is used once per pass; each new pass reshuffles, and odd passes mirror the
    masks left-right, so large demos do not repeat shapes verbatim.

    Args:
        csv_path: a SIIM stage-1 ``train-rle.csv`` (optionally gzipped): ``ImageId`` and
            `` EncodedPixels`` columns, one row per instance, ``-1`` for negatives.
        rng: decides the order.
        size: masks are resized from 1024² to ``size``² (area average, then > 0.5).
        multi: yield images with two or more rows if True, single-row images otherwise.

    Yields:
        One list per real image: its instance masks, uint8 0/1, ``size``×``size`` each, in the
        file's row order. Instances that vanish at ``size`` are dropped.

    Raises:
        ValueError: the file lacks the two columns, holds no image of the requested kind, or
            an RLE does not decode at 1024² (the message names the file and ImageId).
    """
    table = pd.read_csv(csv_path)
    table.columns = [c.strip() for c in table.columns]
    if set(table.columns) != {"ImageId", "EncodedPixels"}:
        raise ValueError(
            f"{csv_path}: expected columns ImageId, EncodedPixels; got {list(table.columns)}"
        )
    encoded = table["EncodedPixels"].astype(str).str.strip()
    positives = table[encoded != rle.EMPTY].assign(EncodedPixels=encoded[encoded != rle.EMPTY])
    groups = positives.groupby("ImageId", sort=True)["EncodedPixels"].agg(list)
    groups = groups[(groups.str.len() > 1) == multi]
    if groups.empty:
        kind = "multi-row" if multi else "single-row"
        raise ValueError(f"{csv_path}: no {kind} positive image to take shapes from")
    for epoch in itertools.count():
        for index in rng.permutation(len(groups)):
            masks = [
                _decode_real(code, csv_path, groups.index[index], size)
                for code in groups.iloc[index]
            ]
            masks = [np.fliplr(m) if epoch % 2 else m for m in masks if m.any()]
            if masks:
                yield masks


def _decode_real(code: str, csv_path: str | Path, image_id: str, size: int) -> np.ndarray:
    try:
        mask = rle.decode(code, (REAL_SIZE, REAL_SIZE))
    except ValueError as error:
        raise ValueError(f"{csv_path}: ImageId {image_id}: {error}") from None
    return _resize_mask(mask, size)


def _parametric_shapes(
    rng: np.random.Generator, size: int, *, multi: bool
) -> Iterator[list[np.ndarray]]:
    """Endless crescents along the lateral-apical chest wall (fallback without real shapes).

    Each crescent is the part of a lung-shaped ellipse not covered by a copy shifted medially and
    down; a multi-instance image splits one crescent into overlapping upper and lower parts.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    while True:
        side = rng.choice([-1.0, 1.0])
        cx, cy = 0.5 + side * rng.uniform(0.22, 0.28), rng.uniform(0.38, 0.45)
        rx, ry = rng.uniform(0.13, 0.17), rng.uniform(0.3, 0.36)
        shift_x, shift_y = -side * rng.uniform(0.02, 0.07), rng.uniform(0.02, 0.06)
        outer = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        inner = ((xx - cx - shift_x) / rx) ** 2 + ((yy - cy - shift_y) / ry) ** 2 < 1
        crescent = outer & ~inner & (yy < cy + rng.uniform(0.0, 0.2))
        if not multi:
            yield [crescent.astype(np.uint8)]
            continue
        cut = rng.uniform(0.25, 0.4)
        margin = rng.choice([-0.03, 0.03])  # > 0: the two parts overlap
        yield [
            (crescent & (yy < cut + margin)).astype(np.uint8),
            (crescent & (yy >= cut - margin)).astype(np.uint8),
        ]


def _overlaps(masks: Sequence[np.ndarray]) -> bool:
    return bool((np.sum(masks, axis=0) > 1).any())


def _snap_to_chest_wall(
    masks: Sequence[np.ndarray], left: np.ndarray, right: np.ndarray
) -> list[np.ndarray]:
    """Move a real image's instances onto this chest's wall, keeping their shapes and overlaps.

    A real mask follows its own patient's chest wall; on a synthetic chest it would float inside
    the lung or spill out of it. Instances are grouped by hemithorax; each group is moved down
    if it starts above the apex, then every row is shifted sideways (smoothly from row to row)
    so that the group's lateral edge lies one pixel past the lung's lateral edge. Row widths,
    the vertical extent and the instances' relative positions are kept.

    Args:
        masks: instance masks, uint8 0/1, H×W.
        left, right: the image-left and image-right lung masks, uint8 0/1, H×W.

    Returns:
        The moved masks, same order, uint8 0/1, H×W (pixels pushed out of the frame are lost).
    """
    size = left.shape[0]
    midline = 0.5 * (
        np.flatnonzero(left.any(axis=0)).max() + np.flatnonzero(right.any(axis=0)).min()
    )
    on_left = [np.nonzero(m)[1].mean() < midline for m in masks]
    moved = [np.zeros_like(m) for m in masks]
    for side_is_left, lung in ((True, left), (False, right)):
        group = [i for i, flag in enumerate(on_left) if flag == side_is_left]
        if not group:
            continue
        union = np.bitwise_or.reduce([masks[i] for i in group]).astype(bool)
        rows_with_lung = np.flatnonzero(lung.any(axis=1))
        mask_rows = np.flatnonzero(union.any(axis=1))
        down = int(np.clip(rows_with_lung[0] + 1 - mask_rows[0], 0, round(0.06 * size)))
        columns = np.arange(size)
        if side_is_left:
            wall = np.where(lung, columns, size).min(axis=1) - 1
            edge = np.where(union, columns, size).min(axis=1)
        else:
            wall = np.where(lung, columns, -1).max(axis=1) + 1
            edge = np.where(union, columns, -1).max(axis=1)
        target_rows = np.clip(mask_rows + down, rows_with_lung[0], rows_with_lung[-1])
        per_row = wall[target_rows] - edge[mask_rows]
        sigma = max(1.0, 0.015 * size)
        per_row = cv2.GaussianBlur(per_row.astype(np.float32)[:, None], (1, 0), sigma)[:, 0]
        shift = np.zeros(size, np.int64)
        shift[mask_rows] = np.round(per_row).astype(np.int64)
        for i in group:
            ys, xs = np.nonzero(masks[i])
            ys2, xs2 = ys + down, xs + shift[ys]
            keep = (ys2 < size) & (xs2 >= 0) & (xs2 < size)
            moved[i][ys2[keep], xs2[keep]] = 1
    return moved


def _fit_to_lungs(
    candidates: Iterator[list[np.ndarray]],
    left: np.ndarray,
    right: np.ndarray,
    *,
    multi: bool,
    overlap: bool,
) -> list[np.ndarray]:
    """Take candidate shape sets until one fits the lung fields and the flags; clip it to them.

    Each set is first moved against the chest wall (:func:`_snap_to_chest_wall`). An instance
    is kept when at least :data:`MIN_LUNG_FRACTION` of it lies inside the lungs and its clipped
    area reaches :func:`_min_instance_area`. A set fits when its surviving instance count
    (1, or 2+) and whether they overlap match ``multi`` and ``overlap``.
    """
    size = left.shape[0]
    lungs = left | right
    min_area = _min_instance_area(size)
    for masks in itertools.islice(candidates, MAX_SHAPE_TRIES):
        clipped = []
        for mask in _snap_to_chest_wall(masks, left, right):
            inside = mask & lungs
            area = int(inside.sum())
            if area >= min_area and area >= MIN_LUNG_FRACTION * int(mask.sum()):
                clipped.append(inside)
        if not clipped or (len(clipped) > 1) != multi:
            continue
        if multi and _overlaps(clipped) != overlap:
            continue
        return clipped
    kind = "overlapping " if overlap else "several " if multi else "single "
    raise RuntimeError(
        f"no {kind}pneumothorax shape fitted the lung fields in {MAX_SHAPE_TRIES} tries at {size}²"
    )


class PneumothoraxShapes:
    """Pneumothorax instance sets for one part of the demo root, fitted to each chest in turn.

    Three endless sources (single instances, several instances, several overlapping ones) draw
    from real SIIM masks when the real label file is given, else from parametric crescents.

    Args:
        seed: the parent seed; its first three children order the three sources.
        size: side of the chest square in pixels (masks are ``size``×``size``).
        real_csv: the real SIIM ``train-rle.csv``, or None for parametric shapes.
    """

    def __init__(self, seed: np.random.SeedSequence, size: int, real_csv: Path | None) -> None:
        rngs = [np.random.default_rng(s) for s in seed.spawn(3)]
        if real_csv is None:
            self._single = _parametric_shapes(rngs[0], size, multi=False)
            self._several = self._overlapping = _parametric_shapes(rngs[1], size, multi=True)
        else:
            self._single = real_siim_shapes(real_csv, rngs[0], size, multi=False)
            self._several = real_siim_shapes(real_csv, rngs[1], size, multi=True)
            self._overlapping = real_siim_shapes(real_csv, rngs[2], size, multi=True)
        self.size = size

    def fit(
        self, left: np.ndarray, right: np.ndarray, *, multi: bool = False, overlap: bool = False
    ) -> list[np.ndarray]:
        """The next instance set that fits these lungs, moved onto their wall and clipped.

        Args:
            left, right: the image-left and image-right lung masks, uint8 0/1, ``size``².
            multi: two or more instances (else one).
            overlap: with ``multi``: at least two instances overlap.

        Returns:
            Instance masks, uint8 0/1, ``size``×``size``, each inside the lungs.

        Raises:
            RuntimeError: no candidate fitted in :data:`MAX_SHAPE_TRIES` tries.
        """
        source = self._overlapping if overlap else self._several if multi else self._single
        return _fit_to_lungs(source, left, right, multi=multi, overlap=overlap)
