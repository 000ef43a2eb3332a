from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ssl_ptx.data import rle


def test_real_rows_round_trip_string_equal(siim_rle_csv):
    """Every one of the 12,954 real SIIM rows decodes and re-encodes to the same string."""
    values = pd.read_csv(siim_rle_csv).iloc[:, 1]
    assert len(values) == 12954
    mismatched = [v for v in values if rle.encode(rle.decode(v)) != v.strip()]
    assert mismatched == []


def test_real_rows_decode_inside_image_and_area_matches(siim_rle_csv):
    values = pd.read_csv(siim_rle_csv).iloc[:, 1].str.strip()
    positive = values[values != "-1"].iloc[:200]
    for value in positive:
        mask = rle.decode(value)
        assert mask.shape == (1024, 1024) and mask.dtype == np.uint8
        assert int(mask.sum()) == rle.area(value) > 0


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        # 3×3, column-major: column 0 = rows 0..2 → flat 0,1,2
        (np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0]]), "0 2"),
        # a run that wraps from the bottom of column 0 to the top of column 1
        (np.array([[0, 1, 0], [0, 0, 0], [1, 0, 0]]), "2 2"),
        # relative starts: second run starts 3 background pixels after the first ends
        (np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]]), "0 1 3 1"),
        # a run that touches the very last pixel (Kaggle's mask2rle drops it)
        (np.array([[0, 0, 0], [0, 0, 1], [0, 0, 1]]), "7 2"),
        # full and empty
        (np.ones((2, 3)), "0 6"),
        (np.zeros((4, 5)), "-1"),
        # any nonzero value is foreground, 255 included
        (np.array([[255, 0], [0, 7]], dtype=np.uint8), "0 1 2 1"),
    ],
)
def test_hand_made_masks(mask, expected):
    assert rle.encode(mask) == expected
    decoded = rle.decode(expected, mask.shape)
    np.testing.assert_array_equal(decoded, (mask != 0).astype(np.uint8))


def test_non_square_orientation():
    mask = np.zeros((2, 4), np.uint8)
    mask[0, 3] = 1  # flat index x*H + y = 3*2 + 0 = 6
    assert rle.encode(mask) == "6 1"
    np.testing.assert_array_equal(rle.decode("6 1", (2, 4)), mask)


def test_decode_accepts_spaced_empty_and_values():
    assert rle.decode(" -1", (3, 3)).sum() == 0
    assert rle.decode(" 1 2 ", (3, 3)).sum() == 2


def test_decode_union_is_logical_or():
    rng = np.random.default_rng(0)
    a = (rng.random((16, 12)) > 0.7).astype(np.uint8)
    b = (rng.random((16, 12)) > 0.7).astype(np.uint8)
    union = rle.decode_union([rle.encode(a), rle.encode(b), "-1"], (16, 12))
    np.testing.assert_array_equal(union, a | b)
    assert rle.decode_union([], (5, 5)).sum() == 0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("1 2 3", "odd number"),
        ("1 x", "not an integer"),
        ("1.5 2", "not an integer"),
        ("-3 2", "negative"),
        ("0 0", "length 0"),
        ("5 3", "past the image"),  # checked on a 2×3 image: runs end at 8 > 6 pixels
        ("", "empty string"),
    ],
)
def test_malformed_rle_raises_value_error(bad, message):
    shape = (3, 3) if bad != "5 3" else (2, 3)
    with pytest.raises(ValueError, match=message):
        rle.decode(bad, shape)


def test_decode_rejects_non_string_and_bad_shape():
    with pytest.raises(ValueError, match="must be a string"):
        rle.decode(float("nan"))
    with pytest.raises(ValueError, match="shape"):
        rle.decode("-1", (0, 5))
