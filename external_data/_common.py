"""What the external readers share: reading a label CSV as text with its file lines, refusing
paths that leave the dataset folder, checking that listed files exist, reporting what is
missing, and finishing a manifest."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ssl_ptx.data.manifest import MANIFEST_COLUMNS, validate_manifest

__all__ = [
    "N_EXAMPLES",
    "check_inside_root",
    "existing_files",
    "finish_manifest",
    "read_csv_text",
    "to_number",
    "warn_count",
]

#: how many examples a warning names
N_EXAMPLES = 5
_FIRST_DATA_LINE = 2  # line 1 of a CSV is its header
#: manifest columns that always hold text (``rle`` and ``mask_path`` may be NaN)
_TEXT_COLUMNS = ("image_id", "path", "source", "view", "patient_id")


def read_csv_text(
    csv_path: Path, columns: Sequence[str], *, names: Sequence[str] | None = None
) -> pd.DataFrame:
    """Read columns of a CSV (``.gz`` too) as stripped text, blank lines left out.

    Args:
        csv_path: the file.
        columns: the columns to return; each must be in the header.
        names: column names to use instead of the header line (which is then skipped); data
            fields past the last name (e.g. trailing empty columns) are dropped, and a line
            with fewer fields gets ``""`` for the rest.

    Returns:
        ``columns`` (``""`` for empty cells) plus a column ``line``: each row's 1-based line
        in the file (line 1 is the header).

    Raises:
        FileNotFoundError: ``csv_path`` does not exist.
        ValueError: the file cannot be parsed as CSV, ``names`` repeats a name, or the file
            lacks some of ``columns`` (the message names the file and the columns).
    """
    repeated = sorted({name for name in names or () if list(names).count(name) > 1})
    if repeated:
        raise ValueError(f"{csv_path}, line 1: the header repeats the column name(s) {repeated}")
    try:
        table = pd.read_csv(
            csv_path,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            header=None if names is not None else "infer",
            skiprows=1 if names is not None else None,
            names=list(names) if names is not None else None,
            usecols=range(len(names)) if names is not None else None,
            index_col=False,
        )
    except FileNotFoundError:
        raise
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as error:
        raise ValueError(f"{csv_path}: cannot be read as a CSV file: {error}") from None
    table.columns = [str(name).strip() for name in table.columns]
    missing = [name for name in columns if name not in table.columns]
    if missing:
        raise ValueError(
            f"{csv_path}, line 1: missing column(s) {missing}; the header has {list(table.columns)}"
        )
    table = table.fillna("")  # the cells of a short line
    text = pd.DataFrame({name: table[name].str.strip() for name in columns})
    text["line"] = np.arange(len(text)) + _FIRST_DATA_LINE
    blank = (table == "").all(axis=1).to_numpy()
    return text[~blank].reset_index(drop=True)


def to_number(table: pd.DataFrame, column: str, csv_path: Path) -> pd.Series:
    """Column ``column`` of a text table as float64, NaN for blank cells.

    Raises:
        ValueError: a non-blank cell is not a finite number (``1E400`` is infinite); the
            message names the file, the line, the column and the value.
    """
    text = table[column]
    values = pd.to_numeric(text.where(text != "", np.nan), errors="coerce").astype(np.float64)
    bad = ~np.isfinite(values.to_numpy()) & (text != "").to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{csv_path}, line {table['line'].iat[row]}: {column} {text.iat[row]!r} is not a "
            "finite number"
        )
    return values


def check_inside_root(
    relative_paths: pd.Series, lines: pd.Series, csv_path: Path, column: str = "Path"
) -> None:
    """Refuse relative paths that could leave the dataset folder.

    A path is refused when it is absolute (``/x``, ``\\x``, ``C:...``) or has a ``..``
    component (``/`` and ``\\`` both count as separators). The check is on the text, so
    nothing outside the folder is ever touched.

    Raises:
        ValueError: naming ``csv_path``, the first offending line and its path.
    """
    slashed = relative_paths.str.replace("\\", "/", regex=False)
    escapes = (
        slashed.str.startswith("/")
        | slashed.str.match(r"[A-Za-z]:")
        | ("/" + slashed + "/").str.contains("/../", regex=False)
    ).to_numpy(bool)
    if escapes.any():
        row = int(np.flatnonzero(escapes)[0])
        raise ValueError(
            f"{csv_path}, line {lines.iat[row]}: {column} {relative_paths.iat[row]!r} leaves "
            "the dataset folder (absolute or with '..'); refused"
        )


def existing_files(paths: Sequence[str], *, desc: str, progress: bool = True) -> np.ndarray:
    """bool [N]: which of ``paths`` are existing files (one ``stat`` each, progress bar)."""
    return np.fromiter(
        (
            os.path.isfile(path)
            for path in tqdm(paths, desc=desc, unit="file", disable=not progress)
        ),
        dtype=bool,
        count=len(paths),
    )


def warn_count(
    logger: logging.Logger, examples: Sequence[str], message: str, *args: object
) -> None:
    """Log the warning ``"<count> " + message % args`` with up to five of ``examples``;
    nothing when ``examples`` is empty."""
    if len(examples):
        logger.warning(
            "%d " + message + " (e.g. %s)",
            len(examples),
            *args,
            ", ".join(map(str, examples[:N_EXAMPLES])),
        )


def finish_manifest(rows: pd.DataFrame, source: str, name: str) -> pd.DataFrame:
    """Add the manifest columns a reader leaves at their defaults, set dtypes and validate.

    Defaults (only for columns ``rows`` lacks): ``rle`` and ``mask_path`` NaN, ``fold`` -1,
    ``view`` and ``patient_id`` ``""``, ``height`` / ``width`` 0 (unknown), ``mask_area`` -1.

    Args:
        rows: one row per image with at least ``image_id``, ``path`` and ``label``.
        source: the value of the ``source`` column.
        name: how to call the data in validation errors (e.g. the label CSV).

    Returns:
        the validated manifest: the standard columns first, then the extra columns of ``rows``.

    Raises:
        ValueError: see :func:`ssl_ptx.data.manifest.validate_manifest` (e.g. an image id
            listed twice).
    """
    no_mask = {"rle": np.nan, "mask_path": np.nan}
    defaults = {"fold": -1, "view": "", "patient_id": "", "height": 0, "width": 0, "mask_area": -1}
    rows = rows.reset_index(drop=True).assign(source=source)
    for column, value in {**no_mask, **defaults}.items():
        if column not in rows.columns:
            dtype = object if column in no_mask else None
            rows[column] = pd.Series(value, index=rows.index, dtype=dtype)
    typed = {c: t for c, t in MANIFEST_COLUMNS.items() if t != "object"}
    typed.update(dict.fromkeys(_TEXT_COLUMNS, str))  # keeps them text when there are no rows
    return validate_manifest(rows.astype(typed), name=name)
