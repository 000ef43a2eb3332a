"""The image classifier: losses, metrics, training by the Trainer, loading for the gate."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ssl_ptx.classifier import (
    CLASSIFIER_PRESETS,
    ClassificationLoss,
    ClassificationMetrics,
    ImageClassifier,
    binary_auc,
    f_beta,
    load_segmentation_encoder,
)
from ssl_ptx.config import ConfigError, TrainerConfig, apply_overrides, config_to_dict
from ssl_ptx.engine import Trainer, save_checkpoint
from ssl_ptx.inference import Predictor, load_model
from ssl_ptx.models import create_model


def _masks(labels: list[int], side: int = 4) -> torch.Tensor:
    masks = torch.zeros(len(labels), 1, side, side)
    for k, label in enumerate(labels):
        if label:
            masks[k, 0, k % side, 1] = 1.0
    return masks


def test_bce_and_focal_against_a_direct_computation() -> None:
    logits = torch.tensor([[1.5], [-0.3], [0.2], [-2.0]], requires_grad=True)
    labels = [1, 0, 0, 1]
    y = torch.tensor(labels, dtype=torch.float64)
    z = logits.detach().double().reshape(-1)
    p = torch.sigmoid(z)
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
    loss = ClassificationLoss("bce")(logits, _masks(labels))
    assert loss.item() == pytest.approx(bce.mean().item(), rel=1e-6)
    p_true = torch.where(y > 0, p, 1 - p)
    alpha_t = torch.where(y > 0, 0.25, 0.75)
    focal = (alpha_t * (1 - p_true) ** 2 * bce).mean()
    value = ClassificationLoss("focal", gamma=2.0, alpha=0.25)(logits, _masks(labels))
    assert value.item() == pytest.approx(focal.item(), rel=1e-6)
    # labels given directly instead of masks; all-empty batch
    assert ClassificationLoss("bce")(logits, y.float()).item() == pytest.approx(bce.mean().item())
    empty = ClassificationLoss("bce")(logits, _masks([0, 0, 0, 0]))
    assert empty.item() == pytest.approx(torch.log1p(torch.exp(z)).mean().item(), rel=1e-6)
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="bce"):
        ClassificationLoss("hinge")


def test_auc_and_f_beta_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40) / 4.0  # many ties
    labels = rng.random(40) < 0.4
    pairs = [
        1.0 if s_p > s_n else 0.5 if s_p == s_n else 0.0
        for s_p, s_n in itertools.product(scores[labels], scores[~labels])
    ]
    assert binary_auc(scores, labels) == pytest.approx(np.mean(pairs))
    assert math.isnan(binary_auc(scores, np.zeros(40, bool)))
    called = scores >= 0.5
    tp, fp = (called & labels).sum(), (called & ~labels).sum()
    precision, recall = tp / (tp + fp), tp / labels.sum()
    expected = 1.25 * precision * recall / (0.25 * precision + recall)
    assert f_beta(called, labels, 0.5) == pytest.approx(expected)
    assert f_beta(np.zeros(40, bool), labels) == 0.0


def test_classification_metrics_on_hand_made_probabilities() -> None:
    metrics = ClassificationMetrics(threshold=0.5)
    logits = torch.logit(torch.tensor([0.9, 0.6, 0.4, 0.7, 0.1, 0.2]))[:, None]
    labels = [1, 1, 1, 0, 0, 0]
    columns = metrics.per_image(logits, {"mask": _masks(labels)})
    np.testing.assert_array_equal(columns["label"], np.array(labels, bool))
    result = metrics.summarise(columns)
    assert result["val_auc"] == pytest.approx(7 / 9)  # the negative 0.7 beats 0.6 and 0.4
    assert result["val_precision"] == pytest.approx(2 / 3)
    assert result["val_recall"] == pytest.approx(2 / 3)
    assert result["val_accuracy"] == pytest.approx(4 / 6)
    assert result["val_fp_rate"] == pytest.approx(1 / 3)
    assert result["val_f05"] == pytest.approx(2 / 3)


class Squares(Dataset):
    """16×16 images; odd ones have a bright square (and its mask), even ones are blank."""

    def __init__(self, n: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 1, 16, 16, generator=generator) * 0.2
        self.masks = torch.zeros(n, 1, 16, 16)
        for k in range(1, n, 2):
            self.images[k, 0, 4:9, 5:10] = 0.9
            self.masks[k, 0, 4:9, 5:10] = 1.0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "mask": self.masks[index]}


def test_trainer_trains_the_classifier_and_the_predictor_loads_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = TrainerConfig(
        epochs=3,
        device="cpu",
        lr=3e-3,
        progress=False,
        tensorboard=False,
        top_k=1,
        monitor="val_auc",
    )
    run = apply_overrides(CLASSIFIER_PRESETS["demo"](), ["data.size=16"])
    data = Squares()
    trainer = Trainer(
        create_model(config_to_dict(run.model)),
        run.loss.build(),
        config,
        out_dir=tmp_path,
        run_config=run,
        metrics=ClassificationMetrics(0.5),
    )
    result = trainer.fit(DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, 16))
    assert set(result.metrics) >= {"val_auc", "val_f05", "val_fp_rate", "val_loss"}
    assert "val_dice" not in result.metrics
    assert result.metrics["val_auc"] > 0.8  # the squares are easy
    model, info = load_model(result.best_checkpoint)
    assert isinstance(model, ImageClassifier)
    seg = torch.nn.Conv2d(1, 1, 1)
    gated = Predictor(
        seg,
        tta=(),
        device="cpu",
        classifiers=[model],
        classifier_size=info["config"]["data"]["size"],
        gate="classifier",
        gate_threshold=0.5,
    ).predict_batch(data.images[:8])
    with torch.no_grad():
        expected = torch.sigmoid(model.eval()(data.images[:8])).reshape(-1)
    torch.testing.assert_close(gated.presence, expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        ungated = torch.sigmoid(seg(data.images[:8]))[:, 0]
    for k, probability in enumerate(gated.presence):
        expected_map = ungated[k] if probability >= 0.5 else torch.zeros_like(ungated[k])
        torch.testing.assert_close(gated.masks[k], expected_map)


def test_classifier_config_selects_by_f05_and_refuses_segmentation_metrics() -> None:
    config = apply_overrides(CLASSIFIER_PRESETS["demo"](), ["trainer.monitor=val_f05"])
    assert config.trainer.monitor == "val_f05" and config.model.arch == "classifier"
    with pytest.raises(ConfigError, match="val_auc"):
        apply_overrides(config, ["trainer.monitor=val_dice"])
    with pytest.raises(ValueError, match="imagenet"):
        ImageClassifier(encoder_weights="ssl")


def _segmentation_checkpoint(path: Path, encoder_name: str, in_channels: int = 1) -> Path:
    torch.manual_seed(1)
    model = create_model(
        {
            "encoder_name": encoder_name,
            "in_channels": in_channels,
            "decoder_channels": [16, 8, 8, 8, 8],
            "presence_head": True,
        }
    )
    for name, buffer in model.named_buffers():  # BatchNorm statistics away from 0 / 1
        if name.endswith(("running_mean", "running_var")):
            buffer.uniform_(0.5, 1.5)
    return save_checkpoint(
        {"model": model.state_dict(), "config": {"model": model.model_config}}, path
    )


@pytest.mark.parametrize("encoder_name", ["resnet18", "tu-resnet18"])
def test_segmentation_encoder_initialises_the_backbone_exactly(
    tmp_path: Path, encoder_name: str
) -> None:
    path = _segmentation_checkpoint(tmp_path / "seg.pt", encoder_name)
    seg = torch.load(path, weights_only=True)["model"]
    prefix = "encoder.model." if encoder_name.startswith("tu-") else "encoder."
    classifier = ImageClassifier("resnet18")
    head_before = {k: v.clone() for k, v in classifier.backbone.fc.state_dict().items()}
    copied = load_segmentation_encoder(classifier, path)
    state = classifier.backbone.state_dict()
    assert copied == len(state) - 2  # all but fc.weight and fc.bias
    for key, value in state.items():
        if key.startswith("fc."):
            torch.testing.assert_close(value, head_before[key[3:]], rtol=0, atol=0)
        else:
            assert torch.equal(value, seg[prefix + key]), key
    # the same features: the encoder's deepest map, pooled, is what fc sees
    images = torch.rand(2, 1, 64, 64)
    segmenter = create_model(
        {"encoder_name": encoder_name, "in_channels": 1, "decoder_channels": [16, 8, 8, 8, 8]},
        presence_head=True,
    ).eval()
    segmenter.load_state_dict(seg)
    with torch.no_grad():
        deepest = segmenter.encoder(images)[-1].mean(dim=(2, 3))
        pooled = classifier.eval().backbone.forward_head(
            classifier.backbone.forward_features(images), pre_logits=True
        )
    torch.testing.assert_close(pooled, deepest, rtol=1e-5, atol=1e-6)


def test_segmentation_encoder_refuses_checkpoints_without_a_matching_encoder(
    tmp_path: Path,
) -> None:
    rgb = _segmentation_checkpoint(tmp_path / "seg_rgb.pt", "resnet18", in_channels=3)
    with pytest.raises(ValueError, match=r"seg_rgb\.pt.*in_channels 3.*conv1\.weight \[64, 3"):
        load_segmentation_encoder(ImageClassifier("resnet18", in_channels=1), rgb)
    grey = _segmentation_checkpoint(tmp_path / "seg.pt", "resnet18")
    with pytest.raises(ValueError, match=r"seg\.pt.*'resnet18'.*missing \['conv1\.0\.weight'"):
        load_segmentation_encoder(ImageClassifier("resnet10t"), grey)
    own = save_checkpoint(
        {"model": ImageClassifier("resnet18").state_dict()}, tmp_path / "classifier.pt"
    )
    with pytest.raises(ValueError, match=r"classifier\.pt: holds no encoder weights"):
        load_segmentation_encoder(ImageClassifier("resnet18"), own)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_segmentation_encoder(ImageClassifier("resnet18"), tmp_path / "absent.pt")


def test_encoder_init_is_a_config_key_and_a_recipe_flag() -> None:
    spec = importlib.util.spec_from_file_location(
        "train_classifier", Path(__file__).parents[1] / "recipes" / "train_classifier.py"
    )
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config, _ = recipe.build_config(recipe.parse_args(["--encoder-init", "runs/seg/best.pt"]))
    assert config.encoder_init == "runs/seg/best.pt"
    assert CLASSIFIER_PRESETS["demo"]().encoder_init is None
    with pytest.raises(ConfigError, match="both initialise"):
        apply_overrides(config, ["model.encoder_weights=imagenet"])
