"""The SIIM-ACR competition metric: mean over images of the Dice coefficient.

Per image, with binary prediction P and truth T:

* Dice = 2|P ∧ T| / (|P| + |T|) when |P| + |T| > 0;
* empty truth and empty prediction score **1**;
* empty truth with any predicted pixel scores **0** (so false positives on the ~78 % of
  negative images dominate the ranking).

Inputs may be numpy arrays or torch tensors, shaped ``[H, W]`` (one image), ``[B, H, W]`` or
``[B, 1, H, W]``; any nonzero value counts as foreground (threshold probabilities first).
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch

__all__ = ["DiceBreakdown", "dice_breakdown", "dice_per_image", "mean_dice"]

Masks = np.ndarray | torch.Tensor


def _per_image_counts(pred: Masks, target: Masks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image |P∧T|, |P| and |T| as float64 numpy arrays of shape [B]."""
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    if pred.ndim == 4:
        if pred.shape[1] != 1:
            raise ValueError(f"expected one channel, got shape {tuple(pred.shape)}")
        pred, target = pred[:, 0], target[:, 0]
    if pred.ndim != 3:
        raise ValueError(f"expected [H,W], [B,H,W] or [B,1,H,W], got {tuple(pred.shape)}")
    if isinstance(pred, torch.Tensor) or isinstance(target, torch.Tensor):
        p = torch.as_tensor(pred).flatten(1) != 0
        t = torch.as_tensor(target, device=p.device).flatten(1) != 0
        counts = torch.stack([(p & t).sum(1), p.sum(1), t.sum(1)]).double().cpu().numpy()
        return counts[0], counts[1], counts[2]
    p = np.asarray(pred).reshape(len(pred), -1) != 0
    t = np.asarray(target).reshape(len(target), -1) != 0
    return (
        (p & t).sum(1).astype(np.float64),
        p.sum(1).astype(np.float64),
        t.sum(1).astype(np.float64),
    )


def _dice_from_counts(inter: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray) -> np.ndarray:
    total = n_pred + n_true
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1.0), 1.0)


def dice_per_image(pred: Masks, target: Masks) -> np.ndarray:
    """Competition Dice of every image.

    Args:
        pred: binary predictions, ``[H,W]``, ``[B,H,W]`` or ``[B,1,H,W]`` (numpy or torch).
        target: binary ground truth of the same shape.

    Returns:
        float64 numpy array ``[B]`` (``[1]`` for a single image) with values in [0, 1].
    """
    return _dice_from_counts(*_per_image_counts(pred, target))


def mean_dice(pred: Masks, target: Masks) -> float:
    """Mean competition Dice over the images of a batch (the leaderboard score)."""
    return float(dice_per_image(pred, target).mean())


class DiceBreakdown(TypedDict):
    """What explains a competition score."""

    dice: float  # mean competition Dice over all images
    dice_positive: float  # mean Dice over images whose truth is non-empty (NaN if none)
    false_positive_rate: float  # share of empty-truth images with any predicted pixel (NaN if none)
    n_positive: int
    n_negative: int


def dice_breakdown(pred: Masks, target: Masks) -> DiceBreakdown:
    """The competition Dice split into its two halves.

    The score of an empty-truth image is 1 − (false positive), so the overall Dice equals
    ``(n_pos · dice_positive + n_neg · (1 − false_positive_rate)) / (n_pos + n_neg)``.
    """
    inter, n_pred, n_true = _per_image_counts(pred, target)
    scores = _dice_from_counts(inter, n_pred, n_true)
    positive = n_true > 0
    negative = ~positive
    return DiceBreakdown(
        dice=float(scores.mean()),
        dice_positive=float(scores[positive].mean()) if positive.any() else float("nan"),
        false_positive_rate=float((n_pred[negative] > 0).mean())
        if negative.any()
        else float("nan"),
        n_positive=int(positive.sum()),
        n_negative=int(negative.sum()),
    )
