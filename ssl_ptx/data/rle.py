"""The SIIM-ACR run-length encoding, exactly as the competition files use it.

Convention (see ``docs/data.md``):

* the H×W mask is flattened column-major: down column 0, then column 1, ...
  (``mask.T.ravel()``), so pixel ``(y, x)`` has flat index ``x * H + y``; runs cross columns;
* the string is ``"s1 l1 s2 l2 ..."``: ``s1`` is the absolute 0-based index of the first run,
  every later ``s_k`` counts the background pixels between the end of the previous run and the
  start of this one, ``l_k`` is the run length;
* an empty mask is ``"-1"`` (a leading space, as in the stage-1 CSV, is accepted).

Unlike Kaggle's reference ``mask2rle``, :func:`encode` keeps a run that touches the last pixel
and treats any nonzero value as foreground.

All functions are vectorised numpy; none loops over pixels or runs in Python.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

__all__ = ["EMPTY", "area", "decode", "decode_union", "encode"]

EMPTY = "-1"
_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() would also take "1_0", "٣"
_ONLY_INTEGERS = re.compile(r"[0-9+\-\s]*")
#: the largest image :func:`area` accepts (2**40 pixels), so that sums of runs fit in int64
_MAX_PIXELS = 2**40


def encode(mask: np.ndarray) -> str:
    """Encode a mask as a SIIM RLE string.

    Args:
        mask: H×W array in display orientation; any nonzero value is foreground.

    Returns:
        The RLE string, or ``"-1"`` when the mask is empty.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode expects an H×W mask, got shape {mask.shape}")
    if mask.dtype.kind not in "bu":
        mask = mask != 0
    flat_index = _foreground_indices(mask)
    if flat_index.size == 0:
        return EMPTY
    breaks = np.flatnonzero(np.diff(flat_index) != 1) + 1
    starts = flat_index[np.concatenate(([0], breaks))]
    ends = flat_index[np.concatenate((breaks - 1, [flat_index.size - 1]))] + 1
    tokens = np.empty(2 * starts.size, dtype=np.int64)
    tokens[0::2] = starts
    tokens[2::2] -= ends[:-1]
    tokens[1::2] = ends - starts
    return " ".join(map(str, tokens.tolist()))


def _foreground_indices(mask: np.ndarray) -> np.ndarray:
    """Sorted column-major flat indices of the nonzero pixels of an H×W bool/unsigned mask.

    Only the columns that hold foreground are transposed, so the cost follows the lesion's
    width rather than the image size.
    """
    height = mask.shape[0]
    columns = np.flatnonzero(mask.max(axis=0))
    if columns.size == 0:
        return np.empty(0, np.int64)
    local = np.flatnonzero(np.ascontiguousarray(mask[:, columns].T))
    column_of, row_of = np.divmod(local, height)
    return columns[column_of].astype(np.int64) * height + row_of


def _runs(rle: str, n_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse an RLE into absolute run ``starts`` and exclusive ``ends`` (flat indices).

    Raises:
        ValueError: the string is not a valid RLE for an image of ``n_pixels`` pixels.
    """
    if not isinstance(rle, str):
        raise ValueError(f"RLE must be a string, got {type(rle).__name__} {rle!r}")
    text = rle.strip()
    if text == EMPTY:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if not text:
        raise ValueError("RLE is an empty string (an empty mask is written '-1')")
    tokens = _tokens(text)
    if tokens.size % 2:
        raise ValueError(
            f"RLE has an odd number of tokens ({tokens.size}); expected start/length pairs"
        )
    if (tokens < 0).any():
        raise ValueError(f"RLE has a negative number ({int(tokens[tokens < 0][0])})")
    if tokens.max() > n_pixels:  # which also keeps the sums below inside int64
        raise ValueError(
            f"RLE number {int(tokens.max())} is larger than the image's {n_pixels} pixels"
        )
    gaps, lengths = tokens[0::2], tokens[1::2]
    if (lengths == 0).any():
        raise ValueError(f"RLE run {int(np.flatnonzero(lengths == 0)[0])} has length 0")
    ends = np.cumsum(gaps + lengths)
    starts = ends - lengths
    if ends[-1] > n_pixels:
        raise ValueError(
            f"RLE runs end at pixel {int(ends[-1])}, past the image's {n_pixels} pixels"
        )
    return starts, ends


def _tokens(text: str) -> np.ndarray:
    """The whitespace-separated integers of ``text`` as int64 (ValueError naming a bad one)."""
    parts = text.split()
    if _ONLY_INTEGERS.fullmatch(text):
        try:
            return np.array(parts).astype(np.int64)
        except (ValueError, OverflowError):
            pass  # a malformed sign ("+-1") or a number beyond int64
    bad = next((part for part in parts if not _INTEGER.fullmatch(part)), None)
    if bad is not None:
        raise ValueError(f"RLE token {bad!r} is not an integer")
    raise ValueError(f"RLE number {max(parts, key=len)!r} is too large")


def _runs_to_mask(starts: np.ndarray, ends: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Paint runs (flat column-major indices, may overlap) into an H×W uint8 0/1 mask.

    Work is proportional to the number of foreground pixels, not to the image size.
    """
    height, width = shape
    mask = np.zeros(shape, np.uint8)
    lengths = ends - starts
    total = int(lengths.sum())
    if total:
        offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        column, row = np.divmod(np.arange(total, dtype=np.int64) + offsets, height)
        mask[row, column] = 1
    return mask


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"shape must be (height, width) with positive sizes, got {shape}")
    return int(shape[0]), int(shape[1])


def decode(rle: str, shape: tuple[int, int] = (1024, 1024)) -> np.ndarray:
    """Decode a SIIM RLE string.

    Args:
        rle: the RLE string; ``"-1"`` (optionally with surrounding spaces) is an empty mask.
        shape: ``(height, width)`` of the image in pixels.

    Returns:
        uint8 array H×W with values 0/1, display orientation.

    Raises:
        ValueError: odd token count, a non-integer or negative token, a zero-length run, or runs
            past the end of the image. The message says which.
    """
    shape = _check_shape(shape)
    starts, ends = _runs(rle, shape[0] * shape[1])
    return _runs_to_mask(starts, ends, shape)


def decode_union(rles: Iterable[str], shape: tuple[int, int] = (1024, 1024)) -> np.ndarray:
    """Decode several instance RLEs of one image into their union (logical OR).

    Args:
        rles: RLE strings of the instances; ``"-1"`` entries add nothing.
        shape: ``(height, width)`` of the image in pixels.

    Returns:
        uint8 array H×W with values 0/1.
    """
    shape = _check_shape(shape)
    n_pixels = shape[0] * shape[1]
    runs = [_runs(rle, n_pixels) for rle in rles]
    if not runs:
        return np.zeros(shape, np.uint8)
    starts = np.concatenate([s for s, _ in runs])
    ends = np.concatenate([e for _, e in runs])
    return _runs_to_mask(starts, ends, shape)


def area(rle: str) -> int:
    """Number of foreground pixels of one RLE (the sum of its run lengths), without decoding.

    Overlapping instances must be merged first (``encode(decode_union(...))``) for this to be
    the area of their union.
    """
    starts, ends = _runs(rle, _MAX_PIXELS)
    return int((ends - starts).sum())
