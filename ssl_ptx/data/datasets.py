"""PyTorch datasets over a manifest (reading files) or an HDF5 cache.

A sample is a dict::

    image     float32 [C, H, W] in [0, 1]; grey repeated over C = in_channels
    mask      float32 [1, H, W] with values 0/1 (all zero where no mask is known)
    label     float32 scalar: where the row has a mask (rle or mask_path), 1.0 if the returned
              mask has any foreground and 0.0 otherwise (after augmentation, so a crop that
              removes the lesion gives 0); where it has none, the manifest label (1, 0, -1 or
              NaN) unchanged
    has_mask  bool scalar: the manifest gave a mask (losses should ignore ``mask`` otherwise)
    image_id  str
    index     int, position in the dataset

With ``boxes`` (e.g. the lung boxes of :func:`ssl_ptx.data.cache.store_lung_boxes`), image and
mask are cut to each item's box first and resized to ``size``; the transform then augments the
crop.
"""

from __future__ import annotations

import os
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, get_worker_info

from ssl_ptx.data.cache import (
    CacheReader,
    SampleReadError,
    check_box_fractions,
    manifest_has_mask,
    read_sample,
)
from ssl_ptx.data.manifest import validate_manifest
from ssl_ptx.lung_crop import Box, crop, crop_mask

__all__ = ["SegmentationDataset"]

_SAMPLE_COLUMNS = ("image_id", "path", "rle", "mask_path", "height", "width")


class SegmentationDataset(Dataset):
    """Images and pneumothorax masks from a manifest or a :class:`CacheReader`.

    Args:
        source: a manifest DataFrame (images read with ``read_image``, masks built from ``rle``
            or ``mask_path``) or a :class:`~ssl_ptx.data.cache.CacheReader`.
        transform: an albumentations pipeline called as ``transform(image=, mask=)`` on uint8
            arrays (e.g. :func:`ssl_ptx.data.transforms.build_transforms`). In each DataLoader
            worker its random state is reseeded from the worker's torch seed, so workers do not
            repeat each other's augmentations and a seeded DataLoader is reproducible.
        size: resize image and mask to size×size (int) or (h, w) before the transform; None
            keeps the native (manifest) or cached size, or with ``boxes`` the crop's pixel size.
            Without ``boxes`` a cache is already resized, and a different size for one is an
            error; with ``boxes`` it is the size of the crop.
        in_channels: channels of the returned image (the grey image repeated).
        boxes: ``float`` [N, 4], one ``(y0, x0, y1, x1)`` box per item in fractions of the
            image side (:class:`~ssl_ptx.lung_crop.Box` ``.to_fractions``), or None. Each item
            is cut to its box (the smallest pixel box containing it, at the image's native or
            cached size) and the crop is resized to ``size`` (image area/bilinear, mask by
            coverage so small lesions survive), all before the transform.

    Raises:
        ValueError: invalid manifest, ``size`` disagreeing with a cache, ``in_channels`` < 1,
            or ``boxes`` of the wrong shape or outside [0, 1] (naming the row).
    """

    def __init__(
        self,
        source: pd.DataFrame | CacheReader,
        transform: A.BasicTransform | A.BaseCompose | None = None,
        *,
        size: int | tuple[int, int] | None = None,
        in_channels: int = 1,
        boxes: np.ndarray | None = None,
    ) -> None:
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if isinstance(source, CacheReader):
            resizes = size is not None and tuple(np.broadcast_to(size, 2)) != (source.size,) * 2
            if resizes and boxes is None:
                raise ValueError(
                    f"{source.path} holds {source.size}×{source.size} images but size={size}; "
                    "rebuild the cache at that size or leave size=None"
                )
            self._columns: dict[str, np.ndarray] = {}
            self._cache: CacheReader | None = source
            self._image_ids = list(source.image_ids)
            self._labels = source.labels
            self._has_mask = source.has_mask
        else:
            manifest = validate_manifest(source).reset_index(drop=True)
            # one array per column rather than a dict per row: compact for large manifests
            self._columns = {c: manifest[c].to_numpy() for c in _SAMPLE_COLUMNS}
            self._cache = None
            self._image_ids = manifest["image_id"].astype(str).tolist()
            self._labels = manifest["label"].to_numpy(np.float64)
            self._has_mask = manifest_has_mask(manifest)
        self.transform = transform
        self.size = size
        self.in_channels = in_channels
        self.boxes = None if boxes is None else check_box_fractions(boxes, len(self), "boxes")
        self._seeded_pid: int | None = None

    def __len__(self) -> int:
        return len(self._image_ids)

    @property
    def labels(self) -> np.ndarray:
        """float64 [N] manifest labels (1 positive, 0 negative, -1 uncertain, NaN unknown),
        as :class:`~ssl_ptx.data.samplers.PositiveRateSampler` expects."""
        return self._labels

    @property
    def image_ids(self) -> list[str]:
        return self._image_ids

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is not None:
            try:
                image, mask = self._cache[index]
            except (OSError, ValueError) as error:
                raise SampleReadError(
                    self._image_ids[index], f"{self._cache.path} row {index}", str(error)
                ) from error
        else:
            row = {column: values[index] for column, values in self._columns.items()}
            image, mask, _ = read_sample(row, self.size if self.boxes is None else None)
        if self.boxes is None:
            return image, mask
        box = Box.from_fractions(self.boxes[index], image.shape)
        size = self.size if self.size is not None else (box.height, box.width)
        return crop(image, box, size), crop_mask(mask, box, size)

    def _reseed_transform_in_worker(self) -> None:
        """Give each DataLoader worker its own augmentation stream (once per process)."""
        pid = os.getpid()
        if self._seeded_pid == pid:
            return
        self._seeded_pid = pid
        worker = get_worker_info()
        if worker is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(worker.seed % 2**32)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        image, mask = self._load(index)
        if self.transform is not None:
            self._reseed_transform_in_worker()
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        has_mask = bool(self._has_mask[index])
        label = float(mask.any()) if has_mask else float(self._labels[index])
        if image.ndim != 2 or image.dtype != np.uint8:
            raise ValueError(
                f"image {self._image_ids[index]!r}: expected a uint8 grey H×W image after the "
                f"transform, got {image.dtype} {image.shape} (normalise in the model, not here)"
            )
        image_tensor = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0)
        return {
            "image": image_tensor.unsqueeze(0).expand(self.in_channels, -1, -1).contiguous(),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)).float().unsqueeze(0),
            "label": torch.tensor(label, dtype=torch.float32),
            "has_mask": torch.tensor(has_mask),
            "image_id": self._image_ids[index],
            "index": index,
        }
