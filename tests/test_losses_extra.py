"""The winners' extra losses against straightforward per-pixel loops: the 8th place's weighted
BCE, the 1st place's BCE + Dice + focal (3/1/4), the 4th place's BCE + Dice + presence BCE and
the 5th place's 1024·BCE + presence BCE — on mixed, empty and all-ones masks."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_ptx.losses import LOSSES, ComboLoss, WeightedBCELoss, build_loss, weighted_bce


def _pixel_bce(z: float, y: float) -> float:
    p = 1.0 / (1.0 + math.exp(-z))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _loop_weighted_bce(logits: torch.Tensor, masks: torch.Tensor, pos: float, neg: float):
    pos_sum = neg_sum = 0.0
    n_pos = n_neg = 0
    for z, y in zip(logits.flatten().tolist(), masks.flatten().tolist(), strict=True):
        if y > 0.5:
            pos_sum, n_pos = pos_sum + _pixel_bce(z, 1.0), n_pos + 1
        else:
            neg_sum, n_neg = neg_sum + _pixel_bce(z, 0.0), n_neg + 1
    return pos * pos_sum / max(n_pos, 1) + neg * neg_sum / max(n_neg, 1)


def _loop_focal(logits: torch.Tensor, masks: torch.Tensor, gamma: float = 2.0) -> float:
    total = 0.0
    for z, y in zip(logits.flatten().tolist(), masks.flatten().tolist(), strict=True):
        p = 1.0 / (1.0 + math.exp(-z))
        p_true = p if y > 0.5 else 1 - p
        total += (1 - p_true) ** gamma * _pixel_bce(z, y)
    return total / logits.numel()


def _loop_batch_dice(logits: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> float:
    p = [1.0 / (1.0 + math.exp(-z)) for z in logits.flatten().tolist()]
    y = masks.flatten().tolist()
    intersection = sum(a * b for a, b in zip(p, y, strict=True))
    return 1 - (2 * intersection + smooth) / (sum(p) + sum(y) + smooth)


def _loop_bce(logits: torch.Tensor, masks: torch.Tensor) -> float:
    pairs = zip(logits.flatten().tolist(), masks.flatten().tolist(), strict=True)
    return sum(_pixel_bce(z, y) for z, y in pairs) / logits.numel()


def _loop_presence_bce(presence: torch.Tensor, masks: torch.Tensor) -> float:
    labels = [float(m.sum() > 0) for m in masks]
    return sum(
        _pixel_bce(z, y) for z, y in zip(presence.flatten().tolist(), labels, strict=True)
    ) / len(labels)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [3, 1, 8, 8] float64 and masks: a square, an empty mask, an all-ones mask."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=generator, dtype=torch.float64) * 2
    masks = torch.zeros(3, 1, 8, 8, dtype=torch.float64)
    masks[0, 0, 2:5, 3:7] = 1
    masks[2] = 1
    return logits, masks


@pytest.mark.parametrize("pos, neg", [(0.1, 4.9), (0.1, 7.9), (1.0, 1.0)])
def test_weighted_bce_matches_the_loop(batch, pos: float, neg: float) -> None:
    logits, masks = batch
    expected = _loop_weighted_bce(logits, masks, pos, neg)
    assert float(weighted_bce(logits, masks, pos, neg)) == pytest.approx(expected, rel=1e-12)
    module = WeightedBCELoss(pos, neg)
    assert float(module((logits, torch.zeros(3, 1)), masks)) == pytest.approx(expected, rel=1e-12)


def test_weighted_bce_on_empty_and_full_masks(batch) -> None:
    logits, _ = batch
    empty, full = torch.zeros_like(logits), torch.ones_like(logits)
    # only one class present: that class's mean BCE times its weight, no division by zero
    mean_negative = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, empty))
    mean_positive = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, full))
    assert float(weighted_bce(logits, empty, 0.1, 4.9)) == pytest.approx(4.9 * mean_negative)
    assert float(weighted_bce(logits, full, 0.1, 4.9)) == pytest.approx(0.1 * mean_positive)
    assert float(weighted_bce(logits, empty)) == pytest.approx(
        _loop_weighted_bce(logits, empty, 0.1, 4.9), rel=1e-12
    )


def test_weighted_bce_gradient_balances_the_classes() -> None:
    # one foreground pixel among 63 background ones at z = 0: per-class means make the lone
    # positive pixel's gradient pos/1 · ½ and each negative's neg/63 · ½
    logits = torch.zeros(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    masks = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    masks[0, 0, 0, 0] = 1
    weighted_bce(logits, masks, pos_frac=0.1, neg_frac=4.9).backward()
    grad = logits.grad.flatten()
    assert float(grad[0]) == pytest.approx(-0.1 * 0.5)
    assert torch.allclose(grad[1:], torch.full((63,), 4.9 * 0.5 / 63, dtype=torch.float64))


def test_weighted_bce_refuses_negative_weights(batch) -> None:
    with pytest.raises(ValueError, match="pos_frac and neg_frac must be >= 0"):
        weighted_bce(*batch, pos_frac=-1.0)


def test_weighted_bce_by_name_with_options(batch) -> None:
    logits, masks = batch
    assert "weighted_bce" in LOSSES
    loss = build_loss({"weighted_bce": {"weight": 2.0, "pos_frac": 0.1, "neg_frac": 7.9}})
    expected = 2.0 * _loop_weighted_bce(logits, masks, 0.1, 7.9)
    assert float(loss(logits, masks)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("which", ["mixed", "empty", "full"])
def test_first_place_bce_dice_focal(batch, which: str) -> None:
    logits, masks = batch
    if which != "mixed":
        masks = torch.zeros_like(masks) if which == "empty" else torch.ones_like(masks)
    loss = build_loss("bce_dice_focal")
    assert isinstance(loss, ComboLoss)
    expected = (
        3 * _loop_bce(logits, masks)
        + 1 * _loop_batch_dice(logits, masks)
        + 4 * _loop_focal(logits, masks)
    )
    assert float(loss(logits, masks)) == pytest.approx(expected, rel=1e-10)


def test_fourth_and_fifth_place_mixes_with_a_presence_head(batch) -> None:
    logits, masks = batch
    presence = torch.tensor([[1.5], [-0.5], [0.25]], dtype=torch.float64)
    outputs = (logits, presence)
    bce, cls = _loop_bce(logits, masks), _loop_presence_bce(presence, masks)
    fifth = build_loss("bce_cls")
    assert float(fifth(outputs, masks)) == pytest.approx(1024 * bce + cls, rel=1e-10)
    fourth = build_loss("bce_dice_cls")
    expected = 2.7 * bce + 0.9 * _loop_batch_dice(logits, masks) + 0.1 * cls
    assert float(fourth(outputs, masks)) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="presence_head=True"):
        fifth(logits, masks)


def test_presets_do_not_share_state_between_builds() -> None:
    first = build_loss("bce_dice_focal")
    first.weights["bce"] = 100.0
    assert build_loss("bce_dice_focal").weights["bce"] == 3.0
    assert not build_loss("bce_dice_focal").terms["dice"].per_image
