"""An image-level "pneumothorax present" classifier, trained by the same Trainer, for gating.

Several top solutions decide *whether* an image has a pneumothorax with a separate classifier
and empty the segmentation of images it calls negative (the 9th place trained it on balanced
batches; the 10th place selected its checkpoints by F0.5 at a fixed threshold). The pieces:

* :class:`ImageClassifier` — any timm model by name with one logit (``[B, 1]``), registered
  with :func:`ssl_ptx.models.create_model` as ``arch="classifier"``, so its checkpoints are
  loaded by :func:`ssl_ptx.inference.load_model` and the Predictor's
  ``classifier_checkpoints=`` like any other;
* :func:`load_segmentation_encoder` — initialise the classifier's backbone from a trained
  segmentation model's encoder (several top solutions' classifiers share the segmentation
  encoder); a classifier trained from scratch on few images learns slowly from one label per
  image, while the segmentation encoder has already learnt the lesions from every pixel;
* :class:`ClassificationLoss` — BCE or focal loss of the logit against "the mask has any
  foreground pixel", taking the same ``(outputs, masks)`` as the segmentation losses;
* :class:`ClassificationMetrics` — the Trainer's validation metrics for it: ROC AUC, and
  F0.5, precision, recall, accuracy and the false-positive rate at a fixed threshold;
* :class:`ClassifierTrainConfig` and :data:`CLASSIFIER_PRESETS` — the run config of
  ``recipes/train_classifier.py`` (the usual data and trainer sections, a classifier model
  and loss section).

The Predictor's gate (``Predictor(gate="classifier", gate_threshold=…)``) empties the maps of
images whose classifier probability is below the threshold; the threshold can be tuned with
:class:`ssl_ptx.postprocess.PresenceGate` like a presence head's.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
from torch import nn

from ssl_ptx.config import ConfigError, DataConfig, TrainConfig, TrainerConfig
from ssl_ptx.engine.checkpoint import load_checkpoint
from ssl_ptx.engine.validation import ValidationMetrics
from ssl_ptx.losses import focal, presence_bce, presence_targets
from ssl_ptx.models import register_model

__all__ = [
    "CLASSIFICATION_METRICS",
    "CLASSIFIER_PRESETS",
    "ClassificationLoss",
    "ClassificationMetrics",
    "ClassifierLossConfig",
    "ClassifierModelConfig",
    "ClassifierTrainConfig",
    "ImageClassifier",
    "binary_auc",
    "f_beta",
    "load_segmentation_encoder",
]


class ImageClassifier(nn.Module):
    """A timm model with one output logit: images ``[B, C, H, W]`` → logits ``[B, 1]``.

    Args:
        encoder_name: a timm model name (``timm.list_models()``), e.g. ``"resnet18"``,
            ``"efficientnet_b0"``, ``"seresnext50_32x4d"``.
        encoder_weights: ``"imagenet"`` for timm's pretrained weights (downloaded by timm),
            None for a random initialisation (the default: no download).
        in_channels: image channels (1 for the grey X-ray; timm adapts the first layer).
        drop_rate: dropout before the final linear layer.

    Raises:
        ValueError: ``encoder_weights`` other than None or "imagenet".
    """

    def __init__(
        self,
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        in_channels: int = 1,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if encoder_weights not in (None, "imagenet"):
            raise ValueError(f"encoder_weights must be None or 'imagenet', got {encoder_weights!r}")
        self.backbone = timm.create_model(
            encoder_name,
            pretrained=encoder_weights is not None,
            num_classes=1,
            in_chans=in_channels,
            drop_rate=drop_rate,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


register_model("classifier", ImageClassifier)

#: where the segmentation models keep their encoder: smp encoders, then smp's ``tu-`` (timm)
#: encoders, whose names below the prefix are the timm model's own
_ENCODER_PREFIXES = ("encoder.model.", "encoder.")


def _head_prefix(backbone: nn.Module) -> str:
    """``"fc."`` or the like: the state-dict prefix of the timm model's classifier layer."""
    head = backbone.get_classifier()
    return next(f"{name}." for name, module in backbone.named_modules() if module is head)


def _encoder_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's tensors of a segmentation state dict, under their timm names."""
    for prefix in _ENCODER_PREFIXES:
        tensors = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if tensors:
            return tensors
    return {}


def load_segmentation_encoder(classifier: ImageClassifier, checkpoint: str | os.PathLike) -> int:
    """Copy a segmentation checkpoint's encoder weights into ``classifier``'s backbone.

    The segmentation models (UNet-CBAM and the smp architectures) keep their encoder under
    ``encoder.`` (smp's ResNet / ResNeXt encoders, named as timm's) or ``encoder.model.``
    (smp's ``tu-`` timm encoders). Every tensor of the backbone except its classifier layer
    (``get_classifier()``, left as initialised) must be there with the same shape: the same
    encoder (``resnet18`` ↔ ``resnet18`` or ``tu-resnet18``; ``efficientnet_b0`` ↔
    ``tu-efficientnet_b0``) and the same ``in_channels``. BatchNorm running statistics are
    copied with the weights.

    Args:
        classifier: the classifier to initialise (changed in place).
        checkpoint: a Trainer checkpoint or an exported ``model.pt`` of a segmentation model.

    Returns:
        The number of tensors copied.

    Raises:
        FileNotFoundError: no such file.
        ssl_ptx.engine.CheckpointError: not a readable ssl_ptx checkpoint (the message names
            the file).
        ValueError: the checkpoint has no encoder, or its encoder does not match the backbone
            (missing tensors or other shapes, some named); the message names the file.
    """
    path = Path(checkpoint)
    state = load_checkpoint(path, required=("model",))
    encoder = _encoder_tensors(state["model"])
    if not encoder:
        raise ValueError(
            f"{path}: holds no encoder weights (no 'encoder.*' tensors); expected a "
            "segmentation checkpoint (UNet-CBAM or an smp architecture)"
        )
    head = _head_prefix(classifier.backbone)
    wanted = {k: v for k, v in classifier.backbone.state_dict().items() if not k.startswith(head)}
    missing = [k for k in wanted if k not in encoder]
    reshaped = [
        f"{k} {list(encoder[k].shape)} vs {list(v.shape)}"
        for k, v in wanted.items()
        if k in encoder and encoder[k].shape != v.shape
    ]
    if missing or reshaped:
        model_config = state.get("config", {}).get("model", {})
        trained = (
            f"encoder {model_config.get('encoder_name')!r}, in_channels "
            f"{model_config.get('in_channels')}"
            if model_config
            else "no stored model config"
        )
        raise ValueError(
            f"{path}: its encoder ({trained}) does not match the classifier's backbone "
            f"({len(wanted)} tensors): {len(missing)} missing {missing[:3]}, {len(reshaped)} "
            f"of another shape {reshaped[:3]}"
        )
    classifier.backbone.load_state_dict({k: encoder[k] for k in wanted}, strict=False)
    return len(wanted)


class ClassificationLoss(nn.Module):
    """BCE or focal loss of image logits ``[B, 1]`` against image labels, mean over images.

    Targets are masks ``[B, 1, H, W]`` (label 1 where any pixel is > 0.5, as the Trainer
    passes them) or 0/1 labels ``[B]`` / ``[B, 1]``.

    Args:
        kind: "bce" or "focal" (α_t·(1 − p_t)^γ·BCE, :func:`ssl_ptx.losses.focal`).
        gamma: the focal exponent γ.
        alpha: the focal weight of positives α (negatives 1 − α); None for none.
    """

    def __init__(self, kind: str = "bce", gamma: float = 2.0, alpha: float | None = None) -> None:
        super().__init__()
        if kind not in ("bce", "focal"):
            raise ValueError(f"kind must be 'bce' or 'focal', got {kind!r}")
        self.kind, self.gamma, self.alpha = kind, gamma, alpha

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.kind == "bce":
            return presence_bce(outputs, targets)
        labels = presence_targets(targets) if targets.ndim >= 3 else targets.reshape(-1, 1)
        logits = outputs.reshape(len(outputs), 1, 1)
        return focal(logits, labels.reshape(len(labels), 1, 1), self.gamma, self.alpha)


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count ½), NaN unless both classes are present.

    Args:
        scores: ``[N]`` image scores (higher = more likely positive).
        labels: ``[N]`` bool or 0/1 truth.
    """
    labels = np.asarray(labels, bool)
    n_positive, n_negative = int(labels.sum()), int((~labels).sum())
    if n_positive == 0 or n_negative == 0:
        return math.nan
    scores = np.asarray(scores, np.float64)
    order = np.argsort(scores, kind="stable")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # 1-based, ties averaged
    return float(
        (ranks[labels].sum() - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)
    )


def f_beta(predicted: np.ndarray, labels: np.ndarray, beta: float = 0.5) -> float:
    """F-beta score of bool predictions: (1 + β²)·TP / ((1 + β²)·TP + β²·FN + FP); 0 when the
    numerator is 0 (β = 0.5 weighs precision over recall, the 10th place's selection)."""
    predicted, labels = np.asarray(predicted, bool), np.asarray(labels, bool)
    tp = float((predicted & labels).sum())
    fp = float((predicted & ~labels).sum())
    fn = float((~predicted & labels).sum())
    weight = 1.0 + beta**2
    denominator = weight * tp + beta**2 * fn + fp
    return weight * tp / denominator if tp > 0 else 0.0


#: what :class:`ClassificationMetrics` reports
CLASSIFICATION_METRICS = (
    "val_auc",
    "val_f05",
    "val_precision",
    "val_recall",
    "val_accuracy",
    "val_fp_rate",
)


class ClassificationMetrics(ValidationMetrics):
    """Validation of an image classifier by the Trainer (``Trainer(metrics=...)``).

    Per image the probability sigmoid(logit) and the label (the mask has a foreground pixel).
    Returns ``val_auc`` (ROC AUC), and at ``threshold``: ``val_f05`` (F0.5), ``val_precision``,
    ``val_recall``, ``val_accuracy``, ``val_fp_rate`` (share of negatives called positive).

    Args:
        threshold: the probability from which an image is called positive.
    """

    columns = {"probability": np.float64, "label": bool}

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold

    def per_image(self, outputs: torch.Tensor, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        probability = torch.sigmoid(outputs.float()).reshape(len(outputs))
        label = presence_targets(batch["mask"]).reshape(-1) > 0.5
        return {"probability": probability.cpu().numpy(), "label": label.cpu().numpy()}

    def summarise(self, columns: Mapping[str, np.ndarray]) -> dict[str, float]:
        probability, label = columns["probability"], columns["label"]
        called = probability >= self.threshold
        n_called = int(called.sum())
        return {
            "val_auc": binary_auc(probability, label),
            "val_f05": f_beta(called, label, 0.5) if label.size else math.nan,
            "val_precision": float((called & label).sum() / n_called) if n_called else math.nan,
            "val_recall": float(called[label].mean()) if label.any() else math.nan,
            "val_accuracy": float((called == label).mean()) if label.size else math.nan,
            "val_fp_rate": float(called[~label].mean()) if (~label).any() else math.nan,
        }


# ---------------------------------------------------------------------------------- config


@dataclass
class ClassifierModelConfig:
    """The classifier network; ``create_model(config_to_dict(…))`` builds it.

    Attributes:
        arch: ``"classifier"`` (:class:`ImageClassifier`).
        encoder_name: a timm model name.
        encoder_weights: "imagenet" (timm's pretrained weights) or None (random init).
        in_channels: image channels fed to the network.
        drop_rate: dropout before the last layer.
    """

    arch: Literal["classifier"] = "classifier"
    encoder_name: str = "resnet18"
    encoder_weights: str | None = None
    in_channels: int = 1
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.in_channels < 1:
            raise ConfigError(f"model.in_channels: must be >= 1, got {self.in_channels}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"model.drop_rate: must be in [0, 1), got {self.drop_rate}")


@dataclass
class ClassifierLossConfig:
    """The classifier loss (:class:`ClassificationLoss`).

    Attributes:
        name: "bce" or "focal".
        gamma: focal exponent.
        alpha: focal weight of positives (None: unweighted).
    """

    name: Literal["bce", "focal"] = "bce"
    gamma: float = 2.0
    alpha: float | None = None

    def build(self) -> ClassificationLoss:
        """The loss module."""
        return ClassificationLoss(self.name, self.gamma, self.alpha)


@dataclass
class ClassifierTrainConfig(TrainConfig):
    """A classifier run: :class:`TrainConfig` with the classifier's model and loss sections.

    ``trainer.monitor`` chooses the kept checkpoints: ``val_auc`` or ``val_f05`` (F0.5 at
    ``trainer.threshold``, the 10th place's selection).

    Attributes:
        encoder_init: a segmentation checkpoint whose encoder initialises the classifier's
            backbone (:func:`load_segmentation_encoder`; same encoder and in_channels), or
            None for ``model.encoder_weights``' initialisation. Train the segmentation model
            on the same folds, or its encoder has seen the classifier's validation images.
    """

    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    loss: ClassifierLossConfig = field(default_factory=ClassifierLossConfig)
    out_dir: str = "outputs/classifier"
    encoder_init: str | None = None

    def __post_init__(self) -> None:
        if self.encoder_init is not None and self.model.encoder_weights is not None:
            raise ConfigError(
                f"encoder_init ({self.encoder_init}) and model.encoder_weights "
                f"({self.model.encoder_weights}) both initialise the backbone: set one"
            )
        monitors = ("val_loss", *CLASSIFICATION_METRICS)
        if self.trainer.monitor not in monitors:
            raise ConfigError(
                f"trainer.monitor: a classifier run reports {list(monitors)}, got "
                f"{self.trainer.monitor!r}"
            )


def _classifier_demo() -> ClassifierTrainConfig:
    """About 4 minutes on 2 CPU cores: ResNet18 at 128², BCE, balanced batches (50 %
    positive), cosine Adam 1e-3, 16 epochs (as the segmentation demo preset), checkpoints by
    AUC. From scratch on the demo root the classifier learns nothing in its first ~80
    optimiser steps (6 epochs: ROC AUC 0.55; 16: 0.86); from a segmentation encoder
    (``encoder_init``) 6 epochs reach 0.96."""
    return ClassifierTrainConfig(
        data=DataConfig(size=128, augment="light", positive_rate=0.5, batch_size=16),
        trainer=TrainerConfig(
            epochs=16, lr=1e-3, scheduler="cosine", warmup_epochs=0.5, monitor="val_auc"
        ),
    )


def _classifier_full() -> ClassifierTrainConfig:
    """A full-size classifier: SE-ResNeXt50 at 512², BCE, balanced batches, cosine Adam 1e-4,
    20 epochs, checkpoints by F0.5 at 0.5 (the 10th place's selection)."""
    return ClassifierTrainConfig(
        model=ClassifierModelConfig(encoder_name="seresnext50_32x4d"),
        data=DataConfig(
            size=512, augment="sneddy", positive_rate=0.5, batch_size=16, num_workers=4
        ),
        trainer=TrainerConfig(
            epochs=20, lr=1e-4, scheduler="cosine", warmup_epochs=1.0, monitor="val_f05"
        ),
        out_dir="outputs/classifier_full",
    )


#: classifier presets: name → function returning a fresh :class:`ClassifierTrainConfig`
CLASSIFIER_PRESETS: dict[str, typing.Callable[[], ClassifierTrainConfig]] = {
    "demo": _classifier_demo,
    "full": _classifier_full,
}
