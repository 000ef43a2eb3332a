"""Albumentations 2.x augmentation pipelines of the SIIM-ACR winning solutions.

Every pipeline takes ``image`` (uint8, H×W grey or H×W×C) and ``mask`` (uint8 0/1, H×W) and
returns them at ``size``×``size`` with the same dtypes: masks are always resampled with
nearest-neighbour interpolation, so they stay binary; images stay uint8 (the dataset converts
them to float). Validation pipelines (``train=False``) only resize.

Presets (``TRAIN_PRESETS``; add your own with :func:`register_preset`):

``"sneddy"`` (1st place, ``train_transforms_complex_1024_old.json``)
    HFlip .5; OneOf(contrast ±.2, gamma 80–120, brightness ±.2) .3; OneOf(elastic α 120 σ 6,
    grid 5 steps ±.3, optical ±2) .3; affine shift ±.0625, scale ±.1, rotate ±45 p .5; resize.
    Albumentations 2.x has no ``alpha_affine`` (elastic) nor ``shift_limit`` (optical): those
    parts of the 0.3.1 configuration are dropped.
``"amirassov"`` (4th place, ``train_transforms_768.yaml``)
    HFlip .5; brightness/contrast ±.2 p .3; OneOf(elastic, grid, optical; library defaults,
    constant border) .3; affine shift ±.2, scale ±.2, rotate ±20 p .5; resize to 1.5×size then
    a random size×size crop (the original trained on 512 crops of 768 images).
``"bestfitting"`` (3rd place, "aug9")
    Exactly one of eight operations per sample, each with probability 1/8: identity, hflip,
    rotation in [-30°, 30°] (the original drew an integer angle; here it is continuous),
    crop of up to 10 % per side resized back, a black square of side 20 % in image and mask,
    brightness ×(1 − a), brightness + a·max (a ~ U(-.2, .2)), Gaussian blur σ ~ U(0, .3).
    Then resize.
``"light"``
    HFlip .5; small affine (shift ±.05, scale ±.05, rotate ±10) p .5; brightness/contrast ±.1
    p .5; resize. For tests and demos.

Affine borders are constant zero in image and mask throughout.
"""

from __future__ import annotations

from collections.abc import Callable

import albumentations as A
import cv2

__all__ = [
    "TRAIN_PRESETS",
    "TransformList",
    "build_transforms",
    "register_preset",
]

TransformList = list[A.BasicTransform]
#: preset name → function of the output side (pixels) returning the training transforms,
#: which must end at size×size.
TRAIN_PRESETS: dict[str, Callable[[int], TransformList]] = {}


def register_preset(
    name: str,
) -> Callable[[Callable[[int], TransformList]], Callable[[int], TransformList]]:
    """Decorator registering a training preset under ``name`` in :data:`TRAIN_PRESETS`.

    The decorated function takes the output side in pixels and returns a list of transforms
    whose output is size×size. Masks are forced to nearest interpolation by
    :func:`build_transforms`, whatever the transforms say.

    Example:
        >>> @register_preset("flip_only")
        ... def flip_only(size: int) -> TransformList:
        ...     return [A.HorizontalFlip(p=0.5), A.Resize(size, size)]
    """

    def add(factory: Callable[[int], TransformList]) -> Callable[[int], TransformList]:
        if name in TRAIN_PRESETS:
            raise ValueError(f"transform preset {name!r} is already registered")
        TRAIN_PRESETS[name] = factory
        return factory

    return add


def _affine(shift: float, scale: float, rotate: float, p: float) -> A.Affine:
    """The albumentations 2.x replacement of ``ShiftScaleRotate(shift, scale, rotate)``."""
    return A.Affine(
        translate_percent=(-shift, shift),
        scale=(1.0 - scale, 1.0 + scale),
        rotate=(-rotate, rotate),
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        fill_mask=0,
        p=p,
    )


def _brightness(limit: float, p: float = 1.0) -> A.RandomBrightnessContrast:
    """Additive brightness: ``image + a·max`` with ``a ~ U(-limit, limit)``."""
    return A.RandomBrightnessContrast(brightness_limit=limit, contrast_limit=0.0, p=p)


def _contrast(limit: float, p: float = 1.0) -> A.RandomBrightnessContrast:
    """Multiplicative contrast: ``image·(1 + a)`` with ``a ~ U(-limit, limit)``."""
    return A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=limit, p=p)


@register_preset("sneddy")
def sneddy(size: int) -> TransformList:
    """1st place (sneddy): see the module docstring."""
    return [
        A.HorizontalFlip(p=0.5),
        A.OneOf(
            [_contrast(0.2), A.RandomGamma(gamma_limit=(80, 120), p=1.0), _brightness(0.2)],
            p=0.3,
        ),
        A.OneOf(
            [
                A.ElasticTransform(alpha=120, sigma=6, p=1.0),
                A.GridDistortion(num_steps=5, distort_limit=0.3, p=1.0),
                A.OpticalDistortion(distort_limit=2.0, p=1.0),
            ],
            p=0.3,
        ),
        _affine(shift=0.0625, scale=0.1, rotate=45, p=0.5),
        A.Resize(size, size),
    ]


@register_preset("amirassov")
def amirassov(size: int) -> TransformList:
    """4th place (amirassov): see the module docstring. Trains on crops of a 1.5× resize."""
    resized = round(1.5 * size)
    return [
        A.HorizontalFlip(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.3),
        A.OneOf(
            [
                A.ElasticTransform(border_mode=cv2.BORDER_CONSTANT, p=1.0),
                A.GridDistortion(border_mode=cv2.BORDER_CONSTANT, p=1.0),
                A.OpticalDistortion(border_mode=cv2.BORDER_CONSTANT, p=1.0),
            ],
            p=0.3,
        ),
        _affine(shift=0.2, scale=0.2, rotate=20, p=0.5),
        A.Resize(resized, resized),
        A.RandomCrop(size, size),
    ]


@register_preset("bestfitting")
def bestfitting(size: int) -> TransformList:
    """3rd place (bestfitting) "aug9": exactly one of eight operations, then resize."""
    operations = [
        A.NoOp(p=1.0),
        A.HorizontalFlip(p=1.0),
        A.Rotate(limit=(-30, 30), border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=1.0),
        A.CropAndPad(percent=(-0.1, 0.0), keep_size=True, sample_independently=True, p=1.0),
        A.CoarseDropout(
            num_holes_range=(1, 1),
            hole_height_range=(0.2, 0.2),
            hole_width_range=(0.2, 0.2),
            fill=0,
            fill_mask=0,
            p=1.0,
        ),
        _contrast(0.2),
        _brightness(0.2),
        A.GaussianBlur(blur_limit=0, sigma_limit=(0.0, 0.3), p=1.0),
    ]
    return [A.OneOf(operations, p=1.0), A.Resize(size, size)]


@register_preset("light")
def light(size: int) -> TransformList:
    """Mild augmentation for tests and demos: see the module docstring."""
    return [
        A.HorizontalFlip(p=0.5),
        _affine(shift=0.05, scale=0.05, rotate=10, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        A.Resize(size, size),
    ]


def build_transforms(
    name: str,
    size: int,
    *,
    train: bool,
    random_sized_crop: float | None = None,
    seed: int | None = None,
) -> A.Compose:
    """Build a preset pipeline.

    Args:
        name: a key of :data:`TRAIN_PRESETS` ("sneddy", "amirassov", "bestfitting", "light", or
            one added with :func:`register_preset`).
        size: output side in pixels; outputs are size×size.
        train: the preset's augmentations when True; a plain resize when False.
        random_sized_crop: training only: after the preset, crop a random square whose side is
            between ``random_sized_crop``·size and size, and resize it back to size×size
            (``A.RandomSizedCrop``, always applied). None: no such crop.
        seed: seed of the pipeline's own random state (albumentations ignores the global
            seeds). :class:`~ssl_ptx.data.datasets.SegmentationDataset` reseeds it per
            DataLoader worker.

    Returns:
        An ``A.Compose`` called as ``pipeline(image=image, mask=mask)``; masks use nearest
        interpolation everywhere.
    """
    if name not in TRAIN_PRESETS:
        raise KeyError(f"unknown transform preset {name!r}; known: {sorted(TRAIN_PRESETS)}")
    if size <= 0:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if random_sized_crop is not None and not 0.0 < random_sized_crop <= 1.0:
        raise ValueError(f"random_sized_crop must be in (0, 1], got {random_sized_crop}")
    if not train:
        return A.Compose([A.Resize(size, size)], mask_interpolation=cv2.INTER_NEAREST, seed=seed)
    transforms = TRAIN_PRESETS[name](size)
    if random_sized_crop is not None:
        smallest = max(1, round(random_sized_crop * size))
        transforms.append(
            A.RandomSizedCrop(min_max_height=(smallest, size), size=(size, size), p=1.0)
        )
    return A.Compose(transforms, mask_interpolation=cv2.INTER_NEAREST, seed=seed)
