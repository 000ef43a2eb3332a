"""Heavier TTA: flips, rotations, zooms and CLAHE, each inverted, averaged over valid pixels."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssl_ptx.inference import Predictor
from ssl_ptx.tta import Affine, Clahe, HorizontalFlip, parse_tta, rotation_names


class Pointwise(nn.Module):
    """Logits 8·(x − 0.5) pixel by pixel: commutes with any rotation or zoom of the image."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images[:, :1] - 0.5) * 8.0


class ConstantMap(nn.Module):
    """Probability 0.7 everywhere, whatever the image."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.full_like(images[:, :1], math.log(0.7 / 0.3))


def smooth_images(n: int = 2, side: int = 64) -> torch.Tensor:
    """Wide Gaussian blobs: interpolation changes them by far less than the tolerance."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    images = []
    for k in range(n):
        cy, cx = side * (0.4 + 0.15 * k), side * (0.55 - 0.1 * k)
        blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * (side / 5) ** 2))
        images.append(0.15 + 0.8 * blob)
    return torch.stack(images)[:, None].float()


def central_disk(side: int, radius_fraction: float) -> torch.Tensor:
    """bool [side, side]: pixels inside the disk every rotation by <= 20° and zoom keeps."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    centre = (side - 1) / 2
    return (ys - centre) ** 2 + (xs - centre) ** 2 <= (radius_fraction * side / 2) ** 2


def test_names_parse_and_rotation_range() -> None:
    assert rotation_names(20, 5) == [
        "rot-20", "rot-15", "rot-10", "rot-5", "rot5", "rot10", "rot15", "rot20",
    ]  # fmt: skip
    assert parse_tta("rot-7.5") == Affine(angle=-7.5, name="rot-7.5")
    assert parse_tta("scale1.1") == Affine(scale=1.1, name="scale1.1")
    assert isinstance(parse_tta("hflip"), HorizontalFlip) and isinstance(parse_tta("clahe"), Clahe)
    for bad in ("vflip", "rot", "scale0", "scale-1", "rotate10"):
        with pytest.raises(ValueError, match="unknown TTA"):
            parse_tta(bad)
    with pytest.raises(ValueError, match="unknown TTA"):
        Predictor(Pointwise(), tta=("rot10", "spin"), device="cpu")


def test_hflip_inverse_is_exact() -> None:
    maps = torch.rand(3, 16, 20)
    flip = HorizontalFlip()
    restored, weight = flip.inverse(flip.forward(maps[:, None])[:, 0])
    assert weight is None
    assert torch.equal(restored, maps)


def test_rotation_turns_counter_clockwise_and_back() -> None:
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 1, 4] = 1.0  # top centre
    rotation = parse_tta("rot90")
    view = rotation.forward(image)[0, 0]
    assert view.argmax() == 4 * 9 + 1  # moved to the left centre
    restored, weight = rotation.inverse(view[None])
    assert torch.allclose(restored[0], image[0, 0], atol=1e-5)
    assert torch.allclose(weight, torch.ones_like(weight))  # a square turned by 90° fits


def test_inverse_weight_is_zero_where_the_view_saw_nothing() -> None:
    restored, weight = parse_tta("rot45").inverse(torch.ones(1, 32, 32))
    assert weight[0, 0, 0] == 0 and weight[0, -1, -1] == 0  # corners rotated out of the view
    assert weight[0, 16, 16] == 1
    assert torch.allclose(restored, weight)  # the map comes back multiplied by its weight
    _, zoom_in = parse_tta("scale1.25").inverse(torch.ones(1, 32, 32))
    assert zoom_in[0, 0, 0] == 0 and zoom_in[0, 16, 16] == 1
    _, zoom_out = parse_tta("scale0.8").inverse(torch.ones(1, 32, 32))
    assert torch.allclose(zoom_out, torch.ones_like(zoom_out))  # everything stays in view


@pytest.mark.parametrize(
    "tta", [tuple(rotation_names(20, 5)), ("scale0.9", "scale1.1"), ("hflip", "rot-10", "rot10")]
)
def test_geometric_tta_of_a_pointwise_model_equals_the_plain_prediction(tta) -> None:
    images = smooth_images()
    plain = Predictor(Pointwise(), tta=(), device="cpu").predict_batch(images).masks
    augmented = Predictor(Pointwise(), tta=tta, device="cpu").predict_batch(images).masks
    assert augmented.shape == plain.shape == (2, 64, 64)
    inside = central_disk(64, 0.8)
    error = (augmented - plain).abs()[:, inside]
    assert error.max() < 0.02, error.max()
    # the views do differ before inversion: the test would fail without the inverses
    turned = Affine(angle=20).forward(images)
    assert (turned - images).abs().max() > 0.05


def test_views_are_averaged_over_valid_pixels_only() -> None:
    images = torch.rand(2, 1, 32, 32)
    tta = (*rotation_names(20, 10), "scale1.2")
    maps = Predictor(ConstantMap(), tta=tta, device="cpu").predict_batch(images).masks
    # corners left the rotated and zoomed views: counting them as 0 would lower them
    torch.testing.assert_close(maps, torch.full_like(maps, 0.7))


def test_clahe_changes_intensities_not_geometry() -> None:
    images = smooth_images(1, 64) * 0.3 + 0.3  # low contrast
    clahe = Clahe()
    view = clahe.forward(images)
    assert view.shape == images.shape
    assert view.std() > images.std() * 1.2  # contrast was stretched
    maps = torch.rand(1, 64, 64)
    restored, weight = clahe.inverse(maps)
    assert weight is None and torch.equal(restored, maps)
    with_clahe = Predictor(Pointwise(), tta=("clahe",), device="cpu").predict_batch(images)
    plain = Predictor(Pointwise(), tta=(), device="cpu").predict_batch(images)
    expected = (plain.masks + torch.sigmoid((view[:, 0] - 0.5) * 8.0)) / 2
    torch.testing.assert_close(with_clahe.masks, expected, atol=1e-6, rtol=0)
