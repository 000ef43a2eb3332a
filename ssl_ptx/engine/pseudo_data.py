"""Training data of a pseudo-label run: the SIIM training fold plus a pseudo set at a ratio.

:func:`build_pseudo_datasets` joins the SIIM training fold of a data config (with its
``labelled_fraction``) and the images of a pseudo manifest written by
:class:`ssl_ptx.pseudo.PseudoLabelFilter` (cached once in HDF5 like any manifest, lung boxes
too when ``data.lung_crop`` is set) into one ``ConcatDataset``; :func:`build_pseudo_train_loader`
draws from it with :class:`~ssl_ptx.data.mixing.RatioMixSampler`: every SIIM training image
plus a fresh draw of pseudo images per epoch, at the data config's positive rate, sharded over
DDP processes. The Trainer stores the sampler's state in ``last.pt`` like any other.

Soft pseudo labels (rows with ``soft`` True, written by ``PseudoLabelFilter(soft=True)``) are
served by :class:`SoftTargetDataset`: their ``mask`` is the stored probability map (float in
[0, 1], through the same augmentation as the image) instead of the binary pseudo mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from ssl_ptx.config import ConfigError, DataConfig, TrainConfig
from ssl_ptx.data import rle
from ssl_ptx.data.cache import CacheReader, manifest_fingerprint
from ssl_ptx.data.datasets import SegmentationDataset
from ssl_ptx.data.images import resize_image, resize_mask
from ssl_ptx.data.mixing import RatioMixSampler
from ssl_ptx.engine.data import (
    _transforms,
    build_cached_dataset,
    build_siim_datasets,
    manifest_cache_path,
)
from ssl_ptx.engine.loaders import (
    build_train_loader,
    positive_rate_schedule,
    sampled_train_loader,
)
from ssl_ptx.losses import IGNORE_TARGET
from ssl_ptx.lung_crop import Box, crop, crop_mask
from ssl_ptx.pseudo import SoftMaps, read_pseudo_manifest

__all__ = [
    "IgnoreBandDataset",
    "PseudoDatasets",
    "SoftTargetDataset",
    "build_pseudo_datasets",
    "bands_of",
    "build_pseudo_train_loader",
    "build_training_stream",
    "soft_maps_of",
]


@dataclass
class PseudoDatasets:
    """The datasets of a pseudo-label run.

    Attributes:
        train: ``ConcatDataset([siim, pseudo])``, the index space of :class:`RatioMixSampler`.
        siim: the SIIM training images (``labels``).
        pseudo: the pseudo images (``labels`` = pseudo labels).
        val: the SIIM validation fold.
    """

    train: ConcatDataset
    siim: Dataset
    pseudo: SegmentationDataset
    val: Dataset


class SoftTargetDataset(SegmentationDataset):
    """A :class:`SegmentationDataset` whose images with a soft pseudo label get it as ``mask``.

    For those images the stored ``uint8`` map (``round(255·p)`` at native size) is resized to
    the image (and cut to its box with ``boxes``), augmented with the image as its mask (the
    geometric transforms move it, nearest-neighbour), and returned as float ``[1, H, W]`` in
    [0, 1]; ``label`` is 1 where any pixel of it is > 0.5. Other images are served as by
    :class:`SegmentationDataset`.

    Args:
        source, transform, size, in_channels, boxes: as :class:`SegmentationDataset`.
        soft_maps: the soft labels (:class:`~ssl_ptx.pseudo.SoftMaps`), by image id.
    """

    def __init__(
        self, source: Any, transform: Any = None, *, soft_maps: SoftMaps, **kwargs: Any
    ) -> None:
        super().__init__(source, transform, **kwargs)
        self.soft_maps = soft_maps
        self.is_soft = np.array([image_id in soft_maps for image_id in self.image_ids], bool)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = super()._load(index)
        if not self.is_soft[index]:
            return image, mask
        soft = self.soft_maps[self.image_ids[index]]
        if self.boxes is None:
            return image, resize_image(soft, image.shape)
        # the box is cut from the cached image (size²) or from the native one
        full = (self._cache.size,) * 2 if self._cache is not None else soft.shape
        soft = resize_image(soft, full)
        return image, crop(soft, Box.from_fractions(self.boxes[index], full), image.shape)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        if self.is_soft[index]:
            sample["mask"] = sample["mask"] / 255.0
            sample["label"] = (sample["mask"] > 0.5).any().float()
        return sample


class IgnoreBandDataset(SegmentationDataset):
    """A :class:`SegmentationDataset` whose pseudo images with a confidence band get the band's
    pixels marked :data:`~ssl_ptx.losses.IGNORE_TARGET` in ``mask``, so that the Trainer
    leaves them out of the loss instead of calling them background.

    The band (``ignore_rle`` of the pseudo manifest, written by ``PseudoLabelFilter(band=…)``,
    at native size) is resized like the mask (and cut to its box with ``boxes``) and moved by
    the same augmentation (nearest-neighbour); ``label`` says whether a foreground pixel (1)
    remains. Other images are served as by :class:`SegmentationDataset`.

    Args:
        source, transform, size, in_channels, boxes: as :class:`SegmentationDataset`.
        bands: image id → (band RLE, native height, native width).
    """

    def __init__(
        self,
        source: Any,
        transform: Any = None,
        *,
        bands: Mapping[str, tuple[str, int, int]],
        **kwargs: Any,
    ) -> None:
        super().__init__(source, transform, **kwargs)
        self.bands = dict(bands)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = super()._load(index)
        band = self.bands.get(self.image_ids[index])
        if band is None:
            return image, mask
        native = rle.decode(band[0], (band[1], band[2]))
        if self.boxes is None:
            ignore = resize_mask(native, image.shape)
        else:  # the box is cut from the cached image (size²) or from the native one
            full = (self._cache.size,) * 2 if self._cache is not None else native.shape
            box = Box.from_fractions(self.boxes[index], full)
            ignore = crop_mask(resize_mask(native, full), box, image.shape)
        return image, np.where(ignore > 0, np.uint8(IGNORE_TARGET), mask).astype(mask.dtype)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        if self.image_ids[index] in self.bands:
            sample["label"] = (sample["mask"] == 1).any().float()
        return sample


def bands_of(manifest: pd.DataFrame) -> dict[str, tuple[str, int, int]]:
    """Image id → (band RLE, height, width) of the pseudo manifest's rows with a non-empty
    ``ignore_rle`` (none without that column)."""
    if "ignore_rle" not in manifest.columns:
        return {}
    rows = manifest[manifest["ignore_rle"].notna() & (manifest["ignore_rle"] != "-1")]
    return {
        str(row.image_id): (str(row.ignore_rle), int(row.height), int(row.width))
        for row in rows.itertuples()
    }


def soft_maps_of(manifest: pd.DataFrame) -> SoftMaps | None:
    """The soft labels of a pseudo manifest's ``soft`` rows (None when it has none).

    Raises:
        ConfigError: the soft rows name several ``soft_masks`` files, or a missing one.
    """
    if "soft" not in manifest.columns:
        return None
    rows = manifest[manifest["soft"].astype(bool)]
    if not len(rows):
        return None
    paths = sorted(rows["soft_masks"].astype(str).unique())
    if len(paths) != 1:
        raise ConfigError(
            f"the pseudo manifest's soft rows name {len(paths)} soft_masks files {paths}; "
            "build one pseudo manifest per filter run"
        )
    try:
        return SoftMaps(paths[0])
    except FileNotFoundError as error:
        raise ConfigError(f"pseudo manifest: {error}") from None


def _pseudo_dataset(
    manifest: pd.DataFrame, config: DataConfig, in_channels: int, progress: bool
) -> SegmentationDataset:
    """The pseudo images with the training augmentation, cached under a name that follows the
    masks (a new teacher's labels get a new cache), cut to lung boxes with ``lung_crop``, with
    soft targets for the rows that have them."""
    name = f"pseudo-{manifest_fingerprint(manifest)[:10]}"
    transform = _transforms(config, True)
    dataset = build_cached_dataset(
        manifest,
        transform,
        size=config.cache_size or config.size,
        cache_dir=config.cache_dir,
        name=name,
        in_channels=in_channels,
        progress=progress,
    )
    soft_maps, bands = soft_maps_of(manifest), bands_of(manifest)
    if soft_maps is not None and bands:
        raise ConfigError(
            "the pseudo manifest has both soft targets and confidence bands; a soft target "
            "already carries the uncertainty: filter with one of soft / band"
        )
    if config.lung_crop is None and soft_maps is None and not bands:
        return dataset
    side = config.cache_size or config.size
    source: pd.DataFrame | CacheReader = manifest
    if config.cache_dir is not None:
        source = CacheReader(manifest_cache_path(manifest, config.cache_dir, side, name))
    options: dict[str, Any] = {"in_channels": in_channels}
    if config.lung_crop is not None:
        if config.cache_dir is None:
            raise ConfigError("data.lung_crop with pseudo labels needs data.cache_dir")
        from ssl_ptx.engine.lung_data import cache_lung_boxes  # lung_data imports engine.data

        boxes = cache_lung_boxes(source, config.lung_crop, progress=progress).boxes
        options.update(boxes=boxes, size=config.size)
    elif config.cache_dir is None:
        options.update(size=side)
    if soft_maps is not None:
        return SoftTargetDataset(source, transform, soft_maps=soft_maps, **options)
    if bands:
        return IgnoreBandDataset(source, transform, bands=bands, **options)
    return SegmentationDataset(source, transform, **options)


def build_pseudo_datasets(
    config: DataConfig,
    pseudo_manifest: pd.DataFrame,
    *,
    in_channels: int = 1,
    progress: bool = True,
) -> PseudoDatasets:
    """SIIM fold ``config.fold`` (:func:`~ssl_ptx.engine.data.build_siim_datasets`) and the
    pseudo manifest's images, both with ``config.augment``.

    Raises:
        ConfigError: the pseudo manifest is empty or has labels other than 1 and 0.
    """
    labels = pseudo_manifest["label"].to_numpy(np.float64) if len(pseudo_manifest) else None
    if labels is None or not np.isin(labels, (0.0, 1.0)).all():
        raise ConfigError(
            "the pseudo manifest must hold at least one image, all labelled 1 or 0 "
            f"(got {len(pseudo_manifest)} rows)"
        )
    siim, val, _ = build_siim_datasets(config, in_channels=in_channels, progress=progress)
    if config.cache_size is not None and config.lung_crop is None:
        config = dataclasses.replace(config, cache_size=None)  # the pseudo cache at size²
    pseudo = _pseudo_dataset(pseudo_manifest, config, in_channels, progress)
    return PseudoDatasets(ConcatDataset([siim, pseudo]), siim, pseudo, val)


def build_pseudo_train_loader(
    datasets: PseudoDatasets,
    config: DataConfig,
    *,
    ratio: float,
    epochs: int,
    seed: int,
    world_size: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """The training DataLoader over ``datasets.train`` with a :class:`RatioMixSampler`.

    Args:
        datasets: from :func:`build_pseudo_datasets`.
        config: the data section: ``batch_size`` (global), ``num_workers``, ``positive_rate``
            (constant or linear to ``positive_rate_end`` over ``positive_rate_epochs`` or
            ``epochs``; None = every pooled image once).
        ratio: pseudo positives per SIIM positive per epoch (3rd place: 0.5).
        epochs: length of the run.
        seed: seed of the draws and of the loader's generator.
        world_size, rank: the DDP layout.
        pin_memory: pin host memory (when training on CUDA).
    """
    sampler = RatioMixSampler(
        datasets.siim.labels,
        datasets.pseudo.labels,
        ratio,
        positive_rate=positive_rate_schedule(config, epochs),
        seed=seed,
        num_replicas=world_size,
        rank=rank,
    )
    return sampled_train_loader(
        datasets.train, sampler, config, world_size=world_size, seed=seed, pin_memory=pin_memory
    )


def build_training_stream(
    config: TrainConfig,
    labelled: Dataset,
    *,
    progress: bool = True,
    world_size: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """The labelled training stream of a run: ``labelled`` (the SIIM training images with
    masks) alone, or, when ``config.pseudo.dir`` names a finished filter's folder, the SIIM
    training fold of ``config.data`` plus its pseudo labels at ``config.pseudo.ratio``
    (:func:`build_pseudo_datasets`, :func:`build_pseudo_train_loader`).

    Raises:
        FileNotFoundError: ``pseudo.dir`` holds no ``pseudo_manifest.csv``.
    """
    options = {
        "epochs": config.trainer.epochs,
        "seed": config.trainer.seed,
        "world_size": world_size,
        "rank": rank,
        "pin_memory": pin_memory,
    }
    if config.pseudo.dir is None:
        return build_train_loader(labelled, config.data, **options)
    datasets = build_pseudo_datasets(
        config.data,
        read_pseudo_manifest(config.pseudo.dir),
        in_channels=config.model.in_channels,
        progress=progress,
    )
    return build_pseudo_train_loader(datasets, config.data, ratio=config.pseudo.ratio, **options)
