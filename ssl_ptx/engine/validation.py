"""What :meth:`Trainer.evaluate <ssl_ptx.engine.trainer.Trainer.evaluate>` measures.

A :class:`ValidationMetrics` turns each validation batch into per-image columns (numpy arrays,
gathered over DDP processes) and the gathered columns into the epoch's ``val_*`` metrics. The
Trainer adds ``val_loss`` and ``val_images``. :class:`SegmentationMetrics` (the default) scores
masks with the competition Dice; :class:`ssl_ptx.classifier.ClassificationMetrics` scores an
image classifier.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ssl_ptx.metrics import dice_per_image

__all__ = ["SegmentationMetrics", "ValidationMetrics"]


class ValidationMetrics(abc.ABC):
    """Per-image columns of each batch, then the epoch's metrics from all of them.

    Attributes:
        columns: column name → numpy dtype of what :meth:`per_image` returns (a process with
            no validation batch contributes empty columns of these dtypes).
    """

    columns: Mapping[str, Any]

    @abc.abstractmethod
    def per_image(self, outputs: torch.Tensor, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """One value per image of the batch for every name of :attr:`columns`.

        Args:
            outputs: the model's float32 output as ``Trainer.validation_step`` returns it
                (mask logits ``[B, 1, H, W]``, or image logits ``[B, 1]`` for a classifier).
            batch: the batch on the trainer's device (``mask``, ``label``, …).
        """

    @abc.abstractmethod
    def summarise(self, columns: Mapping[str, np.ndarray]) -> dict[str, float]:
        """The ``val_*`` metrics of the gathered columns (each ``[N]``, N >= 0)."""


class SegmentationMetrics(ValidationMetrics):
    """The competition Dice of masks ``probability > threshold`` (empty truth and empty
    prediction score 1).

    Returns ``val_dice`` (mean over images), ``val_dice_pos`` (images with a pneumothorax),
    ``val_fp_rate`` (share of empty-truth images with any predicted pixel) and
    ``val_all_empty_dice`` (the score of predicting nothing: the share of empty-truth images).
    """

    columns = {"dice": np.float64, "positive": bool, "predicted": bool}

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self._cut = math.log(threshold / (1.0 - threshold))

    def per_image(self, outputs: torch.Tensor, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        prediction = outputs > self._cut
        truth = batch["mask"] > 0.5
        return {
            "dice": np.asarray(dice_per_image(prediction, truth)),
            "positive": truth.flatten(1).any(1).cpu().numpy(),
            "predicted": prediction.flatten(1).any(1).cpu().numpy(),
        }

    def summarise(self, columns: Mapping[str, np.ndarray]) -> dict[str, float]:
        dice, positive = columns["dice"], columns["positive"]
        negative = ~positive
        n = dice.size
        return {
            "val_dice": float(dice.mean()) if n else math.nan,
            "val_dice_pos": float(dice[positive].mean()) if positive.any() else math.nan,
            "val_fp_rate": float(columns["predicted"][negative].mean())
            if negative.any()
            else math.nan,
            "val_all_empty_dice": float(negative.mean()) if n else math.nan,
        }
