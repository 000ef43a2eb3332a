"""CBAM: shapes, the gate formulas, and that reduction r and kernel k are honoured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_ptx.models import CBAM, ChannelGate, SpatialGate


def _features(shape=(2, 32, 9, 11), seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels, reduction, hidden", [(32, 16, 2), (64, 16, 4), (8, 16, 1)])
def test_shapes_and_hidden_width(channels, reduction, hidden):
    x = _features((2, channels, 9, 11))
    cbam = CBAM(channels, reduction=reduction, kernel_size=7)
    assert cbam(x).shape == x.shape
    assert cbam.channel_gate.mlp[0].out_channels == hidden
    assert cbam.channel_gate.mlp[2].in_channels == hidden


def test_channel_gate_is_sigmoid_of_shared_mlp_on_avg_plus_max():
    torch.manual_seed(0)
    gate = ChannelGate(32, reduction=16)
    x = _features()
    mlp = gate.mlp
    expected = torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    torch.testing.assert_close(gate.gate(x), expected)
    torch.testing.assert_close(gate(x), x * expected)


def test_spatial_gate_is_sigmoid_of_conv_on_mean_and_max():
    torch.manual_seed(0)
    gate = SpatialGate(kernel_size=7)
    x = _features()
    pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
    expected = torch.sigmoid(gate.conv(pooled))
    torch.testing.assert_close(gate.gate(x), expected)
    torch.testing.assert_close(gate(x), x * expected)


def test_gates_change_the_output_and_neutral_gates_halve_it():
    torch.manual_seed(0)
    cbam = CBAM(32, reduction=16, kernel_size=7)
    x = _features()
    y = cbam(x)
    assert not torch.allclose(y, x) and not torch.allclose(y, 0.5 * x, atol=1e-3)
    ratios = y / x  # per-element weight: channel weight × pixel weight, both in (0, 1)
    assert (ratios > 0).all() and (ratios < 1).all()
    assert ratios.std() > 0.01  # the weights vary across channels and pixels
    for module in (cbam.channel_gate.mlp[2], cbam.spatial_gate.conv):
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)
    torch.testing.assert_close(cbam(x), 0.25 * x)  # sigmoid(0) · sigmoid(0)


def test_channel_gate_comes_first():
    torch.manual_seed(0)
    cbam = CBAM(32, reduction=16, kernel_size=3)
    x = _features()
    torch.testing.assert_close(cbam(x), cbam.spatial_gate(cbam.channel_gate(x)))
    assert not torch.allclose(cbam(x), cbam.channel_gate(cbam.spatial_gate(x)))


@pytest.mark.parametrize("kernel_size", [1, 3, 7])
def test_spatial_kernel_sets_the_receptive_field(kernel_size):
    """Perturbing one pixel changes the spatial gate within k // 2 of it and nowhere else."""
    torch.manual_seed(0)
    gate = SpatialGate(kernel_size)
    assert gate.conv.kernel_size == (kernel_size, kernel_size)
    x = _features((1, 8, 15, 15))
    bumped = x.clone()
    bumped[0, :, 7, 7] += 5.0
    changed = (gate.gate(bumped) - gate.gate(x)).abs()[0, 0] > 0
    radius = kernel_size // 2
    expected = torch.zeros(15, 15, dtype=torch.bool)
    expected[7 - radius : 8 + radius, 7 - radius : 8 + radius] = True
    assert torch.equal(changed, expected)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="odd"):
        SpatialGate(4)
    with pytest.raises(ValueError, match="reduction"):
        ChannelGate(16, reduction=0)


def test_gradients_reach_every_parameter():
    cbam = CBAM(16, reduction=4, kernel_size=7)
    x = _features((2, 16, 8, 8)).requires_grad_()
    cbam(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, parameter in cbam.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
