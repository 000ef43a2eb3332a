"""Other segmentation architectures from segmentation_models_pytorch, with the UNet-CBAM
contract: FPN, DeepLabV3+ (the 8th place's family), UNet++ and a plain UNet (the 4th place's).

Each builder returns smp's own model with one output channel (mask logits) and, with
``presence_head=True``, smp's classification head on the deepest encoder feature (global
average pool, dropout 0.2, linear → 1 logit), exactly as :class:`~ssl_ptx.models.UNetCBAM`.
Encoders: any smp encoder (``"resnet34"``, ``"se_resnext50_32x4d"`` …) or timm one
(``"tu-resnet18"`` …); ``encoder_weights=None`` (random initialisation) unless asked.

Forward (every builder):
    ``x``: float ``[B, in_channels, H, W]``, H and W divisible by 32 (DeepLabV3+: by its
    ``encoder_output_stride``); smp raises a ``RuntimeError`` naming a padded size otherwise.
    Returns mask logits ``[B, 1, H, W]``, or with ``presence_head=True`` the tuple
    ``(mask_logits [B, 1, H, W], presence_logits [B, 1])``.

Registered in :mod:`ssl_ptx.models.factory` as ``"fpn"``, ``"deeplabv3plus"``,
``"unetplusplus"`` and ``"unet"``: ``create_model({"arch": "fpn", "encoder_name": "resnet18"})``.
"""

from __future__ import annotations

from collections.abc import Sequence

import segmentation_models_pytorch as smp

__all__ = ["deeplabv3plus", "fpn", "unet", "unetplusplus"]


def _presence(presence_head: bool) -> dict | None:
    """smp's ``aux_params`` of the image-level "pneumothorax present" head (or None)."""
    return {"classes": 1, "dropout": 0.2} if presence_head else None


def fpn(
    encoder_name: str = "resnet34",
    *,
    encoder_weights: str | bool | None = None,
    in_channels: int = 3,
    presence_head: bool = False,
    decoder_pyramid_channels: int = 256,
    decoder_segmentation_channels: int = 128,
    decoder_merge_policy: str = "add",
    decoder_dropout: float = 0.2,
    decoder_interpolation: str = "nearest",
) -> smp.FPN:
    """Feature Pyramid Network (smp ``FPN``): pyramid of ``decoder_pyramid_channels``, each
    level to ``decoder_segmentation_channels`` at stride 4, merged by ``decoder_merge_policy``
    ("add" or "cat"), upsampled ×4 to the input size."""
    return smp.FPN(
        encoder_name=encoder_name,
        encoder_weights=encoder_weights,
        in_channels=in_channels,
        classes=1,
        decoder_pyramid_channels=decoder_pyramid_channels,
        decoder_segmentation_channels=decoder_segmentation_channels,
        decoder_merge_policy=decoder_merge_policy,
        decoder_dropout=decoder_dropout,
        decoder_interpolation=decoder_interpolation,
        aux_params=_presence(presence_head),
    )


def deeplabv3plus(
    encoder_name: str = "resnet34",
    *,
    encoder_weights: str | bool | None = None,
    in_channels: int = 3,
    presence_head: bool = False,
    encoder_output_stride: int = 16,
    decoder_aspp_channels: int = 256,
    decoder_atrous_rates: Sequence[int] = (12, 24, 36),
    decoder_aspp_separable: bool = True,
    decoder_aspp_dropout: float = 0.5,
) -> smp.DeepLabV3Plus:
    """DeepLabV3+ (smp ``DeepLabV3Plus``): a dilated encoder at ``encoder_output_stride``
    (8 or 16), ASPP with ``decoder_atrous_rates`` and ``decoder_aspp_channels`` channels (smp's
    ``decoder_channels``), fused with the stride-4 feature, upsampled ×4. The 8th place used
    it with GroupNorm + weight standardisation backbones (not in smp) and output stride 16."""
    return smp.DeepLabV3Plus(
        encoder_name=encoder_name,
        encoder_weights=encoder_weights,
        in_channels=in_channels,
        classes=1,
        encoder_output_stride=encoder_output_stride,
        decoder_channels=decoder_aspp_channels,
        decoder_atrous_rates=tuple(decoder_atrous_rates),
        decoder_aspp_separable=decoder_aspp_separable,
        decoder_aspp_dropout=decoder_aspp_dropout,
        aux_params=_presence(presence_head),
    )


def _unet_family(
    model_class: type[smp.Unet] | type[smp.UnetPlusPlus],
    encoder_name: str,
    encoder_weights: str | bool | None,
    in_channels: int,
    presence_head: bool,
    decoder_channels: Sequence[int],
    decoder_interpolation: str,
    decoder_attention_type: str | None,
) -> smp.Unet | smp.UnetPlusPlus:
    return model_class(
        encoder_name=encoder_name,
        encoder_weights=encoder_weights,
        in_channels=in_channels,
        classes=1,
        decoder_channels=tuple(int(c) for c in decoder_channels),
        decoder_interpolation=decoder_interpolation,
        decoder_attention_type=decoder_attention_type,
        aux_params=_presence(presence_head),
    )


def unetplusplus(
    encoder_name: str = "resnet34",
    *,
    encoder_weights: str | bool | None = None,
    in_channels: int = 3,
    presence_head: bool = False,
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    decoder_interpolation: str = "nearest",
    decoder_attention_type: str | None = None,
) -> smp.UnetPlusPlus:
    """UNet++ (smp ``UnetPlusPlus``): nested dense skip paths; ``decoder_channels`` as for
    UNet-CBAM (5 blocks, coarse to fine); ``decoder_attention_type="scse"`` adds smp's scSE
    (the 1st place's SE-ResNeXt UNet had scSE in its decoder)."""
    return _unet_family(
        smp.UnetPlusPlus,
        encoder_name,
        encoder_weights,
        in_channels,
        presence_head,
        decoder_channels,
        decoder_interpolation,
        decoder_attention_type,
    )


def unet(
    encoder_name: str = "resnet34",
    *,
    encoder_weights: str | bool | None = None,
    in_channels: int = 3,
    presence_head: bool = False,
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    decoder_interpolation: str = "nearest",
    decoder_attention_type: str | None = None,
) -> smp.Unet:
    """Plain UNet (smp ``Unet``), without CBAM: the 4th place's network (with
    ``model.freeze_bn=all`` and a presence head). Arguments as :func:`unetplusplus`."""
    return _unet_family(
        smp.Unet,
        encoder_name,
        encoder_weights,
        in_channels,
        presence_head,
        decoder_channels,
        decoder_interpolation,
        decoder_attention_type,
    )
