"""Synthetic chest radiographs: random anatomy, lung-field masks and rendering.

The pieces are shared by every demo-data generator (SIIM, CheXpert, NIH and Montgomery).
Positions are normalised chest coordinates: ``x`` from 0 (left edge as displayed, the patient's
right on a PA film) to 1, ``y`` from 0 (top) to 1 (bottom). The image-left lung is the patient's
right lung; the heart bulges into the image-right hemithorax.

Images may be square (``size``) or not (``(height, width)``). The chest square, 0..1 in both
axes, is the largest centred square of the image (:func:`chest_frame`); a taller image shows more
neck and abdomen, a wider one more shoulders and air. A square image is exactly the chest square.

Lateral films (:func:`render_lateral_xray`, :func:`lateral_lung_mask`) show the same chest
side-on: the patient faces the image left, the spine is at the right, both lungs superimpose.

Rendering works in an "attenuation" map (0 = air; soft tissue ~0.9; bone adds to it), which is
then windowed, gamma-corrected, blurred and made noisy into a uint8 MONOCHROME2 image (bright =
dense). Everything is vectorised numpy or OpenCV; Python loops only run over anatomical parts
(ribs, vessel segments), never over pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "ChestAnatomy",
    "chest_frame",
    "lateral_lung_mask",
    "lung_masks",
    "render_chest_xray",
    "render_lateral_xray",
    "sample_anatomy",
]

_SUBPIXEL_BITS = 4  # cv2 drawing ``shift``: coordinates carry 4 fractional bits
_SUBPIXEL = 1 << _SUBPIXEL_BITS

#: an image size: ``size`` for size×size, or ``(height, width)`` in pixels
ImageShape = int | tuple[int, int]


def chest_frame(shape: ImageShape) -> tuple[int, int, int]:
    """Where the normalised chest square lies in an image of ``shape``.

    Returns:
        ``(side, top, left)`` in pixels: the square is ``image[top:top + side, left:left + side]``.
        It is the largest centred square (rounded down to whole pixels).
    """
    height, width = (shape, shape) if isinstance(shape, int) else shape
    side = min(height, width)
    return side, (height - side) // 2, (width - side) // 2


@dataclass(frozen=True)
class _Canvas:
    """An image of ``height``×``width`` pixels whose chest square is ``side`` px at (top, left)."""

    height: int
    width: int
    side: int
    top: int
    left: int

    @classmethod
    def of(cls, shape: ImageShape) -> _Canvas:
        height, width = (shape, shape) if isinstance(shape, int) else shape
        return cls(height, width, *chest_frame((height, width)))

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def zeros(self) -> np.ndarray:
        return np.zeros(self.shape, np.float32)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """``(y, x)``: the normalised chest coordinates of every pixel, float32 H×W each."""
        yy, xx = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32)
        return (yy - self.top) / self.side, (xx - self.left) / self.side

    def to_pixels(self, points: np.ndarray) -> np.ndarray:
        """Normalised (x, y) points -> int32 pixels with :data:`_SUBPIXEL_BITS` fraction bits."""
        pixels = np.asarray(points) * self.side + np.array([self.left, self.top])
        return np.round(pixels * _SUBPIXEL - _SUBPIXEL / 2).astype(np.int32)


@dataclass(frozen=True)
class ChestAnatomy:
    """Shape parameters of one synthetic chest, in normalised image coordinates.

    Attributes:
        midline: x of the spine / mediastinum centre.
        apex_y: y of the lung apices.
        base_y: y of the image-left costophrenic angle; the image-right one is ``left_drop`` lower.
        left_drop: how much lower the image-right (patient-left) hemidiaphragm sits.
        half_width: distance from the midline to the lateral chest wall (inner rib margin).
        body_half_width: distance from the midline to the skin line at chest level.
        mediastinum: half width of the upper mediastinum.
        dome_height: height of the diaphragm domes above the costophrenic angles.
        heart_width: how far the heart's left border reaches past the mediastinum (image right).
        right_heart_bulge: how far the right heart border bulges into the image-left lung.
        hilum_y: y of the hila, where the vessel trees start.
        view: "PA" or "AP" (AP: larger heart, more horizontal clavicles).
        female: adds breast shadows over the lower lung fields.
    """

    midline: float
    apex_y: float
    base_y: float
    left_drop: float
    half_width: float
    body_half_width: float
    mediastinum: float
    dome_height: float
    heart_width: float
    right_heart_bulge: float
    hilum_y: float
    view: str
    female: bool


def sample_anatomy(
    rng: np.random.Generator, view: str = "PA", female: bool = False
) -> ChestAnatomy:
    """Draw random but plausible chest proportions (roughly SIIM's framing: lungs fill the film).

    Args:
        rng: the random source.
        view: "PA" or "AP".
        female: whether to render breast shadows.
    """
    if view not in ("PA", "AP"):
        raise ValueError(f"view must be 'PA' or 'AP', got {view!r}")
    ap = view == "AP"
    half_width = rng.uniform(0.33, 0.38)
    return ChestAnatomy(
        midline=rng.uniform(0.47, 0.53),
        apex_y=rng.uniform(0.05, 0.12),
        base_y=rng.uniform(0.74, 0.84),
        left_drop=rng.uniform(0.0, 0.04),
        half_width=half_width,
        body_half_width=half_width + rng.uniform(0.06, 0.11),
        mediastinum=rng.uniform(0.045, 0.065),
        dome_height=rng.uniform(0.06, 0.11),
        heart_width=rng.uniform(0.13, 0.17) + (0.03 if ap else 0.0),
        right_heart_bulge=rng.uniform(0.015, 0.035),
        hilum_y=rng.uniform(0.36, 0.42),
        view=view,
        female=female,
    )


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _heart_border(h: np.ndarray) -> np.ndarray:
    """Heart border reach (0..1 of its maximum) from its top (h=0) down to the diaphragm (h=1)."""
    rise = np.sin(0.5 * math.pi * np.clip(h / 0.7, 0.0, 1.0)) ** 0.7
    return rise * (1.0 - 0.15 * np.clip((h - 0.7) / 0.3, 0.0, 1.0))


def _lung_outline(a: ChestAnatomy, image_right: bool, n: int = 48) -> np.ndarray:
    """Closed outline of one lung as an (N, 2) float array of normalised (x, y) points.

    Built for the image-left lung as offsets from the midline (lateral wall, diaphragm dome,
    medial border), then mirrored for the image-right lung, whose medial border follows the heart.
    """
    apex_offset = 0.45 * a.half_width
    base_y = a.base_y + (a.left_drop if image_right else 0.0)
    cardiophrenic_y = base_y - 0.35 * a.dome_height
    heart_reach = a.heart_width if image_right else a.right_heart_bulge
    medial_base = a.mediastinum + heart_reach * _heart_border(np.ones(1))[0]

    # lateral wall: apex -> costophrenic angle, widening fast and tapering slightly at the base
    t = np.linspace(0.0, 1.0, n)
    widen = np.sin(np.minimum(t / 0.42, 1.0) * math.pi / 2) ** 0.6
    lateral_x = apex_offset + (a.half_width - apex_offset) * widen - 0.02 * np.clip(t - 0.6, 0, 1)
    lateral = np.stack([lateral_x, a.apex_y + (base_y - a.apex_y) * t], axis=1)

    # diaphragm dome: costophrenic angle -> cardiophrenic angle
    s = np.linspace(0.0, 1.0, n)[1:]
    dome_x = lateral_x[-1] + (medial_base - lateral_x[-1]) * s
    dome_y = base_y + (cardiophrenic_y - base_y) * s - a.dome_height * np.sin(math.pi * s**0.8)
    dome = np.stack([dome_x, dome_y], axis=1)

    # medial border: cardiophrenic angle -> up to the apex, bulging over the heart
    u = np.linspace(0.0, 1.0, n)[1:-1]
    medial_y = cardiophrenic_y + (a.apex_y + 0.05 - cardiophrenic_y) * u
    heart_top = a.hilum_y + 0.05
    heart = np.clip((medial_y - heart_top) / (cardiophrenic_y - heart_top), 0.0, 1.0)
    aortic_knob = 0.025 * np.exp(-(((medial_y - (a.hilum_y - 0.12)) / 0.03) ** 2))
    medial_x = a.mediastinum + heart_reach * _heart_border(heart)
    medial_x = medial_x + (aortic_knob if image_right else 0.0)
    medial_x = medial_x + (apex_offset - a.mediastinum) * _smoothstep(0.85, 1.0, u) * 0.6
    medial = np.stack([medial_x, medial_y], axis=1)

    offsets = np.concatenate([lateral, dome, medial])
    sign = 1.0 if image_right else -1.0
    return np.stack([a.midline + sign * offsets[:, 0], offsets[:, 1]], axis=1)


def _fill(outline: np.ndarray, canvas: _Canvas) -> np.ndarray:
    """Rasterise a closed normalised outline into an H×W uint8 0/1 mask (sub-pixel accurate)."""
    mask = np.zeros(canvas.shape, np.uint8)
    cv2.fillPoly(mask, [canvas.to_pixels(outline)], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return mask


def lung_masks(anatomy: ChestAnatomy, size: ImageShape) -> tuple[np.ndarray, np.ndarray]:
    """The two lung fields of ``anatomy`` in an image of ``size`` (an int or ``(height, width)``).

    Returns:
        ``(image_left, image_right)``: uint8 0/1 masks, H×W. ``image_left`` is the patient's
        right lung (as displayed on a PA film), ``image_right`` the patient's left lung.
    """
    canvas = _Canvas.of(size)
    return (
        _fill(_lung_outline(anatomy, image_right=False), canvas),
        _fill(_lung_outline(anatomy, image_right=True), canvas),
    )


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur as float32; wide blurs run on a downsampled copy (same look, far faster)."""
    image = image.astype(np.float32, copy=False)
    if sigma_px < 0.3:
        return image
    factor = int(sigma_px // 4)
    if factor < 2:
        return cv2.GaussianBlur(image, (0, 0), sigma_px)
    height, width = image.shape
    small = cv2.resize(image, (width // factor, height // factor), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma_px / factor)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def _polylines(
    image: np.ndarray, canvas: _Canvas, lines: np.ndarray, value: float, thickness: int
) -> None:
    """Draw open polylines onto a float image, anti-aliased.

    Args:
        image: H×W float32 image of ``canvas``, drawn into in place.
        canvas: where the chest square lies in ``image``.
        lines: (N, P, 2) or (P, 2) normalised (x, y) points: N polylines of P points.
        value: the value drawn.
        thickness: line width in pixels (at least 1).
    """
    pts = canvas.to_pixels(lines)
    pts = pts.reshape(-1, *pts.shape[-2:])
    cv2.polylines(
        image, list(pts), False, float(value), max(1, thickness), cv2.LINE_AA, _SUBPIXEL_BITS
    )


def _body(a: ChestAnatomy, x: np.ndarray, y: np.ndarray, side: int) -> np.ndarray:
    """Soft-tissue attenuation of neck, shoulders, trunk and abdomen (0 outside the body).

    Thicker (denser) along the midline, thinning toward the skin line; the shoulders are wider
    than the chest and the neck narrows above the apices. ``side``: the chest square in pixels.
    """
    neck, shoulder_y = 0.13, a.apex_y - 0.01
    shoulder = a.body_half_width + 0.05
    half = neck + (shoulder - neck) * _smoothstep(shoulder_y - 0.14, shoulder_y, y)
    half -= (shoulder - a.body_half_width) * _smoothstep(shoulder_y, shoulder_y + 0.25, y)
    dx = (x - a.midline) / half
    thickness = np.sqrt(np.clip(1.0 - dx**2, 0.0, 1.0))
    inside = _blur((np.abs(dx) < 1.0).astype(np.float32), 0.004 * side)
    tissue = inside * (0.45 + 0.35 * thickness)
    for sign in (-1.0, 1.0):  # humeral heads at the top corners
        r2 = ((x - a.midline - sign * (shoulder - 0.03)) / 0.06) ** 2 + (
            (y - shoulder_y) / 0.07
        ) ** 2
        tissue += 0.12 * _blur((r2 < 1).astype(np.float32), 0.006 * side) * inside
    return tissue


def _bones(rng: np.random.Generator, a: ChestAnatomy, canvas: _Canvas) -> np.ndarray:
    """Posterior and anterior ribs, clavicles and the spine, as added attenuation.

    Posterior ribs leave the spine, rise a little and curve down along the lateral wall;
    anterior ribs (fainter) run from the lateral wall down and medially. Bone is drawn as a band
    with a brighter cortex.
    """
    side_px = canvas.side
    n_ribs = 10
    s = np.linspace(0.0, 1.0, 24)
    spacing = (a.base_y - a.apex_y + 0.04) / (n_ribs - 0.5)
    y0 = a.apex_y - 0.02 + np.arange(n_ribs)[:, None] * spacing + rng.normal(0, 0.004, (n_ribs, 1))
    reach = a.half_width + 0.035
    rib_px = max(1, round(side_px * rng.uniform(0.016, 0.021)))
    posterior = canvas.zeros()
    anterior = canvas.zeros()
    for sign in (-1.0, 1.0):
        xs = np.broadcast_to(a.midline + sign * (0.025 + s * reach), (n_ribs, s.size))
        ys = y0 - 0.05 * s + rng.uniform(0.16, 0.2) * s**3
        _polylines(posterior, canvas, np.stack([xs, ys], axis=-1), 1.0, rib_px)
        xa = np.broadcast_to(a.midline + sign * (reach - s * (reach - 0.1)), (n_ribs - 2, s.size))
        ya = y0[:-2] + 0.06 + 0.2 * s**1.3
        _polylines(anterior, canvas, np.stack([xa, ya], axis=-1), 1.0, max(1, rib_px - 1))
        clavicle_y = a.apex_y + (0.01 if a.view == "AP" else 0.04)
        tilt = 0.02 if a.view == "AP" else 0.08
        xc = a.midline + sign * (0.045 + s * 0.3)
        yc = clavicle_y - tilt * s + 0.012 * np.sin(2 * math.pi * s)
        _polylines(posterior, canvas, np.stack([xc, yc], axis=-1), 1.0, round(rib_px * 1.4))
    posterior = np.minimum(posterior, 1.0)
    cortex = posterior - cv2.erode(posterior, np.ones((3, 3), np.uint8))
    bones = 0.08 * posterior + 0.05 * cortex + 0.025 * np.minimum(anterior, 1.0)

    yy, xx = canvas.grid()
    spine = (np.abs(xx - a.midline) < 0.033).astype(np.float32)
    vertebrae = 0.75 + 0.25 * (np.sin(2 * math.pi * (yy - a.apex_y) / 0.05) > -0.5)
    bones += 0.1 * _blur(spine, 0.004 * side_px) * vertebrae
    return _blur(bones, 0.0025 * side_px)


def _vessels(
    rng: np.random.Generator,
    canvas: _Canvas,
    lungs: np.ndarray,
    hila: tuple[float, float, float],
    reach: float,
) -> np.ndarray:
    """Branching vessel trees from two hila, thinning and fading toward the periphery.

    The trees grow one generation at a time for all branches at once: every segment of a
    generation shares a width and is drawn in a single ``cv2.polylines`` call.

    Args:
        rng: the random source.
        canvas: the image's geometry.
        lungs: float H×W weights the trees are multiplied by (the soft lung fields).
        hila: ``(centre_x, mediastinum, y)``: the hila sit at height ``y``, at
            ``centre_x ± (mediastinum + 0.04)`` (just outside a mediastinum of that half width).
        reach: distance over which the trees fade to a quarter.
    """
    centre_x, mediastinum, hilum_y = hila
    side_px = canvas.side
    image = canvas.zeros()
    generations = int(np.clip(round(math.log2(side_px) - 1), 5, 8))
    trunks = 5
    angles = np.linspace(0.55, 1.45, trunks) * math.pi
    directions = np.concatenate([angles, math.pi - angles]) + rng.normal(0, 0.08, 2 * trunks)
    hila_x = centre_x + np.repeat([-1.0, 1.0], trunks) * (mediastinum + 0.04)
    starts = np.stack([hila_x, np.full(2 * trunks, hilum_y)], axis=1)
    lengths = rng.uniform(0.07, 0.1, 2 * trunks)
    width = 0.009
    for generation in range(generations):
        directions = directions + rng.normal(0, 0.12, directions.size)
        ends = starts + lengths[:, None] * np.stack(
            [np.cos(directions), np.sin(directions)], axis=1
        )
        thickness = width * side_px
        value = min(thickness, 1.0) * (1.0 - 0.06 * generation)
        _polylines(image, canvas, np.stack([starts, ends], axis=1), value, round(thickness))
        n = directions.size
        spread = rng.uniform(0.3, 0.6, n)
        turns = np.concatenate([-spread, spread * rng.uniform(0.5, 1.0, n)])
        starts = np.concatenate([ends, ends])
        directions = np.concatenate([directions, directions]) + turns
        lengths = np.concatenate([lengths, lengths]) * rng.uniform(0.68, 0.85, 2 * n)
        width *= 0.72
    image = np.minimum(_blur(image, 0.0025 * side_px), 1.0)
    yy, xx = canvas.grid()
    from_hilum = np.hypot(np.abs(xx - centre_x) - mediastinum - 0.04, yy - hilum_y)
    return image * lungs * np.clip(1.15 - from_hilum / reach, 0.25, 1.0)


def _band_noise(
    rng: np.random.Generator, shape: tuple[int, int], fine: float, coarse: float
) -> np.ndarray:
    """Zero-mean band-pass noise (features between ``fine`` and ``coarse`` pixels), unit std."""
    white = rng.standard_normal(shape).astype(np.float32)
    band = _blur(white, fine) - _blur(white, coarse)
    return band / (band.std() + 1e-6)


def _pleural_line(pneumothorax: np.ndarray, lungs: np.ndarray, side: int) -> np.ndarray:
    """The visceral pleural line: the pneumothorax border that faces the lung, not the wall."""
    radius = max(1, round(side / 256))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    border = cv2.dilate(pneumothorax, kernel) - pneumothorax
    inner_lung = cv2.erode(lungs, kernel, iterations=2)
    return (border * inner_lung).astype(np.float32)


def _tube(rng: np.random.Generator, a: ChestAnatomy, canvas: _Canvas) -> np.ndarray:
    """A chest drain: a radio-opaque tube entering through the lateral wall toward the apex."""
    image = canvas.zeros()
    sign = rng.choice([-1.0, 1.0])
    entry = np.array([a.midline + sign * (a.half_width + 0.12), rng.uniform(0.55, 0.75)])
    bend = np.array([a.midline + sign * (a.half_width - 0.02), entry[1] - rng.uniform(0.05, 0.15)])
    tip = np.array([a.midline + sign * rng.uniform(0.12, 0.25), a.apex_y + rng.uniform(0.03, 0.12)])
    t = np.linspace(0.0, 1.0, 40)[:, None]
    curve = (1 - t) ** 2 * entry + 2 * (1 - t) * t * bend + t**2 * tip
    outer = max(2, round(0.011 * canvas.side))
    _polylines(image, canvas, curve, 1.0, outer)
    _polylines(image, canvas, curve, -0.6, max(1, outer - 2))
    return _blur(image, 0.0015 * canvas.side)


def _skin_fold(rng: np.random.Generator, a: ChestAnatomy, canvas: _Canvas) -> np.ndarray:
    """A skin fold: a long curved edge over the lateral lung, denser on its lateral side.

    It mimics a pleural line (a thin bright curve near the chest wall) but, unlike a
    pneumothorax, the lung texture continues on both sides and the curve runs past the lung.
    """
    sign = rng.choice([-1.0, 1.0])
    t = np.linspace(0.0, 1.0, 40)
    inset = rng.uniform(0.06, 0.14)
    x = a.midline + sign * (a.half_width - inset - 0.04 * np.sin(math.pi * t))
    y = a.apex_y + rng.uniform(0.1, 0.25) + t * rng.uniform(0.35, 0.6)
    curve = np.stack([x, y], axis=1)
    lateral = curve + np.array([sign * (inset + 0.15), 0.0])
    fold = canvas.zeros()
    cv2.fillPoly(
        fold,
        [canvas.to_pixels(np.concatenate([curve, lateral[::-1]]))],
        1.0,
        cv2.LINE_AA,
        _SUBPIXEL_BITS,
    )
    fade = _blur(fold, 0.03 * canvas.side)  # strongest at the edge, thinning laterally
    line = canvas.zeros()
    _polylines(line, canvas, curve, 1.0, 1)
    return 0.4 * _blur(fold, 0.002 * canvas.side) * fade + _blur(line, 0.0015 * canvas.side)


def _mediastinum_and_abdomen(
    a: ChestAnatomy, xx: np.ndarray, yy: np.ndarray, side: int, right: np.ndarray
) -> np.ndarray:
    """Attenuation added or removed by the heart, trachea, gastric bubble and breasts."""
    heart = ((xx - a.midline - 0.3 * a.heart_width) / (a.mediastinum + 0.8 * a.heart_width)) ** 2
    heart = heart + ((yy - a.base_y + 0.14) / 0.17) ** 2
    density = 0.05 * _blur((heart < 1).astype(np.float32), 0.03 * side)
    for sign in (-1.0, 1.0):  # hila: the pulmonary arteries where the vessel trees start
        hilum = ((xx - a.midline - sign * (a.mediastinum + 0.03)) / 0.035) ** 2
        hilum = hilum + ((yy - a.hilum_y) / 0.06) ** 2
        density += 0.06 * _blur((hilum < 1).astype(np.float32), 0.012 * side)
    trachea = (np.abs(xx - a.midline) < 0.014) & (yy < a.hilum_y - 0.06)
    density -= 0.12 * _blur(trachea.astype(np.float32), 0.004 * side)
    below_dome = yy > a.base_y + a.left_drop * (xx > a.midline)
    bubble = ((xx - a.midline - 0.16) / 0.07) ** 2 + ((yy - a.base_y - 0.02) / 0.035) ** 2 < 1
    density -= 0.12 * _blur((bubble & below_dome & (right == 0)).astype(np.float32), 0.008 * side)
    if a.female:
        for sign in (-1.0, 1.0):
            breast = ((xx - a.midline - sign * 0.26) / 0.2) ** 2 + (
                (yy - a.base_y + 0.02) / 0.15
            ) ** 2
            density += 0.08 * _blur((breast < 1).astype(np.float32), 0.02 * side)
    return density


def _check_mask_shape(mask: np.ndarray | None, canvas: _Canvas) -> None:
    if mask is not None and mask.shape != canvas.shape:
        raise ValueError(f"pneumothorax mask has shape {mask.shape}, expected {canvas.shape}")


#: ranges of a pneumothorax's air darkening and pleural-line brightness (attenuation units).
#: The air gain is about three times what looks realistic (0.04–0.07): with that, a ResNet18
#: UNet trained from scratch for 16 short epochs at 128² (the demo preset) never beat the
#: all-empty prediction; with this range it reaches a positive-image Dice near 0.6.
AIR_GAIN_RANGE = (0.18, 0.24)
PLEURAL_LINE_GAIN_RANGE = (0.12, 0.2)


def _finding_gains(rng: np.random.Generator) -> tuple[float, float]:
    """(air darkening, pleural-line brightness) of one pneumothorax."""
    return rng.uniform(*AIR_GAIN_RANGE), rng.uniform(*PLEURAL_LINE_GAIN_RANGE)


def _add_pneumothorax(
    density: np.ndarray,
    texture: np.ndarray,
    pneumothorax: np.ndarray,
    lungs: np.ndarray,
    lung_soft: np.ndarray,
    gains: tuple[float, float],
    side: int,
) -> None:
    """Draw a pneumothorax in place: no lung texture, a darker region, a bright pleural line.

    Args:
        density, texture: float32 H×W attenuation maps, changed in place.
        pneumothorax: H×W mask (nonzero = pneumothorax); only its part inside ``lungs`` counts.
        lungs: uint8 0/1 lung fields; ``lung_soft`` their blurred float version.
        gains: (air darkening, pleural-line brightness).
        side: the chest square in pixels (sets blur widths).
    """
    air_gain, line_gain = gains
    ptx = ((pneumothorax != 0) & (lungs > 0)).astype(np.uint8)
    ptx_soft = _blur(ptx, 0.003 * side)
    texture *= 1.0 - ptx_soft
    density -= air_gain * ptx_soft * lung_soft
    density += line_gain * _blur(_pleural_line(ptx, lungs, side), 0.0015 * side)


def render_chest_xray(
    rng: np.random.Generator,
    size: ImageShape,
    *,
    anatomy: ChestAnatomy | None = None,
    pneumothorax: np.ndarray | None = None,
    drain: bool = False,
    skin_fold: bool = False,
) -> np.ndarray:
    """Render one synthetic frontal chest radiograph.

    The texture, bones, findings, devices and exposure each draw from their own child stream of
    ``rng``, so adding a pneumothorax or a drain changes only the pixels near it.

    Args:
        rng: the random source (texture, exposure, noise; and the anatomy if not given).
        size: ``size`` for a square image, or ``(height, width)`` in pixels (64 to 1024 are
            sensible); the chest fills the centred square (:func:`chest_frame`).
        anatomy: the chest's shape; drawn with :func:`sample_anatomy` when ``None``. Pass the
            same object given to :func:`lung_masks` to place a pneumothorax.
        pneumothorax: optional H×W mask (nonzero = pneumothorax). Only its part inside the lung
            fields is rendered: there the lung texture is removed, the region is a little darker,
            and a thin bright visceral pleural line bounds it on the lung side.
        drain: draw a chest drain (a thin bright tube), a look-alike and a common companion.
        skin_fold: draw a skin fold (a thin curved bright edge over a lung, texture intact).

    Returns:
        uint8 array H×W, MONOCHROME2 (bright = dense), background air near black.
    """
    if anatomy is None:
        anatomy = sample_anatomy(rng)
    a = anatomy
    canvas = _Canvas.of(size)
    _check_mask_shape(pneumothorax, canvas)
    side = canvas.side
    texture_rng, bone_rng, finding_rng, device_rng, exposure_rng = rng.spawn(5)
    yy, xx = canvas.grid()
    left, right = lung_masks(a, canvas.shape)
    lungs = left | right
    lung_soft = _blur(lungs, 0.006 * side)
    lung_depth = _blur(lungs, 0.04 * side)

    density = _body(a, xx, yy, side) + _mediastinum_and_abdomen(a, xx, yy, side, right)
    # aerated lung: darkest centrally, brighter at the margins where less lung is traversed
    density -= texture_rng.uniform(0.42, 0.52) * (0.45 * lung_soft + 0.55 * lung_depth)
    density += 0.03 * _band_noise(texture_rng, canvas.shape, 0.03 * side, 0.12 * side) * lung_depth
    hila = (a.midline, a.mediastinum, a.hilum_y)
    texture = 0.14 * _vessels(texture_rng, canvas, lung_soft, hila, a.half_width)
    texture += 0.03 * _band_noise(texture_rng, canvas.shape, 0.006 * side, 0.025 * side) * lung_soft

    gains = _finding_gains(finding_rng)
    if pneumothorax is not None:
        _add_pneumothorax(density, texture, pneumothorax, lungs, lung_soft, gains, side)
    density += texture + _bones(bone_rng, a, canvas) * (0.2 + 0.8 * lung_soft)
    if drain:
        density += 0.3 * _tube(device_rng, a, canvas)
    if skin_fold:
        density += 0.14 * _skin_fold(device_rng, a, canvas)
    return _expose(exposure_rng, density, side)


@dataclass(frozen=True)
class _LateralGeometry:
    """Landmarks of a lateral film (patient facing the image left), in chest coordinates."""

    anterior_skin: float  # x of the skin over the sternum
    posterior_skin: float  # x of the skin of the back
    spine_front: float  # x of the vertebral bodies' anterior edge
    apex: tuple[float, float]  # (x, y) of the lung apex
    anterior_base: tuple[float, float]  # anterior costophrenic angle
    posterior_base: tuple[float, float]  # posterior costophrenic sulcus (the lowest lung point)
    dome_height: float  # how far the diaphragm rises above the line joining the two angles
    hilum: tuple[float, float]


def _lateral_geometry(a: ChestAnatomy) -> _LateralGeometry:
    """Place a lateral film's landmarks from the same chest's frontal proportions.

    The chest is deeper than half its width (AP diameter about 0.8 of the transverse one); the
    vertical landmarks (apex, bases, hilum) match the frontal film of the same chest.
    """
    depth = 0.8 * a.body_half_width
    centre = a.midline
    front, back = centre - depth, centre + depth
    return _LateralGeometry(
        anterior_skin=front,
        posterior_skin=back,
        spine_front=back - 0.2,
        apex=(centre + 0.01, a.apex_y),
        anterior_base=(front + 0.07, a.base_y - 0.03),
        posterior_base=(back - 0.07, a.base_y + a.left_drop + 0.06),
        dome_height=a.dome_height + 0.04,
        hilum=(centre + 0.04, a.hilum_y + 0.02),
    )


def _lateral_outline(g: _LateralGeometry, n: int = 48) -> np.ndarray:
    """Closed outline of the superimposed lungs on a lateral film, (N, 2) normalised (x, y).

    Anterior border (apex -> anterior costophrenic angle, bowing forward behind the sternum),
    diaphragm (a dome rising between the angles), posterior border (the deep posterior sulcus up
    along the ribs to the apex).
    """
    (apex_x, apex_y), (front_x, front_y), (back_x, back_y) = (
        g.apex,
        g.anterior_base,
        g.posterior_base,
    )
    t = np.linspace(0.0, 1.0, n)
    forward = np.sin(np.minimum(t / 0.3, 1.0) * math.pi / 2) ** 0.5  # a rounded apex
    anterior = np.stack([apex_x + (front_x - apex_x) * forward, apex_y + (front_y - apex_y) * t], 1)
    s = np.linspace(0.0, 1.0, n)[1:]
    dome = np.stack(
        [
            front_x + (back_x - front_x) * s,
            front_y + (back_y - front_y) * s**1.5 - g.dome_height * np.sin(math.pi * s**0.8),
        ],
        1,
    )
    u = np.linspace(0.0, 1.0, n)[1:-1]
    over_apex = 1.0 - np.cos(np.clip((u - 0.75) / 0.25, 0.0, 1.0) * math.pi / 2) ** 0.5
    back_wall = back_x + 0.02 * np.sin(math.pi * u) + (apex_x - back_x) * over_apex
    posterior = np.stack([back_wall, back_y + (apex_y - back_y) * u], 1)
    return np.concatenate([anterior, dome, posterior])


def lateral_lung_mask(anatomy: ChestAnatomy, size: ImageShape) -> np.ndarray:
    """The superimposed lung fields of ``anatomy`` on a lateral film of ``size``.

    Returns:
        uint8 0/1 mask, H×W. The patient faces the image left: anterior is left, the spine right.
    """
    canvas = _Canvas.of(size)
    return _fill(_lateral_outline(_lateral_geometry(anatomy)), canvas)


def _lateral_body(
    g: _LateralGeometry, a: ChestAnatomy, xx: np.ndarray, yy: np.ndarray, side: int
) -> np.ndarray:
    """Soft tissue of a lateral film: neck, the trunk seen side-on, shoulders over the apex."""
    neck_front, neck_back = a.midline - 0.09, a.midline + 0.13
    to_trunk = _smoothstep(a.apex_y - 0.12, a.apex_y + 0.04, yy)
    front = neck_front + (g.anterior_skin - neck_front) * to_trunk
    front = front - 0.04 * _smoothstep(a.base_y, a.base_y + 0.3, yy)  # the abdominal wall
    back = neck_back + (g.posterior_skin - neck_back) * to_trunk
    inside = _blur(((xx > front) & (xx < back)).astype(np.float32), 0.004 * side)
    # the beam crosses the chest's whole width: thickest mid-way between sternum and spine
    centre, half_depth = 0.5 * (front + back), 0.5 * (back - front)
    thickness = np.sqrt(np.clip(1.0 - ((xx - centre) / half_depth) ** 2, 0.0, 1.0))
    tissue = inside * (0.5 + 0.35 * thickness)
    shoulders = ((xx - a.midline - 0.02) / 0.2) ** 2 + ((yy - a.apex_y + 0.02) / 0.12) ** 2 < 1
    tissue += 0.2 * _blur(shoulders.astype(np.float32), 0.03 * side) * inside
    return tissue


def _lateral_bones(
    rng: np.random.Generator,
    g: _LateralGeometry,
    a: ChestAnatomy,
    canvas: _Canvas,
    lung_soft: np.ndarray,
) -> np.ndarray:
    """Vertebral bodies with disc spaces, the sternum and both sides' ribs, as attenuation.

    The ribs show over the lung (``lung_soft``, float H×W) and fade over the soft tissue.
    """
    side_px = canvas.side
    height = 0.045
    tops = np.arange(a.apex_y - 0.2, a.base_y + 0.35, height + 0.012)
    kyphosis = 0.03 * np.sin(math.pi * np.clip((tops - a.apex_y + 0.2) / 1.1, 0, 1))
    bodies = []
    for top, bow in zip(tops, kyphosis, strict=True):
        front = g.spine_front + bow + rng.normal(0, 0.002)
        bodies.append([[front, top], [front + 0.1, top], [front + 0.1, top + height]])
        bodies[-1].append([front, top + height])
    spine = canvas.zeros()
    cv2.fillPoly(spine, list(canvas.to_pixels(np.array(bodies))), 1.0, cv2.LINE_AA, _SUBPIXEL_BITS)
    cortex = spine - cv2.erode(spine, np.ones((3, 3), np.uint8))
    bones = 0.12 * spine + 0.06 * cortex

    ribs = canvas.zeros()
    s = np.linspace(0.0, 1.0, 24)
    n_ribs = 9
    y0 = a.apex_y + 0.02 + np.arange(n_ribs)[:, None] * (a.base_y - a.apex_y) / n_ribs
    for magnification in (0.0, 0.025):  # the far side's ribs project a little larger and lower
        xs = g.spine_front + 0.08 - s * (g.spine_front + 0.08 - g.anterior_skin - 0.05)
        ys = y0 + magnification + (0.12 + magnification) * s**1.4 - 0.03 * np.sin(math.pi * s)
        xs = np.broadcast_to(xs, ys.shape)
        thickness = max(1, round(side_px * 0.012))
        _polylines(ribs, canvas, np.stack([xs, ys], axis=-1), 1.0, thickness)
    bones += 0.04 * np.minimum(ribs, 1.0) * (0.2 + 0.8 * lung_soft)
    sternum = np.array(
        [[g.anterior_skin + 0.015, a.apex_y + 0.08], [g.anterior_skin + 0.03, a.base_y - 0.08]]
    )
    _polylines(bones, canvas, sternum, 0.08, max(1, round(side_px * 0.02)))
    return _blur(bones, 0.0025 * side_px)


def render_lateral_xray(
    rng: np.random.Generator,
    size: ImageShape,
    *,
    anatomy: ChestAnatomy | None = None,
    pneumothorax: np.ndarray | None = None,
) -> np.ndarray:
    """Render one synthetic lateral chest radiograph (patient facing the image left).

    One lung field (both lungs superimposed) between the sternum and the spine, the heart over
    its anterior-inferior part, vertebral bodies posteriorly, the diaphragm below, the shoulders
    over the apex. A pneumothorax is drawn as on the frontal film (no texture, darker, pleural
    line).

    Args:
        rng: the random source (texture, exposure, noise; and the anatomy if not given).
        size: ``size`` or ``(height, width)`` in pixels.
        anatomy: the chest (the same object as its frontal film gives matching heights).
        pneumothorax: optional H×W mask; only its part inside :func:`lateral_lung_mask` counts.

    Returns:
        uint8 array H×W, MONOCHROME2 (bright = dense).
    """
    if anatomy is None:
        anatomy = sample_anatomy(rng)
    a = anatomy
    canvas = _Canvas.of(size)
    _check_mask_shape(pneumothorax, canvas)
    side = canvas.side
    g = _lateral_geometry(a)
    texture_rng, bone_rng, finding_rng, exposure_rng = rng.spawn(4)
    yy, xx = canvas.grid()
    lungs = lateral_lung_mask(a, canvas.shape)
    lung_soft = _blur(lungs, 0.008 * side)
    lung_depth = _blur(lungs, 0.05 * side)

    density = _lateral_body(g, a, xx, yy, side)
    heart_x, heart_y = g.anterior_skin + 0.2, a.base_y - 0.13
    heart = ((xx - heart_x) / (0.17 + 0.3 * a.heart_width)) ** 2 + ((yy - heart_y) / 0.16) ** 2
    heart = _blur((heart < 1).astype(np.float32), 0.02 * side)
    density += 0.08 * heart
    trachea = (np.abs(xx - g.hilum[0] + 0.02 + 0.08 * (yy - a.hilum_y)) < 0.016) & (yy < g.hilum[1])
    density -= 0.1 * _blur(trachea.astype(np.float32), 0.004 * side)
    air = texture_rng.uniform(0.34, 0.42) * (0.5 * lung_soft + 0.5 * lung_depth)
    density -= air * (1.0 - 0.5 * heart)
    density += 0.03 * _band_noise(texture_rng, canvas.shape, 0.03 * side, 0.12 * side) * lung_depth
    hila = (g.hilum[0], 0.0, g.hilum[1])
    texture = 0.1 * _vessels(texture_rng, canvas, lung_soft, hila, 0.3)
    texture += 0.03 * _band_noise(texture_rng, canvas.shape, 0.006 * side, 0.025 * side) * lung_soft

    gains = _finding_gains(finding_rng)
    if pneumothorax is not None:
        _add_pneumothorax(density, texture, pneumothorax, lungs, lung_soft, gains, side)
    density += texture + _lateral_bones(bone_rng, g, a, canvas, lung_soft)
    return _expose(exposure_rng, density, side)


def _expose(rng: np.random.Generator, density: np.ndarray, side: int) -> np.ndarray:
    """Window, gamma, detector blur and noise: attenuation map -> uint8 MONOCHROME2 image."""
    low = rng.uniform(-0.05, 0.08)
    high = rng.uniform(1.1, 1.3)
    image = np.clip((density - low) / (high - low), 0.0, 1.0) ** rng.uniform(0.8, 1.3)
    height = density.shape[0]
    heel = (
        1.0 + rng.uniform(-0.08, 0.08) * (np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None])
    )
    image = _blur(image * heel, 0.002 * side)
    image += rng.uniform(0.003, 0.012) * rng.standard_normal(image.shape).astype(np.float32)
    image = image * rng.uniform(0.85, 1.0) + rng.uniform(0.0, 0.06)
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
