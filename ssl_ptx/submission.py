"""SIIM-ACR submission files: one row per image, and a checker against a sample submission.

Format (both stages): header ``ImageId,EncodedPixels``; one row per image; the union of the
image's predicted instances as one RLE of :mod:`ssl_ptx.data.rle` (column-major, first start
absolute and 0-based, later starts relative to the end of the previous run), computed at the
image's native size (1024² for SIIM); ``-1`` when the mask is empty.

The stages differ in their image ids, not in the encoding:

* stage 1: ``ImageId`` is the DICOM's SOPInstanceUID (``1.2.276.0.7230010.3.1.4.8323329…``);
  its sample submission listed 1,484 rows for 1,372 images (one row per instance);
* stage 2: ids like ``ID_0011fe81e`` (the stage-2 DICOM file stems); its sample submission
  has 3,205 rows, one per image.

The winning solutions' stage-2 submission code used the same relative-start encoder as the
stage-1 label file. Later copies of SIIM mix the two id styles, so :func:`write_submission`
can check that the ids look like the stage's (``stage=1`` or ``2``), and
:func:`check_submission` compares a file with the sample submission it answers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ssl_ptx.data import rle
from ssl_ptx.fileio import atomic_path

__all__ = [
    "ID_PATTERNS",
    "SUBMISSION_COLUMNS",
    "SubmissionCheck",
    "check_image_ids",
    "check_submission",
    "encode_mask",
    "read_submission",
    "submission_frame",
    "write_submission",
]

SUBMISSION_COLUMNS = ("ImageId", "EncodedPixels")
#: stage → what its image ids look like
ID_PATTERNS: dict[int, re.Pattern[str]] = {
    1: re.compile(r"\d+(\.\d+)+"),
    2: re.compile(r"ID_[0-9a-f]+"),
}
_ID_EXAMPLES = {1: "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819", 2: "ID_0011fe81e"}
_FIRST_DATA_LINE = 2  # line 1 is the header
_N_LISTED = 5

MaskLike = np.ndarray | torch.Tensor


def encode_mask(mask: MaskLike) -> str:
    """The submission RLE of one image: ``[H, W]`` mask, or ``[K, H, W]`` instance masks whose
    union is encoded; nonzero = lesion; ``"-1"`` when empty."""
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim == 3:
        array = (array != 0).any(axis=0)
    if array.ndim != 2:
        raise ValueError(f"expected an [H, W] mask or [K, H, W] instances, got {array.shape}")
    return rle.encode(array)


def check_image_ids(image_ids: Iterable[str], stage: int) -> None:
    """Raise ``ValueError`` naming the first id that does not look like a ``stage`` id."""
    if stage not in ID_PATTERNS:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    pattern = ID_PATTERNS[stage]
    for position, image_id in enumerate(image_ids):
        if not pattern.fullmatch(str(image_id)):
            other = 2 if stage == 1 else 1
            hint = (
                f"; it looks like a stage-{other} id"
                if ID_PATTERNS[other].fullmatch(str(image_id))
                else ""
            )
            raise ValueError(
                f"image id {image_id!r} (row {position}) is not a stage-{stage} id (like "
                f"{_ID_EXAMPLES[stage]}){hint}. Stage-2 test DICOMs are named by their stage-2 "
                "id; predict on the files of the stage you submit to"
            )


def submission_frame(
    masks: Mapping[str, MaskLike] | Iterable[tuple[str, MaskLike]], *, stage: int | None = None
) -> pd.DataFrame:
    """One row per image: ``ImageId``, ``EncodedPixels`` (:func:`encode_mask`).

    Args:
        masks: image id → mask (``[H, W]`` or ``[K, H, W]`` instances) at the image's native
            size, as a mapping or an iterable of pairs (a generator keeps one mask in memory).
        stage: 1 or 2 to check the ids' style (:func:`check_image_ids`); None skips it.

    Raises:
        ValueError: a duplicate id (both rows named), or ids of the wrong stage.
    """
    pairs = masks.items() if isinstance(masks, Mapping) else masks
    ids: list[str] = []
    codes: list[str] = []
    seen: dict[str, int] = {}
    for image_id, mask in pairs:
        image_id = str(image_id)
        if image_id in seen:
            raise ValueError(
                f"image {image_id!r} given twice (rows {seen[image_id]} and {len(ids)}); a "
                "submission has one row per image: merge the instances into one mask"
            )
        seen[image_id] = len(ids)
        ids.append(image_id)
        codes.append(encode_mask(mask))
    if stage is not None:
        check_image_ids(ids, stage)
    return pd.DataFrame({"ImageId": ids, "EncodedPixels": codes}, columns=list(SUBMISSION_COLUMNS))


def write_submission(
    masks: Mapping[str, MaskLike] | Iterable[tuple[str, MaskLike]],
    path: str | os.PathLike,
    *,
    stage: int | None = None,
) -> Path:
    """Write :func:`submission_frame` of ``masks`` to ``path`` (atomically). Returns ``path``."""
    frame = submission_frame(masks, stage=stage)
    path = Path(path)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def read_submission(path: str | os.PathLike) -> pd.DataFrame:
    """A submission (or sample submission) CSV as strings, nothing converted.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a CSV file (the message names it).
    """
    path = Path(path)
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot be read as a CSV file: {error}") from None


@dataclass
class SubmissionCheck:
    """What :func:`check_submission` found. Lines are 1-based CSV lines (the header is line 1).

    Attributes:
        n_rows: data rows of the submission.
        header_problems: what is wrong with the header (empty when it is ``ImageId,EncodedPixels``).
        missing_ids: ids of the sample submission without a row, sorted.
        extra_ids: ids with a row that the sample submission does not list, sorted.
        duplicate_ids: id → the lines of its rows, for ids given more than once.
        malformed: ``(line, image_id, reason)`` for rows whose RLE cannot be decoded.
    """

    n_rows: int
    header_problems: list[str] = field(default_factory=list)
    missing_ids: list[str] = field(default_factory=list)
    extra_ids: list[str] = field(default_factory=list)
    duplicate_ids: dict[str, list[int]] = field(default_factory=dict)
    malformed: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not (
            self.header_problems
            or self.missing_ids
            or self.extra_ids
            or self.duplicate_ids
            or self.malformed
        )

    def summary(self) -> str:
        """A few lines saying what is wrong (or that nothing is)."""
        if self.ok:
            return f"submission OK: {self.n_rows} rows, one per image of the sample submission"
        lines = [f"submission has problems ({self.n_rows} rows):"]
        lines += [f"  header: {problem}" for problem in self.header_problems]
        for title, ids in (("missing", self.missing_ids), ("extra", self.extra_ids)):
            if ids:
                listed = ", ".join(ids[:_N_LISTED]) + (" …" if len(ids) > _N_LISTED else "")
                lines.append(f"  {len(ids)} {title} id(s): {listed}")
        if self.duplicate_ids:
            items = list(self.duplicate_ids.items())[:_N_LISTED]
            listed = "; ".join(f"{i} (lines {', '.join(map(str, ls))})" for i, ls in items)
            lines.append(f"  {len(self.duplicate_ids)} duplicated id(s): {listed}")
        for line, image_id, reason in self.malformed[:_N_LISTED]:
            lines.append(f"  line {line} ({image_id}): {reason}")
        if len(self.malformed) > _N_LISTED:
            lines.append(f"  … {len(self.malformed) - _N_LISTED} more malformed row(s)")
        return "\n".join(lines)


def _as_frame(table: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    return read_submission(table) if isinstance(table, (str, os.PathLike)) else table


def check_submission(
    submission: pd.DataFrame | str | os.PathLike,
    sample_submission: pd.DataFrame | str | os.PathLike,
    *,
    shape: tuple[int, int] = (1024, 1024),
) -> SubmissionCheck:
    """Compare a submission with the sample submission it answers.

    Checks: the header is exactly ``ImageId,EncodedPixels``; every id of the sample has a row
    (the sample's own repeated ids count once); no id the sample lacks; no id twice; every
    ``EncodedPixels`` is ``-1`` or an RLE that decodes at ``shape`` (an empty cell, an odd
    number of tokens, a non-integer, a negative number, a zero-length run or a run past the
    image are malformed).

    Args:
        submission: the submission (a CSV path or a DataFrame of strings; a DataFrame's row n
            is reported as line n + 2, where it would be in its CSV).
        sample_submission: the competition's sample submission (path or DataFrame).
        shape: ``(height, width)`` of the images in pixels.

    Returns:
        A :class:`SubmissionCheck`; ``.ok`` and ``.summary()`` say what is wrong.
    """
    table = _as_frame(submission)
    sample = _as_frame(sample_submission)
    sample.columns = [str(name).strip() for name in sample.columns]
    if "ImageId" not in sample.columns:
        raise ValueError(f"the sample submission has no ImageId column: {list(sample.columns)}")
    check = SubmissionCheck(n_rows=len(table))
    columns = [str(name) for name in table.columns]
    if tuple(columns) != SUBMISSION_COLUMNS:
        check.header_problems.append(
            f"columns are {columns}, expected {list(SUBMISSION_COLUMNS)} exactly"
        )
    stripped = {name.strip(): name for name in columns}
    if not all(name in stripped for name in SUBMISSION_COLUMNS):
        return check
    ids = table[stripped["ImageId"]].astype(str).str.strip()
    codes = table[stripped["EncodedPixels"]].astype(str)
    lines = np.arange(len(table)) + _FIRST_DATA_LINE

    expected = set(sample["ImageId"].astype(str).str.strip())
    given = set(ids)
    check.missing_ids = sorted(expected - given)
    check.extra_ids = sorted(given - expected)
    repeated = ids[ids.duplicated(keep=False)]
    for image_id, rows in repeated.groupby(repeated, sort=False).groups.items():
        check.duplicate_ids[str(image_id)] = [int(lines[row]) for row in rows]
    for row, (image_id, code) in enumerate(zip(ids, codes, strict=True)):
        reason = _rle_problem(code, shape)
        if reason is not None:
            check.malformed.append((int(lines[row]), image_id, reason))
    return check


def _rle_problem(code: str, shape: tuple[int, int]) -> str | None:
    if code.strip() == "":
        return "empty EncodedPixels (an empty mask is written -1)"
    try:
        rle.decode(code, shape)
    except ValueError as error:
        return str(error)
    return None
