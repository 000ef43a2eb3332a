"""Read an NIH ChestX-ray14 download, as published, into a manifest.

Layout::

    <root>/images_001/images/00000001_000.png ... <root>/images_012/images/...
        (a flat <root>/images/ folder, or PNGs directly in images_NNN/, are found too)
    <root>/Data_Entry_2017.csv          or Data_Entry_2017_v2020.csv (optionally .gz)
    <root>/BBox_List_2017.csv

``Data_Entry_2017`` header::

    Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,
    OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]

The bracketed names hold commas, so a plain CSV parse splits them (``OriginalImage[Width``,
``Height]``); this reader expands each ``Name[a,b]`` into one column per bracketed part and
reads the values by position. The 2017 file ends its lines with an extra comma; that empty
column is dropped. The published PNGs were resized to 1024×1024: ``OriginalImage[...]`` and
``OriginalImagePixelSpacing[...]`` describe the image *before* that resize, so they are kept as
``original_width`` / ``original_height`` / ``pixel_spacing_x`` / ``pixel_spacing_y`` (pixels,
mm) and the manifest's ``height`` / ``width`` stay 0 (unknown until the PNG is read).

Labels are text-mined from the radiology reports (about 90 % accurate, as published): treat
them as noisy.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from external_data._common import finish_manifest, read_csv_text, to_number, warn_count

__all__ = [
    "LABEL_CSV_NAMES",
    "find_images",
    "find_label_csv",
    "load",
    "read_bbox",
    "read_exclusion_list",
    "read_labels",
]

logger = logging.getLogger(__name__)

#: label files recognised under an NIH root, optionally gzipped
LABEL_CSV_NAMES: tuple[str, ...] = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
_FINDING = "Pneumothorax"
_NO_FINDING = "No Finding"
#: column names after bracket expansion → the names this reader gives them
_LABEL_COLUMNS = {
    "Image Index": "image_id",
    "Finding Labels": "finding_labels",
    "Follow-up #": "follow_up",
    "Patient ID": "patient_id",
    "Patient Age": "age",
    "Patient Gender": "sex",
    "View Position": "view",
    "OriginalImage[Width]": "original_width",
    "OriginalImage[Height]": "original_height",
    "OriginalImagePixelSpacing[x]": "pixel_spacing_x",
    "OriginalImagePixelSpacing[y]": "pixel_spacing_y",
}
_BBOX_COLUMNS = {
    "Image Index": "image_id",
    "Finding Label": "finding_label",
    "Bbox[x]": "x",
    "Bbox[y]": "y",
    "Bbox[w]": "w",
    "Bbox[h]": "h",
}
_BRACKETED = re.compile(r"(?P<name>[^\[\]]*)\[(?P<parts>[^\[\]]*)\]")
_OUTSIDE_BRACKETS = re.compile(r",(?![^\[]*\])")  # a comma not followed by a closing "]" first
_AGE = re.compile(r"^\s*0*(\d+)\s*[Yy]?\s*$")  # "58", or "058Y" as some copies write it


def _expanded_header(csv_path: Path) -> list[str]:
    """The header of ``csv_path`` with every ``Name[a,b,...]`` expanded to ``Name[a]``,
    ``Name[b]``, ... (spaces around names and parts dropped); empty trailing names dropped.

    A bracketed name arrives split over several fields when the header is unquoted (the
    published files) and whole when a tool re-wrote the file with quotes; joining the fields
    back with commas makes both expand the same way.
    """
    try:
        first = pd.read_csv(csv_path, nrows=1, header=None, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as error:
        raise ValueError(f"{csv_path}: cannot be read as a CSV file: {error}") from None
    header = ",".join(first.iloc[0].tolist())
    names: list[str] = []
    for field in _OUTSIDE_BRACKETS.split(header):
        match = _BRACKETED.fullmatch(field.strip())
        if match is None:
            names.append(field.strip())
        else:
            stem = match["name"].strip()
            names += [f"{stem}[{part.strip()}]" for part in match["parts"].split(",")]
    while names and names[-1] == "":
        names.pop()
    return names


def read_labels(csv_path: str | os.PathLike) -> pd.DataFrame:
    """Read ``Data_Entry_2017.csv`` or ``Data_Entry_2017_v2020.csv`` (``.gz`` too).

    Args:
        csv_path: the label file.

    Returns:
        DataFrame in file order, one row per image:
        ``image_id`` (str, ``Image Index``, e.g. ``00000001_000.png``),
        ``label`` (float64: 1.0 when ``Pneumothorax`` is one of the ``|``-separated
        ``Finding Labels``, else 0.0), ``no_finding`` (bool, ``Finding Labels`` is
        ``No Finding``), ``finding_labels`` (str, as written), ``view`` (str, ``PA`` / ``AP``),
        ``patient_id`` (str, as written), ``age`` (float64 years; ``058Y`` reads as 58),
        ``sex`` (str ``M`` / ``F``), ``follow_up`` (int64), ``original_width``,
        ``original_height`` (int64 pixels of the image before NIH resized it to 1024²; these
        three are -1 when blank),
        ``pixel_spacing_x``, ``pixel_spacing_y`` (float64 mm, of that original), ``line``
        (1-based line in the file).

    Raises:
        FileNotFoundError: ``csv_path`` does not exist.
        ValueError: naming the file (and line): a missing column, a blank ``Image Index`` or
            ``Finding Labels``, or a value that is not a number where one is expected.
    """
    csv_path = Path(csv_path)
    table = read_csv_text(csv_path, list(_LABEL_COLUMNS), names=_expanded_header(csv_path))
    _refuse_blank(table, ("Image Index", "Finding Labels"), csv_path)
    table["Patient Age"] = table["Patient Age"].str.replace(_AGE, r"\1", regex=True)
    for column in ("Patient Age", "OriginalImagePixelSpacing[x]", "OriginalImagePixelSpacing[y]"):
        table[column] = to_number(table, column, csv_path)
    for column in ("Follow-up #", "OriginalImage[Width]", "OriginalImage[Height]"):
        table[column] = to_number(table, column, csv_path).fillna(-1).astype(np.int64)
    table = table.rename(columns=_LABEL_COLUMNS)
    findings = table["finding_labels"].str.split("|")
    table["label"] = findings.map(lambda labels: float(_FINDING in labels)).astype(np.float64)
    table["no_finding"] = (table["finding_labels"] == _NO_FINDING).to_numpy()
    order = ["image_id", "label", "no_finding", "finding_labels", "view", "patient_id", "age"]
    return table[order + [c for c in table.columns if c not in order and c != "line"] + ["line"]]


def _refuse_blank(table: pd.DataFrame, columns: Iterable[str], csv_path: Path) -> None:
    """Raise ``ValueError`` naming the file, line and column of the first blank cell."""
    for column in columns:
        blank = np.flatnonzero((table[column] == "").to_numpy())
        if blank.size:
            raise ValueError(f"{csv_path}, line {table['line'].iat[blank[0]]}: blank {column}")


def read_bbox(csv_path: str | os.PathLike) -> pd.DataFrame:
    """Read ``BBox_List_2017.csv`` (``.gz`` too).

    The header is ``Image Index,Finding Label,Bbox [x,y,w,h],,,``: the box is four columns and
    each line ends with empty columns, which are dropped.

    Returns:
        DataFrame in file order, one row per box: ``image_id`` (str), ``finding_label`` (str,
        e.g. ``Pneumothorax``), ``x``, ``y`` (float64, top-left corner), ``w``, ``h`` (float64),
        all in pixels of the published 1024² PNG; ``line`` (1-based line in the file).

    Raises:
        FileNotFoundError: ``csv_path`` does not exist.
        ValueError: naming the file (and line): a missing column, a blank cell, or a box
            value that is not a number.
    """
    csv_path = Path(csv_path)
    table = read_csv_text(csv_path, list(_BBOX_COLUMNS), names=_expanded_header(csv_path))
    _refuse_blank(table, _BBOX_COLUMNS, csv_path)
    for column in ("Bbox[x]", "Bbox[y]", "Bbox[w]", "Bbox[h]"):
        table[column] = to_number(table, column, csv_path)
    return table.rename(columns=_BBOX_COLUMNS)


def find_label_csv(root: str | os.PathLike) -> Path:
    """Find the NIH label file: one of :data:`LABEL_CSV_NAMES` (or ``.gz``) in ``root`` or,
    when none is there, in its direct subfolders.

    Raises:
        FileNotFoundError: none found.
        ValueError: several found at the same depth (pass the one you mean as ``csv``).
    """
    root = Path(root)
    names = [name + suffix for name in LABEL_CSV_NAMES for suffix in ("", ".gz")]
    for pattern in ("{}", "*/{}"):
        found = sorted(path for name in names for path in root.glob(pattern.format(name)))
        if len(found) > 1:
            raise ValueError(
                f"{root}: several NIH label files: {', '.join(map(str, found))}; pass csv= "
                "(--nih-csv) to choose one"
            )
        if found:
            return found[0]
    raise FileNotFoundError(
        f"{root}: no NIH label file ({' or '.join(LABEL_CSV_NAMES)}, optionally .gz) in it or "
        "its subfolders; pass csv= (--nih-csv) to name it"
    )


def find_images(root: str | os.PathLike) -> dict[str, Path]:
    """Map ``Image Index`` (the file name) → path for the PNGs of an NIH root.

    Looked at: ``images_*/images/``, ``images_*/`` and ``images/`` directly under ``root``
    (hidden files skipped, suffix matched case-insensitively). Other folders are not read.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        ValueError: two folders hold a file of the same name (both paths are named).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    folders = [
        root / "images",
        *sorted(root.glob("images_*")),
        *sorted(root.glob("images_*/images")),
    ]
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or not name.lower().endswith(".png"):
                    continue
                if not entry.is_file():
                    continue
                if name in found:
                    raise ValueError(f"two NIH images named {name}: {found[name]} and {entry.path}")
                found[name] = Path(entry.path)
    return found


def read_exclusion_list(ids_or_path: Iterable[str] | str | os.PathLike) -> set[str]:
    """Image ids to leave out: an iterable of ids, or a text file with one id per line
    (surrounding spaces and blank lines ignored).

    A ``str`` is taken as a file path, never as a list of characters.
    """
    if isinstance(ids_or_path, (str, os.PathLike)):
        lines = Path(ids_or_path).read_text().splitlines()
        return {line.strip() for line in lines if line.strip()}
    return {str(image_id).strip() for image_id in ids_or_path}


def load(
    root: str | os.PathLike,
    *,
    csv: str | os.PathLike | None = None,
    exclude_ids: Iterable[str] | str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Read an NIH ChestX-ray14 root into a manifest (columns of :mod:`ssl_ptx.data.manifest`).

    Images are located by listing the image folders once (:func:`find_images`), which is also
    the existence check. Rows of the label file without a PNG, and PNGs without a row, are not
    fatal: they are logged (a warning with the count and examples), listed in
    ``df.attrs["missing"]`` and ``df.attrs["unlisted"]`` (file order / sorted) and left out.

    Args:
        root: the NIH folder.
        csv: the label file; found under ``root`` with :func:`find_label_csv` when None.
        exclude_ids: image ids to leave out of the manifest, or a text file of them (one per
            line): e.g. the ChestX-ray14 images a SIIM validation fold was drawn from, so
            they never enter the unlabelled pool. How many were removed is logged; they are
            listed in ``df.attrs["excluded"]``.

    Returns:
        The validated manifest in label-file order: ``source`` ``"nih"``, ``path`` absolute,
        ``label`` 1.0 / 0.0, ``view``, ``patient_id``; ``fold`` -1, ``rle`` / ``mask_path``
        NaN, ``height`` / ``width`` 0, ``mask_area`` -1; extras as in :func:`read_labels`
        (``no_finding``, ``finding_labels``, ``age``, ``sex``, ``follow_up``,
        ``original_width``, ``original_height``, ``pixel_spacing_x``, ``pixel_spacing_y``).
        ``df.attrs["label_csv"]``: the label file read.

    Raises:
        FileNotFoundError: ``root``, ``csv`` or the exclusion file does not exist, or no
            label file is found.
        ValueError: a bad label file (see :func:`read_labels`), an image id listed twice, or
            two image files of the same name.
    """
    root = Path(root)
    images = find_images(root)
    csv_path = Path(csv) if csv is not None else find_label_csv(root)
    labels = read_labels(csv_path)

    excluded_mask = np.zeros(len(labels), bool)
    if exclude_ids is not None:
        exclusion = read_exclusion_list(exclude_ids)
        excluded_mask = labels["image_id"].isin(exclusion).to_numpy()
        logger.info(
            "excluded %d of %d listed id(s) from %s (%d not in it)",
            int(excluded_mask.sum()),
            len(exclusion),
            csv_path,
            len(exclusion) - int(excluded_mask.sum()),
        )
    has_file = labels["image_id"].isin(images.keys()).to_numpy()
    missing = labels["image_id"][~has_file & ~excluded_mask].tolist()
    unlisted = sorted(set(images) - set(labels["image_id"]))
    warn_count(
        logger, missing, "image(s) of %s have no PNG under %s; they are left out", csv_path, root
    )
    warn_count(
        logger, unlisted, "PNG(s) under %s have no row in %s; they are left out", root, csv_path
    )

    rows = labels[has_file & ~excluded_mask].drop(columns="line")
    rows["path"] = [os.path.abspath(images[image_id]) for image_id in rows["image_id"]]
    manifest = finish_manifest(rows, source="nih", name=str(csv_path))
    manifest.attrs["missing"] = missing
    manifest.attrs["unlisted"] = unlisted
    manifest.attrs["excluded"] = labels["image_id"][excluded_mask].tolist()
    manifest.attrs["label_csv"] = str(csv_path)
    return manifest
