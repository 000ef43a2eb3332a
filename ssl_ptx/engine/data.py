"""SIIM training and validation datasets from a data config (demo root, cache, folds).

:func:`build_siim_datasets` reads a SIIM root (or writes, then reads, the demo root), decodes
the images once into an HDF5 cache shared by later runs, splits by fold and keeps
``data.labelled_fraction`` of the training images (:func:`split_labelled`). For
semi-supervised runs, :func:`build_semi_datasets` adds the unlabelled images: the SIIM
training images whose masks are not kept and an external manifest (e.g. NIH ChestX-ray14
read by ``external_data.nih``, chosen by :func:`select_unlabelled`), cached the same way
(:func:`build_cached_dataset`). The loaders that draw from these datasets are in
:mod:`ssl_ptx.engine.loaders`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
from torch.utils.data import ConcatDataset, Dataset, Subset

from ssl_ptx.config import ConfigError, DataConfig, MeanTeacherTrainConfig
from ssl_ptx.data.cache import CacheReader, build_cache
from ssl_ptx.data.datasets import SegmentationDataset
from ssl_ptx.data.demo import write_demo_root
from ssl_ptx.data.siim import find_label_csv, load_siim
from ssl_ptx.data.transforms import build_transforms
from ssl_ptx.engine.distributed import barrier, init_distributed

__all__ = [
    "LabelledSubset",
    "build_cached_dataset",
    "build_semi_datasets",
    "build_siim_datasets",
    "ensure_demo_root",
    "manifest_cache_path",
    "select_unlabelled",
    "siim_cache_path",
    "split_labelled",
]

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


def manifest_cache_path(
    manifest: pd.DataFrame, cache_dir: str | os.PathLike, size: int, name: str
) -> Path:
    """``<cache_dir>/<name>-<key>-<size>.h5``; the key follows the manifest's image ids and
    paths, so another selection of images gets another cache."""
    rows = pd.util.hash_pandas_object(manifest[["image_id", "path"]].astype(str), index=False)
    key = hashlib.sha1(rows.to_numpy().tobytes()).hexdigest()[:10]
    return Path(cache_dir) / f"{name}-{key}-{size}.h5"


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
    ``fold_seed``; with ``cache_dir`` set the images are read from an HDF5 cache at
    ``cache_size``² (default ``size``²; built on first use, see :func:`siim_cache_path`),
    otherwise from the DICOMs. With ``lung_crop`` (a lung checkpoint) every image and mask is
    cut to its lung box before augmentation (boxes computed once and stored in the cache, see
    :func:`ssl_ptx.engine.lung_data.cache_lung_boxes`).

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
        return _keep_labelled(train, config), val, manifest
    side = config.cache_size or config.size
    cache = _open_cache(manifest, siim_cache_path(siim_dir, config.cache_dir, side), side, progress)
    crop = {}
    if config.lung_crop is not None:  # each image cut to its lung box, resized to size
        from ssl_ptx.engine.lung_data import cache_lung_boxes  # lung_data imports this module

        boxes = cache_lung_boxes(cache, config.lung_crop, progress=progress).boxes
        crop = {"boxes": boxes, "size": config.size}
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
        SegmentationDataset(cache, train_transform, in_channels=in_channels, **crop),
        cache_rows[~is_val & cached].tolist(),
    )
    val = LabelledSubset(
        SegmentationDataset(cache, val_transform, in_channels=in_channels, **crop),
        cache_rows[is_val & cached].tolist(),
    )
    return _keep_labelled(train, config), val, manifest


def split_labelled(
    dataset: Dataset, fraction: float, seed: int
) -> tuple[LabelledSubset, LabelledSubset]:
    """Split ``dataset`` into the images whose masks are kept and the rest, per label.

    From every label value (1, 0, others, NaN) ``max(1, round(fraction · n))`` of its ``n``
    images are drawn without replacement by ``numpy.random.default_rng(seed)``, so the kept
    share of positives equals that of negatives and the same seed keeps the same images.

    Args:
        dataset: a dataset with a ``labels`` array (a SegmentationDataset or LabelledSubset;
            a Subset is flattened onto the dataset it wraps).
        fraction: share kept, in (0, 1].
        seed: seed of the draw.

    Returns:
        ``(kept, rest)``, both :class:`LabelledSubset` in ascending index order.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(dataset.labels, dtype=np.float64)
    groups = np.where(np.isnan(labels), np.inf, labels)  # NaN labels form one group
    rng = np.random.default_rng(seed)
    kept = np.zeros(len(labels), bool)
    for value in np.unique(groups):
        members = np.flatnonzero(groups == value)
        count = max(1, round(fraction * members.size))
        kept[rng.choice(members, size=count, replace=False)] = True
    base, indices = dataset, np.arange(len(labels))
    if isinstance(dataset, Subset):
        base, indices = dataset.dataset, np.asarray(dataset.indices, dtype=np.int64)
    return (
        LabelledSubset(base, indices[kept].tolist()),
        LabelledSubset(base, indices[~kept].tolist()),
    )


def _keep_labelled(train: Dataset, config: DataConfig) -> Dataset:
    """``train`` itself, or its kept part when ``config.labelled_fraction`` < 1."""
    if config.labelled_fraction >= 1.0:
        return train
    kept, _ = split_labelled(train, config.labelled_fraction, config.labelled_seed)
    logger.info(
        "data.labelled_fraction=%g: %d of %d training images keep their masks (%d positive)",
        config.labelled_fraction,
        len(kept),
        len(train),
        int((kept.labels == 1).sum()),
    )
    return kept


def select_unlabelled(
    manifest: pd.DataFrame, select: str = "all", *, max_images: int | None = None, seed: int = 0
) -> pd.DataFrame:
    """The rows of an external manifest to use as unlabelled images.

    Args:
        manifest: e.g. ``external_data.nih.load(root, exclude_ids=...)``.
        select: "all", or "pneumothorax": rows whose ``label`` is 1.
        max_images: keep at most this many, drawn by ``numpy.random.default_rng(seed)`` (file
            order kept); None = all.
        seed: seed of that draw.

    Raises:
        ValueError: an unknown ``select``, or no row left.
    """
    if select not in ("all", "pneumothorax"):
        raise ValueError(f"select must be 'all' or 'pneumothorax', got {select!r}")
    rows = manifest if select == "all" else manifest[manifest["label"] == 1.0]
    if max_images is not None and len(rows) > max_images:
        chosen = np.random.default_rng(seed).choice(len(rows), size=max_images, replace=False)
        rows = rows.iloc[np.sort(chosen)]
    if rows.empty:
        raise ValueError(f"no unlabelled image: {len(manifest)} rows, select={select!r} keeps none")
    return rows.reset_index(drop=True)


def build_cached_dataset(
    manifest: pd.DataFrame,
    transform: A.Compose,
    *,
    size: int,
    cache_dir: str | os.PathLike | None,
    name: str,
    in_channels: int = 1,
    progress: bool = True,
) -> SegmentationDataset:
    """A dataset over every row of ``manifest``, read once into an HDF5 cache at ``size``²
    (``<cache_dir>/<name>-<key>-<size>.h5``, see :func:`manifest_cache_path`; built on first
    use by rank 0) or, with ``cache_dir`` None, read and resized at every access.

    Rows that cannot be read are left out of the cache (a warning says how many).
    """
    if cache_dir is None:
        return SegmentationDataset(manifest, transform, size=size, in_channels=in_channels)
    path = manifest_cache_path(manifest, cache_dir, size, name)
    cache = _open_cache(manifest, path, size, progress)
    if len(cache) < len(manifest):
        logger.warning(
            "%d of %d %s image(s) could not be read and are left out (see %s)",
            len(manifest) - len(cache),
            len(manifest),
            name,
            path.with_name(path.name + ".skipped.csv"),
        )
    return SegmentationDataset(cache, transform, in_channels=in_channels)


def build_semi_datasets(
    config: MeanTeacherTrainConfig,
    external: pd.DataFrame | None,
    *,
    external_name: str = "nih",
    progress: bool = True,
) -> tuple[Dataset, Dataset, Dataset]:
    """Labelled, unlabelled and validation datasets of a Mean Teacher run.

    Labelled: fold ``data.fold``'s training images, ``data.labelled_fraction`` of them
    (:func:`split_labelled` with ``data.labelled_seed``). Unlabelled, with the training
    augmentation (the geometry both views of an image share): the other training images when
    ``unlabelled.siim_rest``, and the rows of ``external`` (cached as ``<external_name>-…``)
    when given.

    Returns:
        ``(labelled, unlabelled, val)``.

    Raises:
        ConfigError: no unlabelled image at all.
    """
    data = config.data
    in_channels = config.model.in_channels
    full = dataclasses.replace(data, labelled_fraction=1.0)
    train, val, _ = build_siim_datasets(full, in_channels=in_channels, progress=progress)
    labelled, rest = train, None
    if data.labelled_fraction < 1.0:
        labelled, rest = split_labelled(train, data.labelled_fraction, data.labelled_seed)
    parts: list[Dataset] = []
    if config.unlabelled.siim_rest and rest is not None and len(rest):
        parts.append(rest)
    if external is not None:
        parts.append(
            build_cached_dataset(
                external,
                _transforms(data, True),
                size=data.size,
                cache_dir=data.cache_dir,
                name=external_name,
                in_channels=in_channels,
                progress=progress,
            )
        )
    if not parts:
        raise ConfigError(
            "unlabelled: no unlabelled image: enable unlabelled.nih, or unlabelled.siim_rest "
            "with data.labelled_fraction < 1"
        )
    unlabelled = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    logger.info(
        "%d labelled (%d positive), %d unlabelled, %d validation images",
        len(labelled),
        int((np.asarray(labelled.labels) == 1).sum()),
        len(unlabelled),
        len(val),
    )
    return labelled, unlabelled, val
