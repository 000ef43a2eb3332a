from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssl_ptx.metrics import dice_breakdown, dice_per_image, mean_dice


def _masks():
    empty = np.zeros((4, 4), np.uint8)
    one = empty.copy()
    one[0, 0] = 1
    two = empty.copy()
    two[0, :2] = 1
    return empty, one, two


@pytest.mark.parametrize(
    ("pred_truth", "expected"),
    [
        (("empty", "empty"), 1.0),  # empty truth + empty prediction scores 1
        (("one", "empty"), 0.0),  # empty truth + any predicted pixel scores 0
        (("empty", "one"), 0.0),  # missed lesion
        (("two", "two"), 1.0),
        (("one", "two"), 2 * 1 / 3),
    ],
)
def test_dice_edge_cases(pred_truth, expected):
    masks = dict(zip(("empty", "one", "two"), _masks(), strict=True))
    pred, truth = (masks[k] for k in pred_truth)
    assert dice_per_image(pred, truth)[0] == pytest.approx(expected)


def test_batched_numpy_and_torch_agree_and_shapes():
    empty, one, two = _masks()
    pred = np.stack([empty, one, two, one])
    truth = np.stack([empty, empty, two, two])
    expected = [1.0, 0.0, 1.0, 2 / 3]
    np.testing.assert_allclose(dice_per_image(pred, truth), expected)
    np.testing.assert_allclose(
        dice_per_image(torch.from_numpy(pred)[:, None].float(), torch.from_numpy(truth)[:, None]),
        expected,
    )
    assert mean_dice(pred, truth) == pytest.approx(np.mean(expected))


def test_breakdown_explains_the_score():
    empty, one, two = _masks()
    pred = np.stack([empty, one, one, two, empty])
    truth = np.stack([empty, empty, two, two, two])
    b = dice_breakdown(pred, truth)
    assert (b["n_positive"], b["n_negative"]) == (3, 2)
    assert b["false_positive_rate"] == pytest.approx(0.5)
    assert b["dice_positive"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    recombined = (3 * b["dice_positive"] + 2 * (1 - b["false_positive_rate"])) / 5
    assert b["dice"] == pytest.approx(recombined)


def test_breakdown_without_negatives_is_nan():
    _, one, _ = _masks()
    b = dice_breakdown(one, one)
    assert math.isnan(b["false_positive_rate"]) and b["dice_positive"] == 1.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        dice_per_image(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="one channel"):
        dice_per_image(np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 4, 4)))
