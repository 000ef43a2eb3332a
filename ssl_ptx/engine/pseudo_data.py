"""Training data of a pseudo-label run: the SIIM training fold plus a pseudo set at a ratio.

:func:`build_pseudo_datasets` joins the SIIM training fold of a data config (with its
``labelled_fraction``) and the images of a pseudo manifest written by
:class:`ssl_ptx.pseudo.PseudoLabelFilter` (cached once in HDF5 like any manifest, lung boxes
too when ``data.lung_crop`` is set) into one ``ConcatDataset``; :func:`build_pseudo_train_loader`
draws from it with :class:`~ssl_ptx.data.mixing.RatioMixSampler`: every SIIM training image
plus a fresh draw of pseudo images per epoch, at the data config's positive rate, sharded over
DDP processes. The Trainer stores the sampler's state in ``last.pt`` like any other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from ssl_ptx.config import ConfigError, DataConfig
from ssl_ptx.data.cache import CacheReader, manifest_fingerprint
from ssl_ptx.data.datasets import SegmentationDataset
from ssl_ptx.data.mixing import RatioMixSampler
from ssl_ptx.data.samplers import ConstantSchedule, LinearSchedule
from ssl_ptx.engine.data import (
    _transforms,
    build_cached_dataset,
    build_siim_datasets,
    manifest_cache_path,
)

__all__ = ["PseudoDatasets", "build_pseudo_datasets", "build_pseudo_train_loader"]


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


def _pseudo_dataset(
    manifest: pd.DataFrame, config: DataConfig, in_channels: int, progress: bool
) -> SegmentationDataset:
    """The pseudo images with the training augmentation, cached under a name that follows the
    masks (a new teacher's labels get a new cache), cut to lung boxes with ``lung_crop``."""
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
    if config.lung_crop is None:
        return dataset
    if config.cache_dir is None:
        raise ConfigError("data.lung_crop with pseudo labels needs data.cache_dir")
    from ssl_ptx.engine.lung_data import cache_lung_boxes  # lung_data imports engine.data

    side = config.cache_size or config.size
    cache = CacheReader(manifest_cache_path(manifest, config.cache_dir, side, name))
    boxes = cache_lung_boxes(cache, config.lung_crop, progress=progress).boxes
    return SegmentationDataset(
        cache, transform, in_channels=in_channels, boxes=boxes, size=config.size
    )


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
    if config.batch_size % world_size:
        raise ConfigError(
            f"data.batch_size={config.batch_size} is the global batch and must divide evenly "
            f"over {world_size} processes"
        )
    rate = None
    if config.positive_rate is not None:
        rate = ConstantSchedule(config.positive_rate)
        if config.positive_rate_end is not None:
            rate = LinearSchedule(
                config.positive_rate,
                config.positive_rate_end,
                config.positive_rate_epochs or epochs,
            )
    sampler = RatioMixSampler(
        datasets.siim.labels,
        datasets.pseudo.labels,
        ratio,
        positive_rate=rate,
        seed=seed,
        num_replicas=world_size,
        rank=rank,
    )
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        datasets.train,
        batch_size=config.batch_size // world_size,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        generator=generator,
        persistent_workers=False,
    )
