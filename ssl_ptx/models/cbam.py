"""CBAM: Convolutional Block Attention Module (Woo et al., 2018).

Two gates applied in sequence to a feature map ``x`` of shape ``[B, C, H, W]``:

1. **channel gate** — global average and global max pooling over H×W, each passed through
   one *shared* MLP (1×1 conv C → C/r, ReLU, 1×1 conv C/r → C, with biases); the two outputs
   are summed, squashed by a sigmoid and multiply ``x`` per channel;
2. **spatial gate** — the per-pixel mean and max over channels (2 maps) go through one conv
   2 → 1 with kernel k and padding k // 2, a sigmoid, and multiply ``x`` per pixel.

The paper uses k = 7; the 3rd place SIIM solution used k = 1 (a per-pixel gate) in its UNet
decoder, with r = 16 on 32-channel decoder outputs (MLP hidden width 2).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CBAM", "ChannelGate", "SpatialGate"]


class ChannelGate(nn.Module):
    """Channel attention: ``x * sigmoid(mlp(avgpool(x)) + mlp(maxpool(x)))``.

    Args:
        channels: C, the number of input (and output) channels.
        reduction: r; the MLP's hidden width is ``max(1, C // r)``.

    Shapes: ``[B, C, H, W] -> [B, C, H, W]``, same dtype.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be >= 1, got {channels}, {reduction}")
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=True),
        )

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The channel weights in (0, 1), shape ``[B, C, 1, 1]``."""
        pooled = torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)])
        avg_branch, max_branch = self.mlp(pooled).chunk(2)  # one MLP call for both branches
        return torch.sigmoid(avg_branch + max_branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class SpatialGate(nn.Module):
    """Spatial attention: ``x * sigmoid(conv_k([mean_c(x), max_c(x)]))``.

    Args:
        kernel_size: k, odd; 7 in the paper, 1 in the 3rd place SIIM solution.

    Shapes: ``[B, C, H, W] -> [B, C, H, W]``, same dtype.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=True)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The pixel weights in (0, 1), shape ``[B, 1, H, W]``."""
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class CBAM(nn.Module):
    """Channel gate, then spatial gate (the paper's order).

    Args:
        channels: C, the number of input (and output) channels.
        reduction: r, the channel MLP's reduction (hidden width ``max(1, C // r)``).
        kernel_size: k, the spatial gate's odd kernel size.

    Shapes: ``[B, C, H, W] -> [B, C, H, W]``, same dtype.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel_gate = ChannelGate(channels, reduction)
        self.spatial_gate = SpatialGate(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial_gate(self.channel_gate(x))
