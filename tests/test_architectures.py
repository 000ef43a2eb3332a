"""smp architectures in the Trainer and the Predictor (FPN, DeepLabV3+, UNet++), frozen
BatchNorm, and the factory's ``options`` / ``freeze_bn`` / UNet-CBAM-key handling.

Models are ResNet18-based with small decoders, trained on one fixed batch of 64² images.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import segmentation_models_pytorch as smp
import torch
from test_trainer import ToySegmentation
from torch import nn

from ssl_ptx.config import (
    DataConfig,
    ModelConfig,
    TrainConfig,
    TrainerConfig,
    apply_overrides,
    config_to_dict,
    preset,
)
from ssl_ptx.engine import Trainer
from ssl_ptx.engine.checkpoint import load_checkpoint
from ssl_ptx.engine.loaders import build_train_loader, build_val_loader
from ssl_ptx.engine.logging import read_metrics_csv
from ssl_ptx.engine.rng import seed_everything
from ssl_ptx.inference import Predictor, load_model
from ssl_ptx.losses import build_loss
from ssl_ptx.models import create_model, freeze_batchnorm, list_models, resolve_model_config
from ssl_ptx.models.freeze_bn import is_frozen

SIZE = 64

#: small settings per arch (arch-specific ones through ``model.options``)
ARCHS: dict[str, dict[str, Any]] = {
    "fpn": {
        "presence_head": True,
        "options": {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32},
    },
    "deeplabv3plus": {"options": {"decoder_aspp_channels": 32, "decoder_atrous_rates": [2, 4, 6]}},
    "unetplusplus": {"decoder_channels": [32, 16, 16, 8, 8]},
}


class FixedBatch(ToySegmentation):  # its __len__ / __getitem__
    """Eight 64² images: a bright disc with its mask on the first four, empty on the rest."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(8, 1, SIZE, SIZE, generator=generator) * 0.5
        yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
        disc = ((yy - 24) ** 2 + (xx - 36) ** 2 < 12**2).float()
        self.masks = torch.zeros(8, 1, SIZE, SIZE)
        self.masks[:4, 0] = disc
        self.images[:4, 0] += 0.5 * disc
        self.labels = (self.masks.flatten(1).amax(1) > 0).double().numpy()
        self.transform = None


def _fit(model_config: ModelConfig, loss: str, out: Path, epochs: int, **trainer: Any):
    """Train ``model_config``'s model on the fixed batch (full batch, no shuffling effect)."""
    seed_everything(0)
    run = TrainConfig(
        model=model_config,
        data=DataConfig(size=SIZE, batch_size=8, num_workers=0),
        trainer=TrainerConfig(
            epochs=epochs,
            device="cpu",
            lr=1e-3,
            progress=False,
            tensorboard=False,
            top_k=1,
            monitor="val_loss",
            **trainer,
        ),
    )
    dataset = FixedBatch()
    model = create_model(config_to_dict(run.model))
    trainer_ = Trainer(model, build_loss(loss), run.trainer, out_dir=out, run_config=run)
    result = trainer_.fit(
        build_train_loader(dataset, run.data, epochs=epochs, seed=0),
        build_val_loader(dataset, run.data),
    )
    return trainer_, result, dataset


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_arch_trains_and_round_trips_into_the_predictor(arch: str, tmp_path: Path) -> None:
    settings = ARCHS[arch]
    model_config = ModelConfig(arch=arch, encoder_name="resnet18", **settings)
    loss = "bce_dice_cls" if settings.get("presence_head") else "bce_dice"
    trainer, result, dataset = _fit(model_config, loss, tmp_path, epochs=4)

    assert isinstance(trainer.model, smp.base.SegmentationModel)
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    assert rows[-1]["train_loss"] < 0.9 * rows[0]["train_loss"]  # learns the fixed batch

    # the best checkpoint rebuilds the same arch, with the same predictions
    loaded, info = load_model(result.best_checkpoint)
    assert loaded.model_config["arch"] == arch and type(loaded) is type(trainer.model)
    reference = copy.deepcopy(trainer.model).eval()
    reference.load_state_dict(load_checkpoint(result.best_checkpoint)["model"])
    predictor = Predictor.from_checkpoints([result.best_checkpoint], tta=(), device="cpu")
    assert predictor.size == SIZE
    prediction = predictor.predict_batch(dataset.images)
    with torch.no_grad():
        outputs = reference(dataset.images)
    mask_logits = outputs[0] if isinstance(outputs, tuple) else outputs
    torch.testing.assert_close(prediction.masks, torch.sigmoid(mask_logits)[:, 0])
    if settings.get("presence_head"):
        assert prediction.presence is not None and prediction.presence.shape == (8,)


def _batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        key: value.clone()
        for key, value in model.state_dict().items()
        if any(key.endswith(s) for s in ("running_mean", "running_var", "num_batches_tracked"))
    }


def _bn_affine(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().clone()
        for module_name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
        for name, p in module.named_parameters(prefix=module_name)
    }


@pytest.mark.parametrize("mode", ["all", "stats", "none"])
def test_frozen_batchnorm_keeps_running_statistics(mode: str, tmp_path: Path) -> None:
    model_config = ModelConfig(
        arch="unet", encoder_name="resnet18", decoder_channels=[32, 16, 16, 8, 8], freeze_bn=mode
    )
    trainer, _, _ = _fit(model_config, "bce", tmp_path, epochs=2)
    seed_everything(0)  # as _fit does before building the model: its initial state
    initial = create_model(config_to_dict(model_config))
    stats, affine = _batchnorm_state(initial), _bn_affine(initial)
    convs = [k for k in initial.state_dict() if k.endswith("conv1.weight")]
    assert stats and affine and convs
    trained = trainer.model
    assert trainer.global_step == 2 and trained.training  # back in training mode after fit

    after_stats, after_affine = _batchnorm_state(trained), _bn_affine(trained)
    stats_fixed = all(torch.equal(stats[k], after_stats[k]) for k in stats)
    affine_fixed = all(torch.equal(affine[k], after_affine[k]) for k in affine)
    assert stats_fixed == (mode != "none")
    assert affine_fixed == (mode == "all")
    assert all(
        not torch.equal(initial.state_dict()[k], trained.state_dict()[k]) for k in convs
    )  # the other weights do train


def test_freeze_survives_train_mode_and_deepcopy() -> None:
    model = freeze_batchnorm(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    batchnorm = model[1]
    assert is_frozen(batchnorm) and not batchnorm.weight.requires_grad
    freeze_batchnorm(model)  # twice: still one hook
    assert len(batchnorm._forward_pre_hooks) == 1
    twin = copy.deepcopy(model).train()
    for net in (model.train(), twin):
        before = net[1].running_mean.clone()
        net(torch.rand(2, 1, 8, 8) * 5)
        assert torch.equal(net[1].running_mean, before) and not net[1].training
    unfrozen = nn.BatchNorm2d(4).train()
    unfrozen(torch.rand(2, 4, 8, 8) * 5)
    assert unfrozen.running_mean.abs().sum() > 0  # the control: a plain layer does update


def test_registry_and_options() -> None:
    assert {"fpn", "deeplabv3plus", "unetplusplus", "unet", "unet_cbam"} <= set(list_models())
    resolved = resolve_model_config(
        {"arch": "fpn", "encoder_name": "resnet18", "options": {"decoder_merge_policy": "cat"}}
    )
    assert resolved["decoder_merge_policy"] == "cat" and "options" not in resolved
    assert "freeze_bn" not in resolved  # kept only when given
    with pytest.raises(ValueError, match=r"\['decoder_dropout'\] given both directly and in"):
        resolve_model_config(
            {"arch": "fpn", "decoder_dropout": 0.1, "options": {"decoder_dropout": 0.3}}
        )
    with pytest.raises(ValueError, match="freeze_bn must be one of"):
        resolve_model_config({"arch": "fpn", "freeze_bn": "yes"})
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['pyramid'\]"):
        resolve_model_config({"arch": "fpn", "options": {"pyramid": 3}})
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['decoder_dropout'\]"):
        resolve_model_config({"arch": "unet_cbam", "decoder_dropout": 0.1})


def test_a_unet_cbam_config_builds_another_arch(caplog: pytest.LogCaptureFixture) -> None:
    # the demo preset's ModelConfig carries UNet-CBAM keys; --set model.arch=... still works
    config = apply_overrides(
        preset("demo"),
        ["model.arch=deeplabv3plus", "model.options={encoder_output_stride: 8}"],
    )
    with caplog.at_level(logging.WARNING, logger="ssl_ptx.models.factory"):
        model = create_model(config_to_dict(config.model))
    assert isinstance(model, smp.DeepLabV3Plus)
    assert model.model_config["encoder_output_stride"] == 8
    assert "cbam_kernel" not in model.model_config
    # only the key set away from UNet-CBAM's default is reported
    assert "decoder_channels=[128, 64, 32, 16, 16]" in caplog.text
    assert "cbam_kernel" not in caplog.text
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 1, 64, 64)).shape == (1, 1, 64, 64)
    twin = create_model(model.model_config)  # the stored config rebuilds it, silently
    twin.load_state_dict(model.state_dict())
