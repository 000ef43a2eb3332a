"""The lung pre-segmenter's data and evaluation, and lung boxes for a training cache.

* :func:`build_lung_datasets` — training and held-out datasets of a Montgomery-layout root
  (``data.montgomery_dir``, or the demo root's ``montgomery/``): images with the union of the
  left and right lung masks (:mod:`external_data.montgomery`), folds stratified by lung area,
  decoded once into an HDF5 cache like SIIM.
* :func:`evaluate_lung_segmenter` — lung Dice and IoU of held-out images at their native
  size, the box each gets and how much of the true lung it keeps, plus a contact sheet.
* :func:`cache_lung_boxes` — runs a lung checkpoint over a cache once and stores the boxes in
  it (:func:`ssl_ptx.data.cache.store_lung_boxes`), so datasets can train on crops.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from external_data import montgomery
from ssl_ptx.config import ConfigError, DataConfig
from ssl_ptx.data.cache import (
    CacheReader,
    LungBoxes,
    manifest_fingerprint,
    read_sample,
    store_lung_boxes,
)
from ssl_ptx.data.datasets import SegmentationDataset
from ssl_ptx.data.images import resize_image, resize_mask
from ssl_ptx.data.siim import make_folds
from ssl_ptx.engine.data import LabelledSubset, _open_cache, _transforms, ensure_demo_root
from ssl_ptx.engine.distributed import barrier, init_distributed
from ssl_ptx.lung_crop import LUNG_REASON, Box, LungCropper
from ssl_ptx.metrics import dice_per_image
from ssl_ptx.viz import contact_sheet

__all__ = [
    "LungEvaluation",
    "build_lung_datasets",
    "cache_lung_boxes",
    "evaluate_lung_segmenter",
    "lung_checkpoint_key",
    "lung_contact_sheet",
    "montgomery_root",
]

logger = logging.getLogger(__name__)

BOX_BGR = (0, 255, 0)  # green box over the red lung outline


def montgomery_root(config: DataConfig, *, progress: bool = True) -> Path:
    """``config.montgomery_dir``, or the demo root's ``montgomery/`` (the demo root is written
    first when it does not exist).

    Raises:
        ConfigError: the demo root exists but has no ``montgomery/`` folder.
    """
    if config.montgomery_dir is not None:
        return Path(config.montgomery_dir)
    ensure_demo_root(
        config.demo_dir, n_images=config.demo_images, size=config.demo_size, progress=progress
    )
    root = Path(config.demo_dir) / "montgomery"
    if not root.is_dir():
        raise ConfigError(
            f"data.montgomery_dir is unset and the demo root {config.demo_dir} has no "
            "montgomery/ folder; pass --montgomery-dir, or write a demo root with Montgomery "
            f"images: python -m ssl_ptx.data.demo --root {config.demo_dir} --n-montgomery 40"
        )
    return root


def build_lung_datasets(
    config: DataConfig, *, in_channels: int = 1, progress: bool = True
) -> tuple[Dataset, Dataset, pd.DataFrame]:
    """Training and held-out lung datasets of fold ``config.fold``.

    The manifest is :func:`external_data.montgomery.load` of :func:`montgomery_root` (target:
    left OR right lung); ``fold`` is :func:`ssl_ptx.data.siim.make_folds` of the lung's share
    of the image (``n_folds``, ``fold_seed``). With ``cache_dir`` set, images and masks are
    decoded once into ``<cache_dir>/montgomery-<key>-<side>.h5`` (side ``cache_size`` or
    ``size``; the key follows the manifest), squashed to a square as the 3rd place did.

    Returns:
        ``(train, held_out, manifest)``: datasets yielding
        :class:`~ssl_ptx.data.datasets.SegmentationDataset` dicts (train with
        ``config.augment``, held-out resized only) and the manifest with its ``fold``.

    Raises:
        ConfigError: no image was read, or the held-out or the training fold is empty.
    """
    root = montgomery_root(config, progress=progress)
    manifest = montgomery.load(root, progress=progress and init_distributed().is_main)
    if manifest.empty:
        raise ConfigError(f"{root}: no Montgomery image could be read")
    lung_share = manifest["mask_area"] / (manifest["height"] * manifest["width"])
    manifest["fold"] = make_folds(lung_share.to_numpy(), config.n_folds, config.fold_seed)
    is_val = (manifest["fold"] == config.fold).to_numpy()
    if not is_val.any() or is_val.all():
        raise ConfigError(
            f"data.fold={config.fold}: {root} gives {int(is_val.sum())} held-out and "
            f"{int((~is_val).sum())} training images; both must be non-empty"
        )
    train_transform, val_transform = _transforms(config, True), _transforms(config, False)
    if config.cache_dir is None:
        options = {"size": config.size, "in_channels": in_channels}
        train = SegmentationDataset(manifest[~is_val], train_transform, **options)
        val = SegmentationDataset(manifest[is_val], val_transform, **options)
        return train, val, manifest
    side = config.cache_size or config.size
    key = manifest_fingerprint(manifest)[:10]
    cache = _open_cache(
        manifest, Path(config.cache_dir) / f"montgomery-{key}-{side}.h5", side, progress
    )
    cached = manifest["image_id"].isin(set(cache.image_ids)).to_numpy()
    rows = np.array(
        [cache.index_of(i) if c else -1 for i, c in zip(manifest["image_id"], cached, strict=True)]
    )
    train = LabelledSubset(
        SegmentationDataset(cache, train_transform, in_channels=in_channels),
        rows[~is_val & cached].tolist(),
    )
    val = LabelledSubset(
        SegmentationDataset(cache, val_transform, in_channels=in_channels),
        rows[is_val & cached].tolist(),
    )
    return train, val, manifest


@dataclass
class LungEvaluation:
    """What :func:`evaluate_lung_segmenter` measured.

    Attributes:
        table: one row per image: ``image_id``, ``height``, ``width``, ``dice``, ``iou``
            (predicted vs true lung at native size), ``reason`` (``"lungs"`` or a fallback),
            ``lung_in_box`` (share of the true lung's pixels inside the box), ``box_area``
            (the box's share of the image), ``y0 x0 y1 x1`` (box fractions).
        sheet: uint8 BGR contact sheet of the first images: predicted lung outlined in red,
            box in green, captions ``<id tail> D<dice>``.
    """

    table: pd.DataFrame
    sheet: np.ndarray

    def summary(self) -> dict[str, float]:
        """Means of Dice, IoU, ``lung_in_box`` and ``box_area``, the minimum Dice, the number
        of images and of full-image fallbacks."""
        table = self.table
        return {
            "n_images": len(table),
            "lung_dice": float(table["dice"].mean()),
            "lung_iou": float(table["iou"].mean()),
            "lung_dice_min": float(table["dice"].min()),
            "lung_in_box": float(table["lung_in_box"].mean()),
            "box_area": float(table["box_area"].mean()),
            "fallbacks": int((table["reason"] != LUNG_REASON).sum()),
        }


def evaluate_lung_segmenter(
    cropper: LungCropper,
    manifest: pd.DataFrame,
    *,
    sheet_images: int = 12,
    tile: int = 192,
    progress: bool = True,
) -> LungEvaluation:
    """Lung Dice / IoU and the boxes of the manifest's images, each read at its native size.

    Args:
        cropper: the lung model and its crop settings.
        manifest: rows with a lung mask (``rle`` or ``mask_path``), e.g. the held-out fold.
        sheet_images: how many images (the first ones) go into the contact sheet (≥ 1).
        tile: side of a contact-sheet tile in pixels.
        progress: show a tqdm progress bar.

    Raises:
        ValueError: an empty manifest or a row without a lung mask.
        ssl_ptx.data.cache.SampleReadError: an image or mask cannot be read.
    """
    if manifest.empty:
        raise ValueError("evaluate_lung_segmenter needs at least one image")
    records, tiles = [], []
    for row in tqdm(manifest.to_dict("records"), desc="lung eval", disable=not progress):
        image, truth, has_mask = read_sample(row)
        if not has_mask:
            raise ValueError(f"image {row['image_id']!r} ({row['path']}) has no lung mask")
        probability = cropper.predict_lung([image])[0]
        predicted = probability > cropper.threshold
        box, reason = cropper.box_of(probability)
        dice = float(dice_per_image(predicted, truth)[0])
        inside = int(truth[box.slices].sum())
        fractions = box.to_fractions(image.shape)
        records.append(
            {
                "image_id": row["image_id"],
                "height": image.shape[0],
                "width": image.shape[1],
                "dice": dice,
                "iou": dice / (2.0 - dice),
                "reason": reason,
                "lung_in_box": inside / max(int(truth.sum()), 1),
                "box_area": box.area / image.size,
                **dict(zip(("y0", "x0", "y1", "x1"), fractions, strict=True)),
            }
        )
        if len(tiles) < sheet_images:
            tiles.append((resize_image(image, tile), resize_mask(predicted, tile), fractions))
    table = pd.DataFrame.from_records(records)
    titles = [f"{record['image_id'][-8:]} D{record['dice']:.3f}" for record in records]
    images, masks, boxes = zip(*tiles, strict=True)
    sheet = lung_contact_sheet(images, masks, boxes, titles[: len(tiles)], tile=tile)
    return LungEvaluation(table=table, sheet=sheet)


def lung_contact_sheet(
    images: Sequence[np.ndarray],
    lung_masks: Sequence[np.ndarray | None],
    boxes: Sequence[Sequence[float]],
    titles: Sequence[str] | None = None,
    *,
    columns: int = 6,
    tile: int = 192,
) -> np.ndarray:
    """:func:`ssl_ptx.viz.contact_sheet` with each image's box drawn in green.

    Args:
        images: uint8 H×W grey images (any sizes).
        lung_masks: matching lung masks (outlined in red) or None.
        boxes: ``(y0, x0, y1, x1)`` box fractions, one per image.
        titles, columns, tile: as :func:`~ssl_ptx.viz.contact_sheet`.

    Returns:
        uint8 BGR array of shape [rows·tile, columns·tile, 3].
    """
    if len(boxes) != len(images):
        raise ValueError(f"{len(images)} images but {len(boxes)} boxes")
    sheet = contact_sheet(images, lung_masks, titles, columns=columns, tile=tile)
    thickness = max(1, tile // 128)
    for index, fractions in enumerate(boxes):
        row, column = divmod(index, columns)
        box = Box.from_fractions(fractions, (tile, tile))
        top_left = (column * tile + box.x0, row * tile + box.y0)
        bottom_right = (column * tile + box.x1 - 1, row * tile + box.y1 - 1)
        cv2.rectangle(sheet, top_left, bottom_right, BOX_BGR, thickness)
    return sheet


def lung_checkpoint_key(path: str | os.PathLike) -> str:
    """16 hex digits of the SHA-256 of a lung checkpoint file: the name its boxes are stored
    under in a cache, so another model or other crop settings get their own boxes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def cache_lung_boxes(
    cache: CacheReader, checkpoint: str | os.PathLike, *, progress: bool = True
) -> LungBoxes:
    """The lung boxes of every cached image under a lung checkpoint, computed on first use.

    The first call runs the checkpoint's :class:`~ssl_ptx.lung_crop.LungCropper` over the
    cache in blocks (resumable; under DDP on rank 0 while the others wait) and stores the boxes
    in it under :func:`lung_checkpoint_key`; later calls read them.

    Raises:
        FileNotFoundError: no checkpoint at ``checkpoint``.
        ssl_ptx.engine.checkpoint.CheckpointError: not a lung checkpoint.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"lung checkpoint {checkpoint} (data.lung_crop) does not exist")
    key = lung_checkpoint_key(checkpoint)
    context = init_distributed()
    if context.is_main and key not in cache.lung_box_keys():
        cropper = LungCropper.from_checkpoint(checkpoint, device=context.device)
        cache.close()  # HDF5 cannot add the boxes while this process holds the file open
        stored = store_lung_boxes(
            cache.path,
            key,
            cropper.normalised_boxes,
            info={"checkpoint": str(checkpoint.resolve()), "settings": cropper.settings()},
            progress=progress,
        )
        fallbacks = Counter(reason for reason in stored.reasons if reason != LUNG_REASON)
        logger.info(
            "lung boxes of %s with %s: %d images, full-image fallbacks %s",
            cache.path,
            checkpoint,
            len(stored.reasons),
            dict(fallbacks) or "none",
        )
    barrier()
    return cache.lung_boxes(key)
