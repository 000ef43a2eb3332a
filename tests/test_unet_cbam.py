"""UNet-CBAM and the model registry: small encoders at 64² so that the file stays fast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_ptx.models import CBAM, UNetCBAM, create_model, list_models, resolve_model_config
from ssl_ptx.models.unet_cbam import HypercolumnHead

SMALL = {"decoder_channels": (32, 16, 16, 8, 8)}


def _images(channels: int, batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("encoder_name", ["resnet18", "tu-resnet18"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_backward(encoder_name, in_channels):
    torch.manual_seed(0)
    model = UNetCBAM(encoder_name, in_channels=in_channels, **SMALL)
    x = _images(in_channels)
    logits = model(x)
    assert logits.shape == (2, 1, 64, 64) and logits.dtype == torch.float32
    logits.mean().backward()
    first_conv = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == in_channels
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    for cbam in (m for m in model.modules() if isinstance(m, CBAM)):
        assert cbam.spatial_gate.conv.weight.grad.abs().sum() > 0


def test_every_decoder_block_ends_with_cbam():
    model = UNetCBAM("resnet18", cbam_reduction=4, cbam_kernel=1, **SMALL)
    blocks = list(model.decoder.blocks)
    cbams = [m for m in model.modules() if isinstance(m, CBAM)]
    assert len(blocks) == 5 and len(cbams) == 5
    assert [block.attention2 for block in blocks] == cbams
    for block, cbam, channels in zip(blocks, cbams, SMALL["decoder_channels"], strict=True):
        assert block.conv2[0].out_channels == channels
        assert cbam.channel_gate.mlp[0].in_channels == channels
        assert cbam.channel_gate.mlp[0].out_channels == max(1, channels // 4)
        assert cbam.spatial_gate.conv.kernel_size == (1, 1)
    assert not any(isinstance(m, CBAM) for m in model.encoder.modules())


def test_cbam_changes_the_prediction():
    torch.manual_seed(0)
    model = UNetCBAM("resnet18", **SMALL).eval()
    x = _images(3)
    with torch.no_grad():
        with_cbam = model(x)
        for block in model.decoder.blocks:
            block.attention2 = torch.nn.Identity()
        without = model(x)
    assert not torch.allclose(with_cbam, without, atol=1e-4)


def test_presence_head_returns_smp_style_tuple():
    torch.manual_seed(0)
    model = UNetCBAM("resnet18", in_channels=1, presence_head=True, **SMALL).eval()
    x = _images(1, batch=3)
    mask_logits, presence_logits = model(x)
    assert mask_logits.shape == (3, 1, 64, 64)
    assert presence_logits.shape == (3, 1)
    assert presence_logits[0] != presence_logits[1]  # depends on the image


def test_hypercolumn_head_sees_every_decoder_block():
    torch.manual_seed(0)
    model = UNetCBAM("resnet18", hypercolumn=True, **SMALL)
    assert isinstance(model.segmentation_head, HypercolumnHead)
    assert model.segmentation_head[0][0].in_channels == sum(SMALL["decoder_channels"])
    block_outputs = []
    for block in model.decoder.blocks:
        block.register_forward_hook(lambda module, args, output: block_outputs.append(output))
    hypercolumn = model.decoder(model.encoder(_images(3)))
    assert hypercolumn.shape == (2, sum(SMALL["decoder_channels"]), 64, 64)
    # finest block first, then the coarser ones resized to 64², coarsest last
    expected = [block_outputs[-1]] + [
        F.interpolate(output, size=(64, 64), mode="bilinear") for output in block_outputs[-2::-1]
    ]
    torch.testing.assert_close(hypercolumn, torch.cat(expected, 1))
    assert model(_images(3)).shape == (2, 1, 64, 64)


def test_sizes_not_divisible_by_32_are_refused():
    model = UNetCBAM("resnet18", **SMALL)
    with pytest.raises(RuntimeError, match="divisible by 32"):
        model(torch.zeros(1, 3, 64, 80 + 8))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="in_channels must be 1 or 3"):
        UNetCBAM("resnet18", in_channels=2)
    with pytest.raises(ValueError, match="decoder_channels needs 5 entries"):
        UNetCBAM("resnet18", decoder_channels=(16, 8))


# ------------------------------------------------------------------------------ registry


def test_create_model_from_config_with_overrides():
    config = {"arch": "unet_cbam", "encoder_name": "resnet18", "in_channels": 3, **SMALL}
    model = create_model(config, in_channels=1, presence_head=True)
    assert isinstance(model, UNetCBAM) and "unet_cbam" in list_models()
    assert model.model_config["in_channels"] == 1 and model.model_config["presence_head"]
    assert model.model_config["encoder_weights"] is None  # random init unless asked
    mask_logits, _ = model.eval()(_images(1))
    assert mask_logits.shape == (2, 1, 64, 64)
    # the stored config rebuilds the same architecture, which takes the weights back
    twin = create_model(model.model_config)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(_images(1))[0], mask_logits)


def test_create_model_from_name_uses_defaults():
    resolved = resolve_model_config("unet_cbam", encoder_name="resnet18")
    assert resolved == {
        "arch": "unet_cbam",
        "encoder_name": "resnet18",
        "encoder_weights": None,
        "in_channels": 3,
        "decoder_channels": (256, 128, 64, 32, 16),
        "decoder_interpolation": "bilinear",
        "cbam_reduction": 16,
        "cbam_kernel": 7,
        "presence_head": False,
        "hypercolumn": False,
    }
    assert resolve_model_config({"encoder_name": "resnet18"}) == resolved  # arch defaults


def test_create_model_refuses_unknown_keys_and_archs():
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['encoder'\].*allowed"):
        create_model({"arch": "unet_cbam", "encoder": "resnet18"})
    with pytest.raises(ValueError, match=r"'cbam_kernel'"):
        create_model("unet_cbam", kernel=3)
    with pytest.raises(ValueError, match="unknown model arch 'unet3'.*unet_cbam"):
        create_model("unet3")
