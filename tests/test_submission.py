"""Submission files: RLE round trip, stage id checks, and the checker against a sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ssl_ptx.data import rle
from ssl_ptx.submission import (
    check_submission,
    read_submission,
    submission_frame,
    write_submission,
)

SHAPE = (64, 64)
UIDS = [f"1.2.276.0.7230010.3.1.4.8323329.{n}.1517875201.850819" for n in range(4)]


def _masks() -> dict[str, np.ndarray]:
    """Four images: one lesion, an empty one, one touching the last pixel, two overlapping
    instances given as a [K, H, W] stack."""
    rng = np.random.default_rng(0)
    lesion = np.zeros(SHAPE, np.uint8)
    lesion[10:20, 30:34] = 1
    lesion[rng.integers(0, 64, 20), rng.integers(0, 64, 20)] = 1
    corner = np.zeros(SHAPE, bool)
    corner[60:, 62:] = True
    instances = np.zeros((2, *SHAPE), np.uint8)
    instances[0, 5:15, 5:15] = 1
    instances[1, 10:25, 10:12] = 1
    return {UIDS[0]: lesion, UIDS[1]: np.zeros(SHAPE), UIDS[2]: corner, UIDS[3]: instances}


def test_round_trip_through_the_rle_decoder(tmp_path: Path) -> None:
    masks = _masks()
    path = write_submission(masks, tmp_path / "submission.csv", stage=1)
    assert path.read_text().splitlines()[0] == "ImageId,EncodedPixels"
    table = read_submission(path)
    assert table["ImageId"].tolist() == UIDS
    assert table["EncodedPixels"].iat[1] == "-1"
    for image_id, code in zip(table["ImageId"], table["EncodedPixels"], strict=True):
        expected = masks[image_id]
        if expected.ndim == 3:
            expected = expected.any(axis=0)
        assert np.array_equal(rle.decode(code, SHAPE), expected != 0), image_id
    # a generator of pairs gives the same file
    again = write_submission(iter(masks.items()), tmp_path / "again.csv")
    assert again.read_text() == path.read_text()


def test_stage_ids_are_checked() -> None:
    masks = {"ID_0011fe81e": np.zeros(SHAPE)}
    assert submission_frame(masks, stage=2)["ImageId"].tolist() == ["ID_0011fe81e"]
    with pytest.raises(ValueError, match="not a stage-1 id.*stage-2 id"):
        submission_frame(masks, stage=1)
    with pytest.raises(ValueError, match="not a stage-2 id.*stage-1 id"):
        submission_frame({UIDS[0]: np.zeros(SHAPE)}, stage=2)
    with pytest.raises(ValueError, match="given twice"):
        submission_frame([(UIDS[0], np.zeros(SHAPE)), (UIDS[0], np.zeros(SHAPE))])


def _sample() -> pd.DataFrame:
    # the stage-1 sample repeated ids of multi-instance images; they count once
    return pd.DataFrame({"ImageId": [*UIDS, UIDS[0]], "EncodedPixels": "-1"})


def test_checker_accepts_a_correct_submission(tmp_path: Path) -> None:
    path = write_submission(_masks(), tmp_path / "submission.csv")
    check = check_submission(path, _sample(), shape=SHAPE)
    assert check.ok and check.n_rows == 4
    assert "OK" in check.summary()


def test_checker_catches_each_defect(tmp_path: Path) -> None:
    rows = [
        (UIDS[0], "10 5"),
        (UIDS[1], "-1"),
        (UIDS[1], "3 2"),  # duplicate of line 3
        ("1.2.3.extra", "-1"),  # not in the sample
        (UIDS[2], "1 2 3"),  # odd number of tokens
    ]
    # UIDS[3] missing
    path = tmp_path / "bad.csv"
    pd.DataFrame(rows, columns=["ImageId", "EncodedPixels"]).to_csv(path, index=False)
    check = check_submission(path, _sample(), shape=SHAPE)
    assert not check.ok
    assert check.missing_ids == [UIDS[3]]
    assert check.extra_ids == ["1.2.3.extra"]
    assert check.duplicate_ids == {UIDS[1]: [3, 4]}
    assert [(line, image_id) for line, image_id, _ in check.malformed] == [(6, UIDS[2])]
    assert "odd number of tokens" in check.malformed[0][2]
    summary = check.summary()
    for text in (UIDS[3], "1.2.3.extra", "lines 3, 4", "line 6"):
        assert text in summary


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("", "empty EncodedPixels"),
        ("5 x", "not an integer"),
        ("5 -2", "negative"),
        ("5 0", "length 0"),
        (f"{64 * 64 - 2} 5", "past the image"),
    ],
)
def test_checker_names_malformed_rle(code: str, reason: str) -> None:
    table = pd.DataFrame({"ImageId": UIDS, "EncodedPixels": ["-1", "-1", code, "-1"]})
    check = check_submission(table, _sample(), shape=SHAPE)
    assert len(check.malformed) == 1
    line, image_id, message = check.malformed[0]
    assert (line, image_id) == (4, UIDS[2]) and reason in message


def test_checker_flags_a_wrong_header(tmp_path: Path) -> None:
    path = tmp_path / "spaced.csv"
    path.write_text("ImageId, EncodedPixels\n" + "".join(f"{u},-1\n" for u in UIDS))
    check = check_submission(path, _sample(), shape=SHAPE)
    assert check.header_problems and not check.missing_ids and not check.malformed
    assert "expected ['ImageId', 'EncodedPixels']" in check.summary()


def test_nothing_is_written_when_a_mask_is_bad(tmp_path: Path) -> None:
    path = tmp_path / "submission.csv"
    bad = {UIDS[0]: np.zeros(SHAPE), UIDS[1]: np.zeros((2, 2, 2, 2))}
    with pytest.raises(ValueError, match="mask"):
        write_submission(bad, path)
    assert list(tmp_path.iterdir()) == []
