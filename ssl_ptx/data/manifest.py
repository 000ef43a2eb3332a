"""The manifest: one row per image, the same columns for every data source.

Every reader (SIIM here, CheXpert / NIH / Montgomery in ``external_data``) returns a pandas
DataFrame with at least :data:`MANIFEST_COLUMNS`. Downstream code (cache, datasets, samplers,
pseudo labels) only relies on these columns.

Columns
    image_id     str    unique id (SIIM: SOPInstanceUID = DICOM file stem)
    path         str    absolute path of the image file (DICOM, PNG or JPEG)
    source       str    "siim", "chexpert", "nih", "montgomery", "pseudo", ...
    label        float  1.0 pneumothorax, 0.0 none, NaN unknown / unlabelled
                        (CheXpert keeps -1.0 for "uncertain")
    rle          str    SIIM RLE of the union mask at (height, width); "-1" empty; NaN no mask
    mask_path    str    path of a mask image when masks are files (NaN otherwise)
    fold         int    cross-validation fold, -1 when not assigned
    view         str    "PA", "AP", "LL", ... or "" when unknown
    patient_id   str    patient identifier ("" when unknown)
    height       int    native image height in pixels (0 when unknown)
    width        int    native image width in pixels (0 when unknown)
    mask_area    int    foreground pixels of the mask at native size (0 empty, -1 unknown)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["MANIFEST_COLUMNS", "empty_manifest", "read_manifest_csv", "validate_manifest"]

MANIFEST_COLUMNS: dict[str, str] = {
    "image_id": "object",
    "path": "object",
    "source": "object",
    "label": "float64",
    "rle": "object",
    "mask_path": "object",
    "fold": "int64",
    "view": "object",
    "patient_id": "object",
    "height": "int64",
    "width": "int64",
    "mask_area": "int64",
}


def empty_manifest() -> pd.DataFrame:
    """A manifest with zero rows and the standard columns and dtypes."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in MANIFEST_COLUMNS.items()})


def validate_manifest(df: pd.DataFrame, name: str = "manifest") -> pd.DataFrame:
    """Check that ``df`` carries the standard columns with usable values.

    Args:
        df: the manifest to check.
        name: how to call it in error messages (e.g. the CSV path it came from).

    Returns:
        ``df`` with the standard columns first, in :data:`MANIFEST_COLUMNS` order.

    Raises:
        ValueError: a column is missing, an ``image_id`` is duplicated or empty, or a
            ``label`` is outside {1, 0, -1, NaN}. The message names the first offending row.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; has {list(df.columns)}")
    ids = df["image_id"].astype(str)
    blank = ids.str.strip() == ""
    if blank.any():
        raise ValueError(f"{name}: empty image_id at row {int(np.flatnonzero(blank)[0])}")
    dup = ids.duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise ValueError(f"{name}: duplicated image_id {ids.iloc[row]!r} at row {row}")
    labels = df["label"].to_numpy(dtype=float)
    bad = ~(np.isnan(labels) | np.isin(labels, (1.0, 0.0, -1.0)))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: label {labels[row]!r} at row {row} is not 1, 0, -1 or NaN")
    rest = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    return df[list(MANIFEST_COLUMNS) + rest]


def read_manifest_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest saved with ``DataFrame.to_csv(index=False)``, checking every cell's type.

    Text columns stay text (an id such as ``00012`` keeps its zeros); ``label`` must be a number
    or blank (NaN); ``fold``, ``height``, ``width`` and ``mask_area`` must be integers.

    Args:
        path: the CSV file.

    Returns:
        The validated manifest (see :func:`validate_manifest`) with the dtypes of
        :data:`MANIFEST_COLUMNS`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming the file (and the 0-based data row): it cannot be parsed as CSV
            (empty, binary, ragged rows), a column is missing, a numeric cell is not a number
            (or not an integer), or :func:`validate_manifest` refuses it.
    """
    path = Path(path)
    text_columns = {name: str for name, dtype in MANIFEST_COLUMNS.items() if dtype == "object"}
    try:
        table = pd.read_csv(path, dtype=text_columns)
    except FileNotFoundError:
        raise
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as error:
        raise ValueError(f"{path}: cannot be read as a CSV file: {error}") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; has {list(table.columns)}")
    for column, dtype in MANIFEST_COLUMNS.items():
        if dtype == "object":
            continue
        values = pd.to_numeric(table[column], errors="coerce").astype(np.float64)
        bad = values.isna().to_numpy() & table[column].notna().to_numpy()
        if dtype == "int64":
            numbers = values.to_numpy()
            bad |= ~np.isfinite(numbers) | (np.trunc(numbers) != numbers)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            kind = "an integer" if dtype == "int64" else "a number"
            raise ValueError(
                f"{path}, row {row}: {column} {table[column].iat[row]!r} is not {kind}"
            )
        table[column] = values.astype(dtype)
    return validate_manifest(table, name=str(path))
