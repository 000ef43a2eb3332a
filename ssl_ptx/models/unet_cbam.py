"""UNet-CBAM: an smp ``Unet`` whose every decoder block ends with CBAM attention.

This is the 3rd place SIIM-ACR design (bestfitting): a stock encoder, a UNet decoder whose
blocks end with CBAM, optionally a hypercolumn head over all decoder outputs. Compared with
that code this model reuses smp's pieces: the encoder is any smp encoder (``"resnet34"``,
``"se_resnext50_32x4d"`` …) or any timm one (``"tu-resnet18"`` …), the decoder blocks are smp's
``UnetDecoderBlock`` (upsample, concat skip, two 3×3 conv-BN-ReLU) with CBAM replacing smp's
post-conv attention slot, and the optional image-level "pneumothorax present" head is smp's
``ClassificationHead`` on the deepest encoder feature (smp's ``aux_params`` convention).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import ClassificationHead, SegmentationHead, SegmentationModel
from segmentation_models_pytorch.base.modules import Conv2dReLU
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn

from ssl_ptx.models.cbam import CBAM

__all__ = ["CBAMUnetDecoder", "HypercolumnHead", "UNetCBAM"]

ENCODER_DEPTH = 5  # five stride-2 stages: inputs must be divisible by 2**5 = 32


class CBAMUnetDecoder(UnetDecoder):
    """smp's UNet decoder with CBAM at the end of every block.

    Args:
        encoder_channels: the encoder's ``out_channels`` (input first, deepest last).
        decoder_channels: output channels of the blocks, coarse to fine (one per block).
        cbam_reduction: CBAM channel-MLP reduction r.
        cbam_kernel: CBAM spatial-gate kernel k (odd).
        interpolation_mode: how each block upsamples its input (``F.interpolate`` mode).
        hypercolumn: if True, ``forward`` returns every block's output resized (bilinear) to
            the finest block's size and concatenated, ``sum(decoder_channels)`` channels;
            otherwise it returns the finest block's output, ``decoder_channels[-1]`` channels.
        add_center_block: smp's two-conv centre block on the deepest feature (VGG encoders).

    Shapes: encoder features ``[B, C_i, H / 2**i, W / 2**i]`` for i = 0 … depth →
    ``[B, C_out, H, W]``.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        decoder_channels: Sequence[int],
        *,
        cbam_reduction: int = 16,
        cbam_kernel: int = 7,
        interpolation_mode: str = "bilinear",
        hypercolumn: bool = False,
        add_center_block: bool = False,
    ) -> None:
        super().__init__(
            encoder_channels=encoder_channels,
            decoder_channels=decoder_channels,
            n_blocks=len(decoder_channels),
            use_norm="batchnorm",
            attention_type=None,
            add_center_block=add_center_block,
            interpolation_mode=interpolation_mode,
        )
        for block, channels in zip(self.blocks, decoder_channels, strict=True):
            block.attention2 = CBAM(channels, cbam_reduction, cbam_kernel)
        self.hypercolumn = hypercolumn

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        # features: [input-resolution, stride 2, 4, …, deepest]; the first has no block
        sizes = [f.shape[-2:] for f in features][::-1][1:]  # block target sizes, coarse→fine
        skips = features[1:][::-1][1:]  # skip of each block, deepest first; the last has none
        x = self.center(features[-1])
        outputs = []
        for i, block in enumerate(self.blocks):
            skip = skips[i] if i < len(skips) else None
            x = block(x, sizes[i][0], sizes[i][1], skip_connection=skip)
            outputs.append(x)
        if not self.hypercolumn:
            return x
        size = x.shape[-2:]
        resized = [F.interpolate(o, size=size, mode="bilinear") for o in outputs[:-1]]
        return torch.cat([x, *resized[::-1]], dim=1)


class HypercolumnHead(nn.Sequential):
    """Hypercolumn head of the 3rd place: conv3×3-BN-ReLU → 64, conv3×3-BN-ReLU → 32, conv1×1.

    Shapes: ``[B, in_channels, H, W] -> [B, out_channels, H, W]`` logits.
    """

    def __init__(self, in_channels: int, out_channels: int = 1) -> None:
        super().__init__(
            Conv2dReLU(in_channels, 64, kernel_size=3, padding=1),
            Conv2dReLU(64, 32, kernel_size=3, padding=1),
            nn.Conv2d(32, out_channels, kernel_size=1),
        )


class UNetCBAM(SegmentationModel):
    """UNet with CBAM in every decoder block; binary segmentation logits.

    Args:
        encoder_name: an smp encoder (``"resnet34"``, ``"se_resnext50_32x4d"`` …) or a timm
            one prefixed ``"tu-"`` (``"tu-resnet18"`` …).
        encoder_weights: ``None`` (default) for random initialisation; pretrained weights are
            opt-in (``"imagenet"`` for smp encoders, ``True`` for ``tu-`` encoders) and are
            downloaded by smp/timm on first use.
        in_channels: 1 (grayscale X-ray) or 3.
        decoder_channels: output channels of the 5 decoder blocks, coarse to fine. The 3rd
            place used 32 everywhere; smp's default is ``(256, 128, 64, 32, 16)``.
        decoder_interpolation: upsampling in the decoder blocks (the 3rd place: bilinear).
        cbam_reduction: CBAM channel-MLP reduction r (16 in both paper and 3rd place).
        cbam_kernel: CBAM spatial kernel k (7 in the paper, 1 in the 3rd place).
        presence_head: add an image-level "pneumothorax present" logit computed from the
            deepest encoder feature (global average pool, dropout 0.2, linear).
        hypercolumn: predict from all decoder outputs concatenated at full resolution through
            :class:`HypercolumnHead` instead of smp's 3×3 segmentation head.

    Forward:
        ``x``: float ``[B, in_channels, H, W]`` with H and W divisible by 32 (a
        ``RuntimeError`` that suggests a padded size otherwise).
        Returns mask logits ``[B, 1, H, W]``; with ``presence_head=True`` the tuple
        ``(mask_logits [B, 1, H, W], presence_logits [B, 1])``.
    """

    requires_divisible_input_shape = True

    def __init__(
        self,
        encoder_name: str = "resnet34",
        *,
        encoder_weights: str | bool | None = None,
        in_channels: int = 3,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        decoder_interpolation: str = "bilinear",
        cbam_reduction: int = 16,
        cbam_kernel: int = 7,
        presence_head: bool = False,
        hypercolumn: bool = False,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        decoder_channels = tuple(int(c) for c in decoder_channels)
        if len(decoder_channels) != ENCODER_DEPTH:
            raise ValueError(
                f"decoder_channels needs {ENCODER_DEPTH} entries (one per decoder block), "
                f"got {len(decoder_channels)}: {decoder_channels}"
            )
        self.encoder = get_encoder(
            encoder_name, in_channels=in_channels, depth=ENCODER_DEPTH, weights=encoder_weights
        )
        self.decoder = CBAMUnetDecoder(
            self.encoder.out_channels,
            decoder_channels,
            cbam_reduction=cbam_reduction,
            cbam_kernel=cbam_kernel,
            interpolation_mode=decoder_interpolation,
            hypercolumn=hypercolumn,
            add_center_block=encoder_name.startswith("vgg"),
        )
        if hypercolumn:
            self.segmentation_head = HypercolumnHead(sum(decoder_channels))
        else:
            self.segmentation_head = SegmentationHead(decoder_channels[-1], 1, kernel_size=3)
        self.classification_head = (
            ClassificationHead(self.encoder.out_channels[-1], classes=1, dropout=0.2)
            if presence_head
            else None
        )
        self.name = f"u-cbam-{encoder_name}"
        self.initialize()
