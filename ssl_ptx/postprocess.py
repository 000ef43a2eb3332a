"""Post-processing rules that turn probability maps into masks, and a grid tuner for them.

A rule is a small frozen object with parameters, called as ``rule(prob, presence=None)``:

``Threshold(threshold)``
    mask = p > threshold (the 3rd place: 0.5).
``TripletThreshold(top, min_area, bottom)``
    the 1st place's triplet: an image is positive iff at least ``min_area`` of its pixels have
    p > ``top``; a positive image's mask is p > ``bottom``, any other image's is empty.
``PresenceGate(rule, threshold)``
    the 4th place's gate: ``rule``'s mask where the presence-head probability is at least
    ``threshold``, an empty mask elsewhere. Any image-level score gates the same way: an
    image classifier's probability (9th, 10th place) or the maximum pixel probability (8th
    place) — what :class:`ssl_ptx.inference.Predictor` reports as ``presence`` with
    ``gate="classifier"`` / ``"max_pixel"``; :data:`GATE_GRID` is a grid for its threshold.
``RemoveSmallComponents(rule, min_area)``
    ``rule``'s mask without its 8-connected components smaller than ``min_area``.

The last two wrap another rule, which is how rules compose::

    PresenceGate(TripletThreshold(0.8, 800 / 768**2, 0.4), threshold=0.4)          # 4th place
    RemoveSmallComponents(TripletThreshold(0.7, 800 / 1024**2, 0.3), 100 / 1024**2)  # 1st place

Areas are **fractions of the image's pixels**, so a rule tuned on 256² maps means the same on
1024² maps (the winners' pixel counts were stated at 1024², 768² for the 4th place: divide by
that area). Probability maps may be float (probabilities) or ``uint8`` (``round(255·p)``, as
:class:`ssl_ptx.inference.ProbabilityStore` keeps them): on ``uint8`` maps the comparison
``p > t`` is done exactly on the integer codes, ``v > floor(255·t)``.

:func:`tune_rule` searches a grid over a rule's parameters (named as :meth:`MaskRule.parameters`
names them, e.g. ``"top"`` or ``"rule.top"`` inside a wrapper) on out-of-fold maps and truth
masks, maximising the competition Dice of :mod:`ssl_ptx.metrics`. It reads every map once and
keeps per-image histograms (and, when a grid removes small components, the components'
areas), so each grid point costs a few vectorised operations over the images, not a pass over
the pixels. :func:`save_rule` / :func:`load_rule` keep the chosen rule as JSON beside the model.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ssl_ptx.fileio import atomic_write_bytes

__all__ = [
    "GATE_GRID",
    "TRIPLET_GRID",
    "MaskRule",
    "PresenceGate",
    "RemoveSmallComponents",
    "Threshold",
    "TripletThreshold",
    "TuningResult",
    "load_rule",
    "quantise",
    "rule_from_dict",
    "save_rule",
    "threshold_code",
    "tune_rule",
]

_LEVELS = 255  # uint8 maps hold round(255·p)
_CODE_EPS = 1e-6  # absorbs float error in 255·t (0.2·255 = 51.000000000000007)

#: a default grid for :class:`TripletThreshold` around the 1st place's values (areas are the
#: 1st place's 0–4000 px at 1024², as fractions)
TRIPLET_GRID: dict[str, list[float]] = {
    "top": [0.5, 0.6, 0.7, 0.75, 0.8, 0.9],
    "min_area": [a / 1024**2 for a in (0, 250, 500, 1000, 2000, 4000)],
    "bottom": [0.2, 0.3, 0.4, 0.5],
}


#: a default grid for the ``threshold`` of :class:`PresenceGate` over any image score in [0, 1]
GATE_GRID: list[float] = [round(0.05 * k, 2) for k in range(1, 20)]


def threshold_code(threshold: float) -> int:
    """The uint8 code ``c`` such that, for ``v = round(255·p)``, "p > threshold" is ``v > c``.

    ``c = floor(255·threshold)``: a code ``v`` stands for ``p = v / 255``, which exceeds the
    threshold exactly when ``v > 255·threshold``.
    """
    return math.floor(threshold * _LEVELS + _CODE_EPS)


def _above(prob: np.ndarray, threshold: float) -> np.ndarray:
    """``prob > threshold`` for float maps, on the integer codes for uint8 maps."""
    if prob.dtype == np.uint8:
        return prob > threshold_code(threshold)
    return prob > threshold


def _check_probability(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value}")
    return value


def _check_area(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{name} is a fraction of the image's pixels and must be in [0, 1], got {value} "
            "(divide a pixel count by the image area, e.g. 2000 / 1024**2)"
        )
    return value


@dataclass(frozen=True)
class _Plan:
    """What a rule does, in the terms the tuner scores: gates on per-image quantities, then a
    pixel threshold and a minimum component area."""

    pixel_threshold: float
    count_gates: tuple[tuple[float, float], ...] = ()  # (top, min_area): #(p > top) >= area
    presence_threshold: float | None = None
    min_component_area: float = 0.0


_RULES: dict[str, type[MaskRule]] = {}


class MaskRule(ABC):
    """Base class of the rules: ``rule(prob, presence=None) -> bool masks``.

    Subclasses are frozen dataclasses whose fields are the parameters (a field named ``rule``
    holds a wrapped rule); they set ``name`` (the key in :meth:`to_dict`) and implement
    ``_apply`` and ``_plan``.
    """

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _RULES[cls.name] = cls

    def __call__(
        self,
        prob: np.ndarray | torch.Tensor,
        presence: float | Sequence[float] | np.ndarray | torch.Tensor | None = None,
    ) -> np.ndarray:
        """Masks of probability maps.

        Args:
            prob: ``[H, W]`` or ``[B, H, W]`` probabilities: float in [0, 1], or ``uint8``
                codes ``round(255·p)``; numpy or torch.
            presence: per-image presence probabilities (a float, or ``[B]``), needed only by
                :class:`PresenceGate`.

        Returns:
            bool numpy array of ``prob``'s shape.
        """
        maps = _as_numpy(prob)
        single = maps.ndim == 2
        if single:
            maps = maps[None]
        if maps.ndim != 3:
            raise ValueError(f"expected [H, W] or [B, H, W] maps, got shape {maps.shape}")
        scores = None
        if presence is not None:
            scores = np.atleast_1d(_as_numpy(presence)).astype(np.float64)
            if scores.shape != (len(maps),):
                raise ValueError(f"{len(maps)} maps but presence of shape {scores.shape}")
        masks = self._apply(maps, scores)
        return masks[0] if single else masks

    @abstractmethod
    def _apply(self, maps: np.ndarray, presence: np.ndarray | None) -> np.ndarray:
        """Masks ``[N, H, W]`` bool of probability maps ``[N, H, W]`` (image scores ``[N]`` or
        None)."""

    @abstractmethod
    def _plan(self) -> _Plan:
        """What the rule does, in the terms the tuner scores (see :class:`_Plan`)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description; :func:`rule_from_dict` rebuilds the rule."""
        data: dict[str, Any] = {"name": self.name}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            data[field.name] = value.to_dict() if isinstance(value, MaskRule) else value
        return data

    def parameters(self) -> dict[str, float]:
        """Tunable parameters by dotted name (``"rule.top"`` is ``top`` of the wrapped rule)."""
        values: dict[str, float] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, MaskRule):
                values.update({f"{field.name}.{k}": v for k, v in value.parameters().items()})
            else:
                values[field.name] = value
        return values

    def with_parameters(self, values: Mapping[str, float]) -> MaskRule:
        """A copy with some parameters (dotted names of :meth:`parameters`) replaced.

        Raises:
            KeyError: a name that is not a parameter of this rule (the message lists them).
        """
        unknown = sorted(set(values) - set(self.parameters()))
        if unknown:
            raise KeyError(
                f"{type(self).__name__} has no parameter(s) {unknown}; "
                f"its parameters: {sorted(self.parameters())}"
            )
        data = self.to_dict()
        for dotted, value in values.items():
            *path, leaf = dotted.split(".")
            node = data
            for key in path:
                node = node[key]
            node[leaf] = value
        return rule_from_dict(data)


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def rule_from_dict(data: Mapping[str, Any]) -> MaskRule:
    """Rebuild a rule from :meth:`MaskRule.to_dict`.

    Raises:
        ValueError: unknown rule name, or missing / unknown parameters (named).
    """
    if not isinstance(data, Mapping) or "name" not in data:
        raise ValueError(f"a rule is a mapping with a 'name' key, got {data!r}")
    name = data["name"]
    if name not in _RULES:
        raise ValueError(f"unknown rule {name!r}; known: {sorted(_RULES)}")
    cls = _RULES[name]
    names = {field.name for field in dataclasses.fields(cls)}
    given = set(data) - {"name"}
    if given != names:
        raise ValueError(
            f"rule {name!r} takes {sorted(names)}; got {sorted(given)} "
            f"(missing {sorted(names - given)}, unknown {sorted(given - names)})"
        )
    kwargs = {
        key: rule_from_dict(value) if key == "rule" else value
        for key, value in data.items()
        if key != "name"
    }
    return cls(**kwargs)


@dataclass(frozen=True)
class Threshold(MaskRule):
    """mask = p > ``threshold``."""

    name: ClassVar[str] = "threshold"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _check_probability("threshold", self.threshold))

    def _apply(self, maps: np.ndarray, presence: np.ndarray | None) -> np.ndarray:
        return _above(maps, self.threshold)

    def _plan(self) -> _Plan:
        return _Plan(pixel_threshold=self.threshold)


@dataclass(frozen=True)
class TripletThreshold(MaskRule):
    """The 1st place's triplet (sneddy): positive iff ``#(p > top) >= min_area · H · W``;
    then mask = p > ``bottom``, else empty.

    Args:
        top: the "sure pixel" threshold.
        min_area: fraction of the image's pixels that must exceed ``top`` (the 1st place used
            600–2000 px at 1024²: 5.7e-4 – 1.9e-3).
        bottom: the threshold of the mask of a positive image (usually below ``top``).
    """

    name: ClassVar[str] = "triplet"
    top: float = 0.75
    min_area: float = 2000 / 1024**2
    bottom: float = 0.3

    def __post_init__(self) -> None:
        object.__setattr__(self, "top", _check_probability("top", self.top))
        object.__setattr__(self, "min_area", _check_area("min_area", self.min_area))
        object.__setattr__(self, "bottom", _check_probability("bottom", self.bottom))

    def _apply(self, maps: np.ndarray, presence: np.ndarray | None) -> np.ndarray:
        n_pixels = maps.shape[1] * maps.shape[2]
        sure = _above(maps, self.top).sum(axis=(1, 2))
        positive = sure >= self.min_area * n_pixels
        return _above(maps, self.bottom) & positive[:, None, None]

    def _plan(self) -> _Plan:
        return _Plan(pixel_threshold=self.bottom, count_gates=((self.top, self.min_area),))


@dataclass(frozen=True)
class PresenceGate(MaskRule):
    """The 4th place's gate: ``rule``'s mask where presence >= ``threshold``, else empty.

    Needs the presence-head probabilities (``presence=`` in the call).
    """

    name: ClassVar[str] = "presence_gate"
    rule: MaskRule
    threshold: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _check_probability("threshold", self.threshold))

    def _apply(self, maps: np.ndarray, presence: np.ndarray | None) -> np.ndarray:
        if presence is None:
            raise ValueError(
                "PresenceGate needs presence probabilities (presence=...): the model has no "
                "presence head, or they were not passed"
            )
        return self.rule._apply(maps, presence) & (presence >= self.threshold)[:, None, None]

    def _plan(self) -> _Plan:
        inner = self.rule._plan()
        gate = self.threshold
        if inner.presence_threshold is not None:
            gate = max(gate, inner.presence_threshold)
        return dataclasses.replace(inner, presence_threshold=gate)


@dataclass(frozen=True)
class RemoveSmallComponents(MaskRule):
    """``rule``'s mask without its 8-connected components of fewer than ``min_area · H · W``
    pixels (the 1st place removed contours of area <= 100 px at 1024², measured as polygon
    area; here the pixel count is used)."""

    name: ClassVar[str] = "remove_small_components"
    rule: MaskRule
    min_area: float = 100 / 1024**2

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_area", _check_area("min_area", self.min_area))

    def _apply(self, maps: np.ndarray, presence: np.ndarray | None) -> np.ndarray:
        masks = self.rule._apply(maps, presence)
        min_pixels = self.min_area * maps.shape[1] * maps.shape[2]
        for mask in masks:
            if mask.any():
                labels, areas = _components(mask)
                mask &= (areas >= min_pixels)[labels]
        return masks

    def _plan(self) -> _Plan:
        inner = self.rule._plan()
        return dataclasses.replace(
            inner, min_component_area=max(inner.min_component_area, self.min_area)
        )


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected ``labels`` (int32 H×W, 0 = background) and ``areas`` per label (area[0] = 0,
    so indexing ``areas[labels]`` never keeps background)."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    areas = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    areas[0] = 0
    return labels, areas


def save_rule(rule: MaskRule, path: str | os.PathLike) -> Path:
    """Write ``rule`` as JSON (atomically); :func:`load_rule` reads it back."""
    text = json.dumps(rule.to_dict(), indent=2) + "\n"
    return atomic_write_bytes(path, text.encode())


def load_rule(path: str | os.PathLike) -> MaskRule:
    """Read a rule written by :func:`save_rule`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON or not a rule; the message names the file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return rule_from_dict(data)
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: not a post-processing rule: {error}") from None


# ---------------------------------------------------------------------------------------------
# the tuner


@dataclass
class TuningResult:
    """What :func:`tune_rule` found.

    Attributes:
        rule: the best rule (the first grid point in grid order among equal scores).
        score: its mean competition Dice.
        table: one row per grid point, best first: the parameters, ``dice``,
            ``dice_positive`` (mean over images with a lesion), ``false_positive_rate``
            (share of empty images given a mask).
        n_images: images the rule was tuned on.
    """

    rule: MaskRule
    score: float
    table: pd.DataFrame
    n_images: int


class _ImageStatistics:
    """Per-image quantities from which any plan's Dice follows without the maps.

    ``above[i, c]`` = #(v > c) and ``inter_above[i, c]`` = #(v > c ∧ truth) for every code c,
    from 256-bin histograms; for each code in ``component_codes`` the 8-connected components
    of (v > c) as flat arrays (image index, area, pixels inside the truth).
    """

    def __init__(self, component_codes: set[int]) -> None:
        self.component_codes = sorted(component_codes)
        self._hist: list[np.ndarray] = []
        self._hist_true: list[np.ndarray] = []
        self._n_true: list[int] = []
        self._n_pixels: list[int] = []
        self._components: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {
            code: [] for code in self.component_codes
        }

    def add(self, codes: np.ndarray, truth: np.ndarray) -> None:
        index = len(self._hist)
        flat = codes.ravel()
        truth_flat = truth.ravel()
        self._hist.append(np.bincount(flat, minlength=_LEVELS + 1))
        self._hist_true.append(np.bincount(flat[truth_flat], minlength=_LEVELS + 1))
        self._n_true.append(int(truth_flat.sum()))
        self._n_pixels.append(flat.size)
        for code in self.component_codes:
            foreground = codes > code
            if not foreground.any():
                continue
            labels, areas = _components(foreground)
            inside = np.bincount(labels[truth], minlength=len(areas))
            self._components[code].append((index, areas[1:], inside[1:]))

    def finish(self) -> None:
        """Turn the per-image lists into arrays."""
        hist = np.array(self._hist, np.int64).reshape(-1, _LEVELS + 1)
        hist_true = np.array(self._hist_true, np.int64).reshape(-1, _LEVELS + 1)
        # above[:, c] = pixels with code > c = sum of bins c+1 .. 255
        self.above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1] - hist
        self.inter_above = np.cumsum(hist_true[:, ::-1], axis=1)[:, ::-1] - hist_true
        self.n_true = np.array(self._n_true, np.float64)
        self.n_pixels = np.array(self._n_pixels, np.float64)
        self.components = {}
        for code, parts in self._components.items():
            if parts:
                image = np.concatenate([np.full(len(a), i) for i, a, _ in parts])
                area = np.concatenate([a for _, a, _ in parts])
                inside = np.concatenate([t for _, _, t in parts])
            else:
                image = area = inside = np.zeros(0, np.int64)
            self.components[code] = (image, area.astype(np.float64), inside.astype(np.float64))

    def __len__(self) -> int:
        return len(self._hist)

    def scores(
        self, plan: _Plan, presence: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-image ``(dice, n_predicted, n_true)`` of ``plan``."""
        n = len(self.n_true)
        gate = np.ones(n, bool)
        for top, min_area in plan.count_gates:
            gate &= self.above[:, threshold_code(top)] >= min_area * self.n_pixels
        if plan.presence_threshold is not None:
            gate &= presence >= plan.presence_threshold
        code = threshold_code(plan.pixel_threshold)
        if plan.min_component_area > 0:
            image, area, inside = self.components[code]
            keep = area >= plan.min_component_area * self.n_pixels[image]
            predicted = np.bincount(image[keep], weights=area[keep], minlength=n)
            overlap = np.bincount(image[keep], weights=inside[keep], minlength=n)
        else:
            predicted = self.above[:, code].astype(np.float64)
            overlap = self.inter_above[:, code].astype(np.float64)
        predicted = np.where(gate, predicted, 0.0)
        overlap = np.where(gate, overlap, 0.0)
        total = predicted + self.n_true
        dice = np.where(total > 0, 2.0 * overlap / np.maximum(total, 1.0), 1.0)
        return dice, predicted, self.n_true


def quantise(prob: np.ndarray) -> np.ndarray:
    """``uint8`` codes ``round(255·p)`` of probabilities in [0, 1] (values outside are clipped);
    ``uint8`` input is returned as it is. The error is at most 1/510."""
    if prob.dtype == np.uint8:
        return prob
    return np.rint(np.clip(prob, 0.0, 1.0) * _LEVELS).astype(np.uint8)


def tune_rule(
    rule: MaskRule,
    grid: Mapping[str, Sequence[float]],
    probabilities: Iterable[np.ndarray | torch.Tensor],
    truths: Iterable[np.ndarray | torch.Tensor],
    presence: Sequence[float] | np.ndarray | None = None,
    *,
    progress: bool = True,
) -> TuningResult:
    """Grid search of ``rule``'s parameters maximising the mean competition Dice.

    Every combination of the grid's values is scored; parameters absent from ``grid`` keep
    ``rule``'s values. Maps are read once (they may be a generator, e.g. over a
    :class:`~ssl_ptx.inference.ProbabilityStore`) and quantised to ``uint8`` codes
    ``round(255·p)``; the scores are exact for rules applied to those codes (for float maps,
    a pixel within 1/510 of a threshold may fall on the other side).

    Args:
        rule: the rule to tune (built from :class:`Threshold`, :class:`TripletThreshold`,
            :class:`PresenceGate`, :class:`RemoveSmallComponents`).
        grid: parameter name (as in ``rule.parameters()``) → values to try.
        probabilities: H×W maps, float probabilities or ``uint8`` codes, out-of-fold.
        truths: matching H×W truth masks (nonzero = lesion).
        presence: per-image presence probabilities, needed when the rule has a
            :class:`PresenceGate`.
        progress: show a progress bar over the images.

    Returns:
        A :class:`TuningResult`.

    Raises:
        KeyError: a grid name that is not a parameter of ``rule``.
        ValueError: an empty grid axis, a map and truth of different shapes (the image's
            position is named), unequal numbers of maps and truths, or missing presence.
    """
    names = list(grid)
    axes = [list(grid[name]) for name in names]
    for name, values in zip(names, axes, strict=True):
        if not values:
            raise ValueError(f"grid axis {name!r} has no values")
    candidates = [
        rule.with_parameters(dict(zip(names, values, strict=True)))
        for values in itertools.product(*axes)
    ]
    plans = [candidate._plan() for candidate in candidates]
    needs_presence = any(plan.presence_threshold is not None for plan in plans)
    component_codes = {
        threshold_code(plan.pixel_threshold) for plan in plans if plan.min_component_area > 0
    }

    statistics = _ImageStatistics(component_codes)
    sentinel = object()
    pairs = itertools.zip_longest(probabilities, truths, fillvalue=sentinel)
    for index, (prob, truth) in enumerate(
        tqdm(pairs, desc="tuning: reading maps", unit="img", disable=not progress)
    ):
        if prob is sentinel or truth is sentinel:
            raise ValueError(f"probabilities and truths differ in length (at image {index})")
        codes, mask = quantise(_as_numpy(prob)), _as_numpy(truth) != 0
        if codes.ndim != 2 or codes.shape != mask.shape:
            raise ValueError(
                f"image {index}: probability map {codes.shape} and truth {mask.shape} must be "
                "H×W arrays of the same shape"
            )
        statistics.add(codes, mask)
    statistics.finish()
    n_images = len(statistics)
    if n_images == 0:
        raise ValueError("tune_rule needs at least one image")
    scores_presence = None
    if needs_presence:
        if presence is None:
            raise ValueError("the rule has a PresenceGate: pass presence=")
        scores_presence = np.asarray(presence, np.float64)
        if scores_presence.shape != (n_images,):
            raise ValueError(f"{n_images} images but presence of shape {scores_presence.shape}")

    rows = []
    for values, plan in zip(itertools.product(*axes), plans, strict=True):
        dice, predicted, n_true = statistics.scores(plan, scores_presence)
        positive = n_true > 0
        rows.append(
            {
                **dict(zip(names, values, strict=True)),
                "dice": float(dice.mean()),
                "dice_positive": float(dice[positive].mean()) if positive.any() else math.nan,
                "false_positive_rate": float((predicted[~positive] > 0).mean())
                if (~positive).any()
                else math.nan,
            }
        )
    table = pd.DataFrame(rows)
    order = np.argsort(-table["dice"].to_numpy(), kind="stable")
    best = int(order[0])
    return TuningResult(
        rule=candidates[best],
        score=float(table["dice"].iat[best]),
        table=table.iloc[order].reset_index(drop=True),
        n_images=n_images,
    )
