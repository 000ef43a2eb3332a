"""Segmentation models: CBAM attention, the UNet-CBAM of the 3rd place, smp's FPN,
DeepLabV3+, UNet++ and UNet with the same output contract, frozen BatchNorm, and a name
registry.

from ssl_ptx.models import create_model
model = create_model("unet_cbam", encoder_name="resnet34", in_channels=1)
"""

from __future__ import annotations

from ssl_ptx.models.cbam import CBAM, ChannelGate, SpatialGate
from ssl_ptx.models.factory import (
    create_model,
    list_models,
    register_model,
    resolve_model_config,
)
from ssl_ptx.models.freeze_bn import freeze_batchnorm
from ssl_ptx.models.unet_cbam import UNetCBAM

__all__ = [
    "CBAM",
    "ChannelGate",
    "SpatialGate",
    "UNetCBAM",
    "create_model",
    "freeze_batchnorm",
    "list_models",
    "register_model",
    "resolve_model_config",
]
