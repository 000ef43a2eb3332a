"""Lung-crop pre-segmentation: lung mask → box with margin → crop; paste predictions back.

The 3rd place of SIIM-ACR segments the lungs first, crops every X-ray to the union box of the
lungs and segments pneumothorax in the crop (more pixels where the disease is). Their rule,
stated at 1024×1024 pixels, and this module's defaults, stated as fractions so that they scale
with the image size:

==========================================  ==================  ==========================
3rd place at 1024²                          argument            default (fraction)
==========================================  ==================  ==========================
drop lung components smaller than 2000 px   min_component_area  2000 / 1024² of the area
pad the union box by 40 px on every side    margin              40 / 1024 of the side
full image when the box area < 300 × 300    min_box             300 / 1024 of the side
==========================================  ==================  ==========================

Side fractions apply per axis (``margin · H`` rows, ``margin · W`` columns; the minimum box
area is ``min_box · H × min_box · W``), which is exactly the 3rd place's rule applied to the
image squashed to 1024². Unlike their SIIM script, which crashed when no lung was found, every
failure falls back to the full image with a reason ("no_lung" or "box_too_small").

Crops are squashed to the model's square input (aspect not kept) as in the 3rd place;
``keep_aspect=True`` instead grows the shorter side of the box to a square inside the image.
Paste-back resizes a crop-level probability map to the box and places it into a canvas of the
original shape; :func:`paste_average` averages several crops with a count map, outside every
box the probability is the fill (0).

Boxes are stored as fractions of the image side (:meth:`Box.to_fractions`), which survive any
resize of the image, e.g. the squash into an HDF5 cache. :meth:`LungCropper.save` writes the
lung model, its config and the crop settings into one checkpoint that
:meth:`LungCropper.from_checkpoint` rebuilds (loaded with ``weights_only``).
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from tqdm.auto import tqdm

from ssl_ptx.data.images import resize_image, resize_mask

__all__ = [
    "FALLBACK_REASONS",
    "LUNG_CROP_KEY",
    "LUNG_REASON",
    "Box",
    "LungCropper",
    "box_from_mask",
    "crop",
    "crop_mask",
    "paste",
    "paste_average",
]

logger = logging.getLogger(__name__)

#: reasons :func:`box_from_mask` gives when it returns the full image instead of a lung box.
FALLBACK_REASONS = ("no_lung", "box_too_small")
#: key of the crop settings in a lung checkpoint (beside ``model`` and ``model_config``)
LUNG_CROP_KEY = "lung_crop"
#: the reason :func:`box_from_mask` gives with a lung box
LUNG_REASON = "lungs"
_REFERENCE_SIDE = 1024
_EIGHT_CONNECTED = np.ones((3, 3), bool)


@dataclass(frozen=True)
class Box:
    """A box in pixels of the original image: rows ``y0:y1``, columns ``x0:x1`` (ends exclusive)."""

    y0: int
    x0: int
    y1: int
    x1: int

    def __post_init__(self) -> None:
        for name in ("y0", "x0", "y1", "x1"):
            object.__setattr__(self, name, _as_int(getattr(self, name), name))
        if not (0 <= self.y0 < self.y1 and 0 <= self.x0 < self.x1):
            raise ValueError(f"invalid box {self.as_tuple()}: need 0 <= y0 < y1 and 0 <= x0 < x1")

    @classmethod
    def full(cls, shape: Sequence[int]) -> Box:
        """The box covering a whole image of shape ``(H, W, ...)``."""
        return cls(0, 0, int(shape[0]), int(shape[1]))

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def area(self) -> int:
        """Area in pixels."""
        return self.height * self.width

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, columns)`` slices selecting the box from an H×W array."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def as_tuple(self) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)``."""
        return self.y0, self.x0, self.y1, self.x1

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether the box lies inside an image of shape ``(H, W, ...)``."""
        return self.y1 <= shape[0] and self.x1 <= shape[1]

    def to_json(self) -> dict[str, int]:
        """``{"y0": .., "x0": .., "y1": .., "x1": ..}`` (JSON-serialisable)."""
        return asdict(self)

    def to_fractions(self, shape: Sequence[int]) -> tuple[float, float, float, float]:
        """``(y0 / H, x0 / W, y1 / H, x1 / W)`` for an image of shape ``(H, W, ...)``: the box
        in coordinates normalised to [0, 1], unchanged when the image is resized or squashed."""
        _check_box_fits(self, shape, "image")
        height, width = int(shape[0]), int(shape[1])
        return self.y0 / height, self.x0 / width, self.y1 / height, self.x1 / width

    @classmethod
    def from_fractions(cls, fractions: Sequence[float], shape: Sequence[int]) -> Box:
        """The pixel box of normalised ``(y0, x0, y1, x1)`` on an image of shape ``(H, W, ...)``.

        The smallest pixel box containing the fractional one (starts rounded down, ends up,
        with a tolerance of 1e-6 px for float noise), at least one pixel per side, inside the
        image. ``Box.from_fractions(box.to_fractions(shape), shape) == box``.

        Raises:
            ValueError: not four values, a value outside [0, 1], or an end before its start.
        """
        values = [float(v) for v in fractions]
        if len(values) != 4 or not all(0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"box fractions must be four values in [0, 1], got {fractions!r}")
        if values[0] >= values[2] or values[1] >= values[3]:
            raise ValueError(f"box fractions {fractions!r}: need y0 < y1 and x0 < x1")
        y0, y1 = _pixel_interval(values[0], values[2], int(shape[0]))
        x0, x1 = _pixel_interval(values[1], values[3], int(shape[1]))
        return cls(y0, x0, y1, x1)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Box:
        """Inverse of :meth:`to_json`; raises ``ValueError`` naming a missing key."""
        missing = [key for key in ("y0", "x0", "y1", "x1") if key not in data]
        if missing:
            raise ValueError(f"box dict {data!r} lacks keys {missing}")
        return cls(data["y0"], data["x0"], data["y1"], data["x1"])


def _pixel_interval(start: float, end: float, side: int) -> tuple[int, int]:
    """Pixels ``[first, last)`` covering the fractional interval ``[start, end)`` of ``side``."""
    tolerance = 1e-6
    first = min(math.floor(start * side + tolerance), side - 1)
    last = max(math.ceil(end * side - tolerance), first + 1)
    return first, min(last, side)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"Box.{name} must be an integer, got {value!r}")
    return int(value)


def _check_settings(min_component_area: float, margin: float, min_box: float) -> None:
    for name, value in (
        ("min_component_area", min_component_area),
        ("margin", margin),
        ("min_box", min_box),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"{name} is a fraction of the image and must be in [0, 1], got {value}"
            )


def box_from_mask(
    mask: np.ndarray,
    *,
    min_component_area: float = 2000 / _REFERENCE_SIDE**2,
    margin: float = 40 / _REFERENCE_SIDE,
    min_box: float = 300 / _REFERENCE_SIDE,
    keep_aspect: bool = False,
) -> tuple[Box, str]:
    """The lung box of a binary lung mask, or the full image with the reason why.

    Steps: 8-connected components of ``mask != 0``; components with fewer than
    ``min_component_area · H · W`` pixels are dropped; the union box of the rest is padded by
    ``round(margin · H)`` rows and ``round(margin · W)`` columns and clipped to the image; a
    padded box with area below ``(min_box · H) · (min_box · W)`` is implausible. Only then, with
    ``keep_aspect``, the shorter side is grown to a square (centred, shifted to stay inside the
    image, at most the image side).

    Args:
        mask: H×W array, nonzero = lung (threshold probabilities first).
        min_component_area: smallest kept component, as a fraction of the image area.
        margin: padding on every side, as a fraction of the image side (per axis).
        min_box: smallest plausible box side, as a fraction of the image side (per axis).
        keep_aspect: grow the box to a square instead of leaving the squash to the crop.

    Returns:
        ``(box, reason)``: reason ``"lungs"``, or ``"no_lung"`` / ``"box_too_small"`` with the
        full-image box. The box always lies inside the image.
    """
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"box_from_mask expects a non-empty H×W mask, got shape {mask.shape}")
    _check_settings(min_component_area, margin, min_box)
    height, width = mask.shape
    labels, n_components = ndimage.label(mask != 0, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=n_components + 1)
    kept = np.flatnonzero(sizes[1:] >= min_component_area * height * width) + 1
    if kept.size == 0:
        return Box.full(mask.shape), "no_lung"
    lung = np.isin(labels, kept)
    rows = np.flatnonzero(lung.any(axis=1))
    cols = np.flatnonzero(lung.any(axis=0))
    pad_y, pad_x = round(margin * height), round(margin * width)
    box = Box(
        max(rows[0] - pad_y, 0),
        max(cols[0] - pad_x, 0),
        min(rows[-1] + 1 + pad_y, height),
        min(cols[-1] + 1 + pad_x, width),
    )
    if box.area < (min_box * height) * (min_box * width):
        return Box.full(mask.shape), "box_too_small"
    if keep_aspect:
        box = _grow_to_square(box, (height, width))
    return box, LUNG_REASON


def _grow_to_square(box: Box, shape: tuple[int, int]) -> Box:
    side = max(box.height, box.width)
    y0, y1 = _grow_interval(box.y0, box.y1, side, shape[0])
    x0, x1 = _grow_interval(box.x0, box.x1, side, shape[1])
    return Box(y0, x0, y1, x1)


def _grow_interval(start: int, end: int, length: int, limit: int) -> tuple[int, int]:
    """Grow ``[start, end)`` about its centre to ``length`` (≤ ``limit``) inside ``[0, limit)``."""
    length = min(length, limit)
    start = start - (length - (end - start)) // 2
    start = min(max(start, 0), limit - length)
    return start, start + length


def _check_box_fits(box: Box, shape: Sequence[int], what: str) -> None:
    if not box.fits(shape):
        raise ValueError(f"box {box.as_tuple()} does not fit inside the {what} of shape {shape}")


def crop(image: np.ndarray, box: Box, size: int | tuple[int, int]) -> np.ndarray:
    """Cut the box out of an image and resize it (squashed, aspect not kept) to ``size``.

    Args:
        image: H×W (or H×W×C) uint8 or float array.
        box: a box inside the image.
        size: output side (square) or ``(height, width)`` in pixels.

    Returns:
        the crop, same dtype, a new array (area average when shrinking, bilinear otherwise,
        see :func:`ssl_ptx.data.images.resize_image`).
    """
    _check_box_fits(box, image.shape, "image")
    region = image[box.slices]
    resized = resize_image(region, size)
    return resized.copy() if resized is region else resized


def crop_mask(mask: np.ndarray, box: Box, size: int | tuple[int, int]) -> np.ndarray:
    """Cut the box out of a binary mask and resize it to ``size``.

    Resampling follows :func:`ssl_ptx.data.images.resize_mask` (coverage ≥ 0.5, small lesions
    never lost).

    Returns:
        ``uint8`` 0/1 array of shape ``size``.
    """
    _check_box_fits(box, mask.shape, "mask")
    return resize_mask(mask[box.slices], size)


def paste(
    prediction: np.ndarray,
    box: Box,
    original_shape: Sequence[int],
    *,
    fill: float = 0.0,
) -> np.ndarray:
    """Map a crop-level probability map back onto the full image.

    Args:
        prediction: h×w probability map of the crop (any size; float or uint8).
        box: the box the crop was cut from.
        original_shape: ``(H, W)`` of the original image.
        fill: value outside the box.

    Returns:
        ``float32`` H×W map: ``prediction`` resized to the box (bilinear when growing, area
        average when shrinking) inside it, ``fill`` elsewhere.
    """
    if prediction.ndim != 2:
        raise ValueError(f"paste expects an h×w prediction, got shape {prediction.shape}")
    shape = (int(original_shape[0]), int(original_shape[1]))
    _check_box_fits(box, shape, "original image")
    canvas = np.full(shape, fill, np.float32)
    canvas[box.slices] = resize_image(prediction.astype(np.float32), (box.height, box.width))
    return canvas


def paste_average(
    predictions: Sequence[np.ndarray],
    boxes: Sequence[Box],
    original_shape: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Paste several crop predictions of one image and average where they overlap.

    The 3rd place's paste-back: each prediction is resized to its box and added into a zero
    canvas, a count map counts the boxes covering each pixel, and the sum is divided by
    ``max(count, 1)``, so the probability is 0 outside every box.

    Args:
        predictions: h×w probability maps, one per box (sizes may differ).
        boxes: the boxes the crops were cut from.
        original_shape: ``(H, W)`` of the original image.

    Returns:
        ``(average, count)``: ``float32`` H×W average and ``int32`` H×W count map.
    """
    if len(predictions) != len(boxes):
        raise ValueError(f"{len(predictions)} predictions but {len(boxes)} boxes")
    shape = (int(original_shape[0]), int(original_shape[1]))
    total = np.zeros(shape, np.float32)
    count = np.zeros(shape, np.int32)
    for prediction, box in zip(predictions, boxes, strict=True):
        total += paste(prediction, box, shape)
        count[box.slices] += 1
    return total / np.maximum(count, 1), count


class LungCropper:
    """Lung boxes of chest X-rays from a lung segmentation model.

    Args:
        model: maps ``[B, C, S, S]`` float images in 0..1 (the grey image repeated over
            ``C = in_channels``) to lung logits ``[B, 1, s, s]`` (or ``[B, s, s]``); put in
            eval mode while predicting, its mode restored afterwards.
        threshold: lung probability above which a pixel is lung.
        input_size: the model's square input side ``S`` in pixels.
        in_channels: the model's input channels ``C``.
        min_component_area, margin, min_box, keep_aspect: the box rule of
            :func:`box_from_mask` (fractions of the image area / side).
        device: where the model runs; default: the device of its first parameter (CPU if none).
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        threshold: float = 0.5,
        input_size: int = 256,
        min_component_area: float = 2000 / _REFERENCE_SIDE**2,
        margin: float = 40 / _REFERENCE_SIDE,
        min_box: float = 300 / _REFERENCE_SIDE,
        keep_aspect: bool = False,
        in_channels: int = 1,
        device: torch.device | str | None = None,
        batch_size: int = 16,
    ) -> None:
        _check_settings(min_component_area, margin, min_box)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if min(input_size, batch_size, in_channels) <= 0:
            raise ValueError(
                "input_size, batch_size and in_channels must be positive, got "
                f"{input_size}, {batch_size}, {in_channels}"
            )
        self.model = model
        self.threshold = float(threshold)
        self.input_size = int(input_size)
        self.in_channels = int(in_channels)
        self.min_component_area = float(min_component_area)
        self.margin = float(margin)
        self.min_box = float(min_box)
        self.keep_aspect = bool(keep_aspect)
        self.batch_size = int(batch_size)
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)

    def settings(self) -> dict[str, Any]:
        """The crop settings (JSON-serialisable) to save beside the model's checkpoint."""
        return {
            "threshold": self.threshold,
            "input_size": self.input_size,
            "in_channels": self.in_channels,
            "min_component_area": self.min_component_area,
            "margin": self.margin,
            "min_box": self.min_box,
            "keep_aspect": self.keep_aspect,
        }

    @classmethod
    def from_settings(
        cls,
        model: nn.Module,
        settings: dict[str, Any],
        *,
        device: torch.device | str | None = None,
        batch_size: int = 16,
    ) -> LungCropper:
        """Rebuild a cropper from :meth:`settings` and the lung model."""
        return cls(model, **settings, device=device, batch_size=batch_size)

    def save(self, path: str | os.PathLike, **extra: Any) -> Path:
        """Write the lung model, its config and the crop settings to one checkpoint.

        The file is an ``ssl_ptx`` checkpoint (atomic write, read with ``weights_only``):
        ``model`` (state dict on CPU), ``model_config`` (the model's resolved config, as
        ``ssl_ptx.models.create_model`` stores it), :data:`LUNG_CROP_KEY` (:meth:`settings`)
        and the entries of ``extra`` (e.g. ``metrics``, ``config``: tensors, numbers, strings,
        None and containers only). :meth:`from_checkpoint` rebuilds the cropper.

        Raises:
            ValueError: the model has no ``model_config`` (it was not built by ``create_model``).
        """
        from ssl_ptx.engine.checkpoint import save_checkpoint

        model_config = getattr(self.model, "model_config", None)
        if model_config is None:
            raise ValueError(
                f"cannot save a lung cropper whose model ({type(self.model).__name__}) has no "
                "model_config; build it with ssl_ptx.models.create_model"
            )
        weights = {name: tensor.detach().cpu() for name, tensor in self.model.state_dict().items()}
        state = {
            **extra,
            "model": weights,
            "model_config": dict(model_config),
            LUNG_CROP_KEY: self.settings(),
        }
        return save_checkpoint(state, path)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        batch_size: int = 16,
    ) -> LungCropper:
        """Rebuild the cropper a :meth:`save` (or ``train_lung_segmenter.py``) wrote.

        The model is built from ``model_config`` with ``encoder_weights=None`` (the stored
        weights replace any pretrained ones, so nothing is downloaded), loaded with
        ``weights_only``, moved to ``device`` and put in eval mode.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ssl_ptx.engine.checkpoint.CheckpointError: not a lung checkpoint (no ``model``,
                ``model_config`` or crop settings), or weights that do not fit the model.
        """
        from ssl_ptx.engine.checkpoint import CheckpointError, load_checkpoint
        from ssl_ptx.models import create_model

        state = load_checkpoint(path, required=("model", "model_config", LUNG_CROP_KEY))
        model_config = dict(state["model_config"])
        if "encoder_weights" in model_config:
            model_config["encoder_weights"] = None
        try:
            model = create_model(model_config)
            model.load_state_dict(state["model"])
            return cls.from_settings(
                model.to(device).eval(), state[LUNG_CROP_KEY], device=device, batch_size=batch_size
            )
        except (RuntimeError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: cannot rebuild the lung cropper: {error}") from error

    def predict_lung(
        self, images: Sequence[np.ndarray], *, progress: bool = False
    ) -> list[np.ndarray]:
        """Lung probability maps at each image's native size.

        Args:
            images: ``uint8`` H×W grey images (sizes may differ).
            progress: show a tqdm bar over batches.

        Returns:
            one ``float32`` H×W map in 0..1 per image (model output resized back bilinearly).
        """
        return list(self._probabilities(images, progress))

    def boxes(
        self, images: Sequence[np.ndarray], *, progress: bool = False
    ) -> list[tuple[Box, str]]:
        """``(box, reason)`` per image (see :func:`box_from_mask`); fallbacks are logged.

        Never raises on an image without lungs: it gets the full-image box and a reason in
        :data:`FALLBACK_REASONS`, and one warning counts the fallbacks of the call.
        """
        results = [self.box_of(p) for p in self._probabilities(images, progress)]
        fallbacks = Counter(reason for _, reason in results if reason != LUNG_REASON)
        if fallbacks:
            details = ", ".join(f"{reason}: {n}" for reason, n in sorted(fallbacks.items()))
            logger.warning(
                "lung crop: full-image fallback for %d of %d images (%s)",
                sum(fallbacks.values()),
                len(results),
                details,
            )
        return results

    def box_of(self, probability: np.ndarray) -> tuple[Box, str]:
        """``(box, reason)`` of one H×W lung probability map (e.g. from :meth:`predict_lung`):
        :func:`box_from_mask` of ``probability > threshold`` with this cropper's settings."""
        return box_from_mask(
            probability > self.threshold,
            min_component_area=self.min_component_area,
            margin=self.margin,
            min_box=self.min_box,
            keep_aspect=self.keep_aspect,
        )

    def normalised_boxes(
        self, images: Sequence[np.ndarray], *, progress: bool = False
    ) -> tuple[np.ndarray, list[str]]:
        """:meth:`boxes` as fractions of each image's side (:meth:`Box.to_fractions`).

        Returns:
            ``(fractions, reasons)``: ``float64`` [N, 4] rows ``(y0, x0, y1, x1)`` in [0, 1]
            and one reason per image (``"lungs"`` or one of :data:`FALLBACK_REASONS`).
        """
        results = self.boxes(images, progress=progress)
        fractions = np.array(
            [
                box.to_fractions(image.shape)
                for (box, _), image in zip(results, images, strict=True)
            ],
            np.float64,
        ).reshape(len(results), 4)
        return fractions, [reason for _, reason in results]

    def _probabilities(self, images: Sequence[np.ndarray], progress: bool) -> Iterator[np.ndarray]:
        for index, image in enumerate(images):
            if image.ndim != 2 or image.dtype != np.uint8:
                raise ValueError(
                    f"image {index}: expected a uint8 H×W image, got {image.dtype} {image.shape}"
                )
        starts = range(0, len(images), self.batch_size)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in tqdm(starts, desc="lung masks", unit="batch", disable=not progress):
                batch = images[start : start + self.batch_size]
                for image, probability in zip(batch, self._predict_batch(batch), strict=True):
                    yield resize_image(probability, image.shape)
        finally:
            self.model.train(was_training)

    @torch.inference_mode()
    def _predict_batch(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """``float32`` [B, s, s] lung probabilities at the model's output size."""
        inputs = np.stack([resize_image(image, self.input_size) for image in batch])
        tensor = torch.from_numpy(inputs).to(self.device).float().div_(255.0).unsqueeze(1)
        logits = self.model(tensor.expand(-1, self.in_channels, -1, -1))
        if isinstance(logits, (tuple, list)):  # (mask logits, presence logits)
            logits = logits[0]
        if logits.ndim == 4 and logits.shape[1] == 1:
            logits = logits[:, 0]
        if logits.ndim != 3 or logits.shape[0] != len(batch):
            raise ValueError(
                f"lung model returned shape {tuple(logits.shape)} for input "
                f"{tuple(tensor.shape)}; expected [B, 1, s, s] or [B, s, s] logits"
            )
        return torch.sigmoid(logits.float()).cpu().numpy()
