"""Read a CheXpert download, as published, into a manifest.

Layout (the downsampled ``CheXpert-v1.0-small`` or the full-size ``CheXpert-v1.0``)::

    <root>/CheXpert-v1.0-small/train.csv       one row per image
    <root>/CheXpert-v1.0-small/valid.csv
    <root>/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg
    <root>/CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg

Header: ``Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,...,Pneumothorax,...``. ``Path`` starts
with the dataset folder's own name (``CheXpert-v1.0-small/train/...``) and so resolves against
the folder that holds it; this reader replaces that first component by the folder the CSV sits
in, so a renamed dataset folder still works. Label values: ``1.0`` positive, ``0.0`` negative,
``-1.0`` uncertain, blank = not mentioned (kept as NaN).

``image_id`` is the path after ``train/`` or ``valid/`` with ``/`` turned into ``_`` and the
suffix dropped: ``patient00001_study1_view1_frontal`` (as the SIIM 3rd place solution named
them). Ids are unique across both splits because the valid patients are not in train.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from external_data._common import (
    check_inside_root,
    existing_files,
    finish_manifest,
    read_csv_text,
    to_number,
    warn_count,
)

__all__ = [
    "DATASET_FOLDERS",
    "LABEL_VALUES",
    "SPLITS",
    "find_dataset_dir",
    "load",
    "read_labels",
]

logger = logging.getLogger(__name__)

#: the published dataset folder names, the downsampled one first
DATASET_FOLDERS: tuple[str, ...] = ("CheXpert-v1.0-small", "CheXpert-v1.0")
SPLITS: tuple[str, ...] = ("train", "valid")
#: the values a CheXpert observation may take (NaN = blank, not mentioned)
LABEL_VALUES: tuple[float, ...] = (1.0, 0.0, -1.0)
_LABEL_COLUMN = "Pneumothorax"
_REQUIRED = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", _LABEL_COLUMN)
#: the components of ``Path``: ``<dataset folder>/<split>/<patient>/<study>/<view file>``
_PATH_PARTS = ("folder", "split", "patient", "study", "file")
_SEX = {"Male": "M", "Female": "F"}
#: CheXpert does not say which side a lateral film was taken from; the chest lateral is taken
#: left side to the detector as a rule, DICOM's "LL"
_LATERAL_VIEW = "LL"


def read_labels(csv_path: str | os.PathLike, frontal_only: bool = True) -> pd.DataFrame:
    """Read CheXpert's ``train.csv`` or ``valid.csv`` (``.gz`` too): one row per image.

    Args:
        csv_path: the label file.
        frontal_only: keep only rows whose ``Frontal/Lateral`` is ``Frontal``.

    Returns:
        DataFrame in file order with columns
        ``image_id`` (str, see the module docstring),
        ``relative_path`` (str, ``Path`` as written, ``/``-separated),
        ``label`` (float64: Pneumothorax 1.0, 0.0, -1.0 uncertain, NaN blank),
        ``view`` (str: the ``AP/PA`` value for frontal rows, ``"LL"`` for lateral rows, ``""``
        when blank), ``patient_id`` (``patient00001``), ``study_id`` (``patient00001_study1``),
        ``split`` (the path's second component: ``train`` / ``valid``), ``sex`` (``M``, ``F``
        or ``""``), ``age`` (float64 years, NaN blank), ``frontal_lateral`` and ``ap_pa`` (str,
        as written), ``line`` (int, 1-based line in the file).

    Raises:
        FileNotFoundError: ``csv_path`` does not exist.
        ValueError: naming the file (and line): a missing column, a ``Path`` that leaves the
            dataset folder (absolute or with ``..``) or is not
            ``<folder>/<split>/<patient>/<study>/<file>``, a Pneumothorax value outside
            1.0 / 0.0 / -1.0 / blank, or an age that is not a number.
    """
    csv_path = Path(csv_path)
    table = read_csv_text(csv_path, _REQUIRED)
    relative = table["Path"].str.replace("\\", "/", regex=False)
    check_inside_root(relative, table["line"], csv_path)
    malformed = (
        (relative.str.count("/") != len(_PATH_PARTS) - 1)
        | relative.str.contains("//", regex=False)
        | relative.str.endswith("/")
    ).to_numpy()
    if malformed.any():
        row = int(np.flatnonzero(malformed)[0])
        raise ValueError(
            f"{csv_path}, line {table['line'].iat[row]}: Path {relative.iat[row]!r} is not "
            "<dataset folder>/<split>/<patient>/<study>/<image file>"
        )
    label = to_number(table, _LABEL_COLUMN, csv_path)
    unknown = ~(label.isna() | label.isin(LABEL_VALUES)).to_numpy()
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise ValueError(
            f"{csv_path}, line {table['line'].iat[row]}: {_LABEL_COLUMN} "
            f"{table[_LABEL_COLUMN].iat[row]!r} is not 1.0, 0.0, -1.0 or blank"
        )
    parts = relative.str.split("/", expand=True, n=len(_PATH_PARTS) - 1)
    parts = parts.reindex(columns=range(len(_PATH_PARTS))).astype(str)  # 0 columns if empty
    parts.columns = list(_PATH_PARTS)
    lateral = (table["Frontal/Lateral"] == "Lateral").to_numpy()
    stem = parts["file"].str.replace(r"\.[^.]*$", "", regex=True)
    labels = pd.DataFrame(
        {
            "image_id": parts["patient"] + "_" + parts["study"] + "_" + stem,
            "relative_path": relative,
            "label": label,
            "view": np.where(lateral, _LATERAL_VIEW, table["AP/PA"]),
            "patient_id": parts["patient"],
            "study_id": parts["patient"] + "_" + parts["study"],
            "split": parts["split"],
            "sex": table["Sex"].map(_SEX).fillna(""),
            "age": to_number(table, "Age", csv_path),
            "frontal_lateral": table["Frontal/Lateral"],
            "ap_pa": table["AP/PA"],
            "line": table["line"],
        }
    )
    if frontal_only:
        labels = labels[(labels["frontal_lateral"] == "Frontal").to_numpy()]
    return labels.reset_index(drop=True)


def find_dataset_dir(root: str | os.PathLike) -> Path:
    """The CheXpert dataset folder: ``root`` itself when it holds ``train.csv`` or
    ``valid.csv``, else the one of :data:`DATASET_FOLDERS` inside ``root``.

    Raises:
        FileNotFoundError: neither is found.
        ValueError: ``root`` holds both ``CheXpert-v1.0-small`` and ``CheXpert-v1.0`` (pass
            the one you mean).
    """
    root = Path(root)
    if any(_label_csv(root, split) is not None for split in SPLITS):
        return root
    found = [root / name for name in DATASET_FOLDERS if (root / name).is_dir()]
    if len(found) > 1:
        raise ValueError(
            f"{root}: holds both {found[0].name} and {found[1].name}; pass the dataset folder "
            "you mean as the root"
        )
    if not found:
        raise FileNotFoundError(
            f"{root}: no CheXpert dataset found (neither train.csv / valid.csv in it nor a "
            f"{' or '.join(DATASET_FOLDERS)} folder)"
        )
    return found[0]


def _label_csv(dataset_dir: Path, split: str) -> Path | None:
    """``<split>.csv`` (or ``.csv.gz``) in ``dataset_dir``, or None."""
    for name in (f"{split}.csv", f"{split}.csv.gz"):
        if (dataset_dir / name).is_file():
            return dataset_dir / name
    return None


def load(
    root: str | os.PathLike,
    *,
    splits: Sequence[str] = SPLITS,
    frontal_only: bool = True,
    check_files: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Read a CheXpert download into a manifest (columns of :mod:`ssl_ptx.data.manifest`).

    Args:
        root: the folder that holds ``CheXpert-v1.0-small`` (or ``CheXpert-v1.0``), or that
            dataset folder itself (see :func:`find_dataset_dir`).
        splits: which label files to read (``train`` → ``train.csv``, ``valid`` → ``valid.csv``).
        frontal_only: keep frontal images only.
        check_files: check that every listed image exists. Missing ones are logged (a warning
            with the count and examples), listed in ``df.attrs["missing"]`` (image ids, file
            order) and dropped. With False, nothing is checked and ``attrs["missing"]`` is empty.
        progress: show a progress bar while files are checked.

    Returns:
        The validated manifest, one row per image, splits in the order given: ``source``
        ``"chexpert"``, ``path`` absolute, ``label`` the Pneumothorax value (1, 0, -1, NaN),
        ``view``, ``patient_id`` as in :func:`read_labels`; ``fold`` -1, ``rle`` and
        ``mask_path`` NaN, ``height`` / ``width`` 0 (unknown until the image is read),
        ``mask_area`` -1. Extra columns ``split``, ``sex``, ``age``, ``frontal_lateral``,
        ``ap_pa``, ``study_id``. ``df.attrs["label_csvs"]``: the label files read;
        ``df.attrs["dataset_dir"]``: the dataset folder.

    Raises:
        FileNotFoundError: no dataset folder, or no label file for a requested split.
        ValueError: a bad label file (see :func:`read_labels`), an unknown split, or an image
            listed twice.
    """
    dataset_dir = find_dataset_dir(root)
    unknown = [split for split in splits if split not in SPLITS]
    if unknown:
        raise ValueError(f"unknown CheXpert split(s) {unknown}; choose from {list(SPLITS)}")
    tables, csv_paths = [], []
    for split in splits:
        csv_path = _label_csv(dataset_dir, split)
        if csv_path is None:
            raise FileNotFoundError(f"{dataset_dir}: no {split}.csv (or {split}.csv.gz)")
        labels = read_labels(csv_path, frontal_only=frontal_only)
        # the first component names the dataset folder; resolve the rest inside dataset_dir
        inside = labels["relative_path"].str.split("/", n=1).str[1]
        labels["path"] = [os.path.join(os.path.abspath(dataset_dir), p) for p in inside]
        tables.append(labels)
        csv_paths.append(csv_path)
    rows = pd.concat(tables, ignore_index=True)

    missing: list[str] = []
    if check_files:
        found = existing_files(rows["path"].tolist(), desc="CheXpert images", progress=progress)
        missing = rows["image_id"][~found].tolist()
        warn_count(
            logger,
            rows["relative_path"][~found].tolist(),
            "image(s) listed in %s are missing under %s; they are left out",
            " and ".join(map(str, csv_paths)),
            dataset_dir,
        )
        rows = rows[found]
    manifest = finish_manifest(
        rows.drop(columns=["relative_path", "line"]),
        source="chexpert",
        name=" + ".join(map(str, csv_paths)),
    )
    manifest.attrs["missing"] = missing
    manifest.attrs["label_csvs"] = [str(path) for path in csv_paths]
    manifest.attrs["dataset_dir"] = str(dataset_dir)
    return manifest
