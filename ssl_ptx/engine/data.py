"""SIIM training and validation datasets from a data config (demo root, cache, folds).

:func:`build_siim_datasets` reads a SIIM root (or writes, then reads, the demo root), decodes
the images once into an HDF5 cache shared by later runs, and splits by fold. The loaders
that draw from these datasets are in :mod:`ssl_ptx.engine.loaders`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
from torch.utils.data import Dataset, Subset

from ssl_ptx.config import ConfigError, DataConfig
from ssl_ptx.data.cache import CacheReader, build_cache
from ssl_ptx.data.datasets import SegmentationDataset
from ssl_ptx.data.demo import write_demo_root
from ssl_ptx.data.siim import find_label_csv, load_siim
from ssl_ptx.data.transforms import build_transforms
from ssl_ptx.engine.distributed import barrier, init_distributed

__all__ = ["LabelledSubset", "build_siim_datasets", "ensure_demo_root", "siim_cache_path"]

logger = logging.getLogger(__name__)


class LabelledSubset(Subset):
    """A :class:`~torch.utils.data.Subset` that keeps the per-sample ``labels`` the
    positive-rate sampler needs (``dataset.labels[indices]``)."""

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.dataset.labels)[np.asarray(self.indices, dtype=np.int64)]


def ensure_demo_root(
    demo_dir: str | os.PathLike, *, n_images: int, size: int, progress: bool
) -> Path:
    """The SIIM folder of the demo root ``demo_dir``, written first if it is not there.

    Under DDP rank 0 writes while the others wait.
    """
    siim = Path(demo_dir) / "siim"
    if not (siim / "train-rle.csv").is_file():
        if init_distributed().is_main:
            logger.info(
                "writing the demo data root %s (%d images at %d²)", demo_dir, n_images, size
            )
            write_demo_root(demo_dir, n_siim=n_images, size=size, seed=0, progress=progress)
        barrier()
    return siim


def siim_cache_path(siim_dir: str | os.PathLike, cache_dir: str | os.PathLike, size: int) -> Path:
    """``<cache_dir>/siim-<key>-<size>.h5``; the key follows the SIIM folder and the identity
    (path, size, modification time) of its label file, so a new download gets a new cache."""
    csv = find_label_csv(siim_dir)
    stat = csv.stat()
    identity = f"{Path(siim_dir).resolve()}|{csv.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    key = hashlib.sha1(identity.encode()).hexdigest()[:10]
    return Path(cache_dir) / f"siim-{key}-{size}.h5"


def _open_cache(manifest: pd.DataFrame, path: Path, size: int, progress: bool) -> CacheReader:
    """Build the cache on rank 0 if needed (others wait), then open it everywhere."""
    if not path.is_file() and init_distributed().is_main:
        report = build_cache(manifest, path, size=size, progress=progress)
        logger.info(
            "cache %s: %d images at %d² in %.0f s", path, report.n_written, size, report.seconds
        )
    barrier()
    return CacheReader(path)


def _transforms(config: DataConfig, train: bool) -> A.Compose:
    """The training pipeline of ``config.augment`` or, for validation, a plain resize."""
    augment = config.augment
    if augment == "none":
        train, augment = False, "light"  # validation pipeline of any preset = plain resize
    return build_transforms(
        augment,
        config.size,
        train=train,
        random_sized_crop=config.random_sized_crop if train else None,
    )


def build_siim_datasets(
    config: DataConfig, *, in_channels: int = 1, progress: bool = True
) -> tuple[Dataset, Dataset, pd.DataFrame]:
    """Training and validation datasets of fold ``config.fold``.

    The SIIM root is ``config.siim_dir``, or the demo root ``config.demo_dir`` (written when
    missing). The manifest is :func:`~ssl_ptx.data.siim.load_siim` with ``n_folds`` /
    ``fold_seed``; with ``cache_dir`` set the images are read from an HDF5 cache at ``size``²
    (built on first use, see :func:`siim_cache_path`), otherwise from the DICOMs.

    Returns:
        ``(train, val, manifest)``: datasets yielding the dicts of
        :class:`~ssl_ptx.data.datasets.SegmentationDataset` (train with ``config.augment``,
        val resized only) and the manifest with its ``fold`` column.

    Raises:
        ConfigError: the validation or the training fold is empty.
    """
    if config.siim_dir is not None:
        siim_dir = Path(config.siim_dir)
    else:
        siim_dir = ensure_demo_root(
            config.demo_dir, n_images=config.demo_images, size=config.demo_size, progress=progress
        )
    manifest = load_siim(
        siim_dir,
        n_folds=config.n_folds,
        seed=config.fold_seed,
        progress=progress and init_distributed().is_main,
    )
    is_val = (manifest["fold"] == config.fold).to_numpy()
    if not is_val.any() or is_val.all():
        raise ConfigError(
            f"data.fold={config.fold}: {siim_dir} gives {int(is_val.sum())} validation and "
            f"{int((~is_val).sum())} training images; both must be non-empty"
        )
    train_transform, val_transform = _transforms(config, True), _transforms(config, False)
    if config.cache_dir is None:
        rows = manifest.reset_index(drop=True)
        train = SegmentationDataset(
            rows[~is_val], train_transform, size=config.size, in_channels=in_channels
        )
        val = SegmentationDataset(
            rows[is_val], val_transform, size=config.size, in_channels=in_channels
        )
        return train, val, manifest
    cache = _open_cache(
        manifest, siim_cache_path(siim_dir, config.cache_dir, config.size), config.size, progress
    )
    cached_ids = set(cache.image_ids)
    cached = manifest["image_id"].isin(cached_ids).to_numpy()
    if not cached.all():
        logger.warning(
            "%d manifest image(s) are not in %s (skipped when it was built: see its "
            ".skipped.csv); they are left out. Delete the cache to rebuild it.",
            int((~cached).sum()),
            cache.path,
        )
    cache_rows = np.array(
        [cache.index_of(i) if c else -1 for i, c in zip(manifest["image_id"], cached, strict=True)]
    )
    train = LabelledSubset(
        SegmentationDataset(cache, train_transform, in_channels=in_channels),
        cache_rows[~is_val & cached].tolist(),
    )
    val = LabelledSubset(
        SegmentationDataset(cache, val_transform, in_channels=in_channels),
        cache_rows[is_val & cached].tolist(),
    )
    return train, val, manifest
