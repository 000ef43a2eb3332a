"""Test-time augmentations: a view of the input and the way back for the prediction.

Each augmentation has a ``forward`` that turns a batch of images ``[B, C, H, W]`` (float, 0..1)
into a view of the same shape, and an ``inverse`` that brings the model's probability map of
that view ``[B, H, W]`` back to the original frame, together with a **weight map** saying how
much of each output pixel comes from inside the view (None: every pixel, weight 1). The
:class:`~ssl_ptx.inference.Predictor` averages views by ``Σ inverse_v / Σ weight_v`` (the plain
view has weight 1 everywhere), so pixels that a rotation or zoom pushed out of the frame are
averaged over the views that saw them, never counted as background.

Names (the ``tta`` list of the Predictor and ``--tta`` of ``recipes/predict.py``):

==============  ==================================================================================
``hflip``       horizontal flip (all top solutions), inverted exactly
``rot<deg>``    rotation by ``deg`` degrees about the centre, counter-clockwise (``rot-20``,
                ``rot5``); the image is padded by reflection, the map rotated back
``scale<s>``    zoom by ``s`` about the centre (``scale1.1`` zooms in, ``scale0.9`` out); the
                map is zoomed back
``clahe``       contrast-limited adaptive histogram equalisation (the 6th place; intensity only,
                the map needs no inverse)
==============  ==================================================================================

:func:`rotation_names` spells out a rotation range: ``rotation_names(20, 5)`` is ``rot-20``,
``rot-15`` … ``rot20`` without ``rot0``.
"""

from __future__ import annotations

import abc
import math
import re
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Affine",
    "Clahe",
    "HorizontalFlip",
    "TestTimeAugmentation",
    "parse_tta",
    "rotation_names",
]

Tensor = torch.Tensor
_ROTATION = re.compile(r"rot(-?\d+(?:\.\d+)?)")
_SCALE = re.compile(r"scale(\d+(?:\.\d+)?)")


class TestTimeAugmentation(abc.ABC):
    """A view of the images and its inverse for the probability maps."""

    __test__ = False  # not a pytest test class despite the name

    name: str

    @abc.abstractmethod
    def forward(self, images: Tensor) -> Tensor:
        """The view of float ``[B, C, H, W]`` images in 0..1 (same shape and device)."""

    @abc.abstractmethod
    def inverse(self, maps: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(maps, weight)`` for float ``[B, H, W]`` maps of the view: the maps in the
        original frame, already multiplied by ``weight`` (``[B, H, W]`` in 0..1, the share of
        each pixel that comes from inside the view), or ``weight`` None when that is 1
        everywhere."""


@dataclass(frozen=True)
class HorizontalFlip(TestTimeAugmentation):
    """Mirror left–right; its own inverse, exact."""

    name: str = "hflip"

    def forward(self, images: Tensor) -> Tensor:
        return images.flip(-1)

    def inverse(self, maps: Tensor) -> tuple[Tensor, Tensor | None]:
        return maps.flip(-1), None


@dataclass(frozen=True)
class Affine(TestTimeAugmentation):
    """Rotation by ``angle`` degrees (counter-clockwise on the displayed image) and zoom by
    ``scale`` about the image centre.

    The view samples the image bilinearly with reflection padding (the model sees no black
    corners); the inverse samples the map with the inverse transform and zero padding, and
    the weight is the same sampling of an all-ones map, so pixels mapped from outside the
    view get weight 0 (and partial weight along the border).
    """

    angle: float = 0.0
    scale: float = 1.0
    name: str = "affine"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be > 0, got {self.scale}")

    def _grid(self, shape: torch.Size, inverse: bool, like: Tensor) -> Tensor:
        """Sampling grid of ``affine_grid`` for the view (or its inverse) at ``shape``.

        An output pixel at position q (pixel units about the centre) samples the input at
        A·q with A = R/scale for the view and A⁻¹ = scale·Rᵀ for the inverse, converted to
        the normalised [-1, 1] coordinates of ``affine_grid`` on each axis.
        """
        height, width = shape[-2:]
        theta = math.radians(self.angle)
        cos, sin = math.cos(theta), math.sin(theta)
        # (x right, y down): the view at q shows the input at R·q/scale, which turns the
        # picture counter-clockwise on screen for a positive angle
        rotation = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
        matrix = rotation.T * self.scale if inverse else rotation / self.scale
        # normalised coordinates run over [-1, 1] on both axes: correct for the aspect ratio
        aspect = torch.tensor([width, height], dtype=torch.float64)
        matrix = matrix * aspect[None, :] / aspect[:, None]
        affine = torch.cat([matrix, torch.zeros(2, 1, dtype=torch.float64)], dim=1)
        affine = affine.to(like.device, torch.float32).expand(shape[0], 2, 3).contiguous()
        return F.affine_grid(affine, list(shape), align_corners=False)

    def forward(self, images: Tensor) -> Tensor:
        grid = self._grid(images.shape, inverse=False, like=images)
        return F.grid_sample(
            images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )

    def inverse(self, maps: Tensor) -> tuple[Tensor, Tensor | None]:
        stacked = torch.stack([maps, torch.ones_like(maps)], dim=1)  # [B, 2, H, W]
        grid = self._grid(stacked.shape, inverse=True, like=maps)
        sampled = F.grid_sample(
            stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return sampled[:, 0], sampled[:, 1]


@dataclass(frozen=True)
class Clahe(TestTimeAugmentation):
    """CLAHE of every channel of every image (OpenCV on the 8-bit image ``round(255·x)``);
    geometry is unchanged, so the map needs no inverse."""

    clip_limit: float = 2.0
    tile_grid: int = 8
    name: str = "clahe"

    def forward(self, images: Tensor) -> Tensor:
        clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=(self.tile_grid,) * 2)
        codes = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        equalised = np.stack(
            [np.stack([clahe.apply(channel) for channel in image]) for image in codes]
        )
        return torch.from_numpy(equalised).to(images.device, images.dtype).div_(255.0)

    def inverse(self, maps: Tensor) -> tuple[Tensor, Tensor | None]:
        return maps, None


def parse_tta(name: str) -> TestTimeAugmentation:
    """The augmentation called ``name`` (see the module docstring).

    Raises:
        ValueError: an unknown name (the message lists the forms).
    """
    if name == "hflip":
        return HorizontalFlip()
    if name == "clahe":
        return Clahe()
    rotation = _ROTATION.fullmatch(name)
    if rotation:
        return Affine(angle=float(rotation.group(1)), name=name)
    scale = _SCALE.fullmatch(name)
    if scale and float(scale.group(1)) > 0:
        return Affine(scale=float(scale.group(1)), name=name)
    raise ValueError(
        f"unknown TTA {name!r}; known: hflip, clahe, rot<degrees> (rot-20, rot5), "
        "scale<factor> (scale0.9, scale1.1)"
    )


def rotation_names(max_angle: float = 20.0, step: float = 5.0) -> list[str]:
    """``rot<a>`` for a = −max_angle, −max_angle + step, …, max_angle, without 0.

    Raises:
        ValueError: ``step`` <= 0 or ``max_angle`` < 0.
    """
    if step <= 0 or max_angle < 0:
        raise ValueError(f"need step > 0 and max_angle >= 0, got {step}, {max_angle}")
    count = math.floor(max_angle / step + 1e-9)
    angles = [k * step for k in range(-count, count + 1) if k != 0]
    return [f"rot{angle:g}" for angle in angles]
