"""Read a SIIM-ACR Pneumothorax download, as published, into a manifest.

Layout (see ``docs/data.md``)::

    <root>/dicom-images-train/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm   (stage 1)
    <root>/train-rle.csv       header "ImageId, EncodedPixels", one row per instance
    <root>/stage_2_images/<SOPInstanceUID>.dcm and <root>/stage_2_train.csv  (stage 2)

``ImageId`` is the DICOM file stem. ``-1`` marks an image without pneumothorax; a positive image
has one row per instance and its target is the union of the instances.

Command line::

    python -m ssl_ptx.data.siim ROOT --out manifest.csv [--folds 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ssl_ptx.data import rle
from ssl_ptx.data.dicom import read_dicom_metadata
from ssl_ptx.data.manifest import MANIFEST_COLUMNS, validate_manifest
from ssl_ptx.fileio import atomic_path

__all__ = [
    "LABEL_CSV_NAMES",
    "find_dicoms",
    "find_label_csv",
    "load_siim",
    "main",
    "make_folds",
    "read_rle_csv",
]

logger = logging.getLogger(__name__)

#: label files recognised under a SIIM root (stage 2 first), optionally gzipped
LABEL_CSV_NAMES: tuple[str, ...] = ("stage_2_train.csv", "train-rle.csv")
_ID_COLUMN, _RLE_COLUMN = "ImageId", "EncodedPixels"
_FIRST_DATA_LINE = 2  # line 1 of the file is the header
_N_EXAMPLES = 5


def read_rle_csv(
    csv_path: str | os.PathLike, shape: tuple[int, int] = (1024, 1024)
) -> pd.DataFrame:
    """Read a SIIM label file (one row per instance) into one row per image.

    Both published headers are accepted: stage 1 ``ImageId, EncodedPixels`` (values may carry
    a leading space, ``" -1"``) and stage 2 ``ImageId,EncodedPixels``; ``.gz`` is read too.
    Names and values are stripped, blank lines skipped, and several ``-1`` rows of one image
    count as one.

    Args:
        csv_path: the CSV file.
        shape: ``(height, width)`` at which multi-instance images are merged. The union is a
            union of flat pixel indices, so any shape that holds every run gives the same
            string; the SIIM images are 1024². Single rows are not decoded, so a run past
            the image is caught later, against the image's own size (:func:`load_siim`).

    Returns:
        DataFrame in the order of first appearance, one row per image, columns ``image_id``
        (str), ``rle`` (str: the row as written for one instance, ``rle.encode`` of the union
        of the instances for several, ``"-1"`` when empty), ``n_instances`` (int64, 0 when
        empty), ``label`` (int64, 1 positive / 0 empty) and ``mask_area`` (int64, foreground
        pixels of the union).

    Raises:
        FileNotFoundError: ``csv_path`` does not exist.
        ValueError: naming the file and its 1-based line: a missing column, an empty
            ``ImageId`` or ``EncodedPixels``, a malformed RLE, instances that do not fit
            ``shape``, or an image with both a ``-1`` row and an RLE row (both lines are named:
            the file contradicts itself and no rule can tell which row is right).
    """
    csv_path = Path(csv_path)
    table = _read_label_table(csv_path)
    ids, codes, lines = table[_ID_COLUMN], table[_RLE_COLUMN], table["line"]
    positive = (codes != rle.EMPTY).to_numpy()
    row_area = np.zeros(len(table), np.int64)
    for row in np.flatnonzero(positive):
        try:
            row_area[row] = rle.area(codes.iat[row])
        except ValueError as error:
            raise ValueError(
                f"{csv_path}, line {lines.iat[row]}: malformed EncodedPixels of "
                f"{ids.iat[row]}: {error}"
            ) from None
    _check_empty_or_positive(csv_path, ids, positive, lines)

    grouped = pd.DataFrame({"positive": positive, "area": row_area}).groupby(
        ids.to_numpy(), sort=False
    )
    first_rows = np.flatnonzero(~ids.duplicated().to_numpy())
    n_instances = grouped["positive"].sum().to_numpy(np.int64)
    result = pd.DataFrame(
        {
            "image_id": ids.iloc[first_rows].to_numpy(),
            "rle": codes.iloc[first_rows].to_numpy(),
            "n_instances": n_instances,
            "label": (n_instances > 0).astype(np.int64),
            "mask_area": grouped["area"].sum().to_numpy(np.int64),
        }
    )
    rows_of_image = grouped.indices
    for index in np.flatnonzero(n_instances > 1):
        image_id = result.at[index, "image_id"]
        rows = rows_of_image[image_id]
        try:
            union = rle.decode_union(codes.iloc[rows], shape)
        except ValueError as error:
            raise ValueError(
                f"{csv_path}, lines {', '.join(map(str, lines.iloc[rows]))}: the instances of "
                f"{image_id} do not fit a {shape[0]}×{shape[1]} image: {error}"
            ) from None
        result.at[index, "rle"] = rle.encode(union)
        result.at[index, "mask_area"] = np.count_nonzero(union)
    return result


def _read_label_table(csv_path: Path) -> pd.DataFrame:
    """The label file's two columns, stripped, with each row's 1-based file line."""
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except FileNotFoundError:
        raise
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as error:
        raise ValueError(f"{csv_path}: cannot be read as a CSV file: {error}") from None
    table.columns = [str(name).strip() for name in table.columns]
    missing = [name for name in (_ID_COLUMN, _RLE_COLUMN) if name not in table.columns]
    if missing:
        raise ValueError(
            f"{csv_path}, line 1: missing column(s) {missing}; the header has "
            f"{list(table.columns)} (expected 'ImageId, EncodedPixels')"
        )
    table = pd.DataFrame(
        {
            _ID_COLUMN: table[_ID_COLUMN].str.strip(),
            _RLE_COLUMN: table[_RLE_COLUMN].str.strip(),
            "line": np.arange(len(table)) + _FIRST_DATA_LINE,
        }
    )
    blank_line = (table[_ID_COLUMN] == "") & (table[_RLE_COLUMN] == "")
    table = table[~blank_line].reset_index(drop=True)
    for column, hint in ((_ID_COLUMN, ""), (_RLE_COLUMN, " (an empty mask is written -1)")):
        empty = np.flatnonzero((table[column] == "").to_numpy())
        if empty.size:
            raise ValueError(
                f"{csv_path}, line {table['line'].iat[empty[0]]}: empty {column}{hint}"
            )
    return table


def _check_empty_or_positive(
    csv_path: Path, ids: pd.Series, positive: np.ndarray, lines: pd.Series
) -> None:
    """Raise if an image has both a ``-1`` row and an RLE row, naming both lines."""
    contradicted = ids.isin(set(ids[positive])).to_numpy() & ~positive
    if not contradicted.any():
        return
    empty_row = int(np.flatnonzero(contradicted)[0])
    image_id = ids.iat[empty_row]
    rle_row = int(np.flatnonzero(ids.isin([image_id]).to_numpy() & positive)[0])
    raise ValueError(
        f"{csv_path}: {image_id} is marked empty ('-1', line {lines.iat[empty_row]}) and has "
        f"an RLE (line {lines.iat[rle_row]}); an image is either empty or has instances"
    )


def find_label_csv(root: str | os.PathLike) -> Path:
    """Find the SIIM label file under ``root``: one of :data:`LABEL_CSV_NAMES` (or ``.gz``).

    ``root`` itself is looked at first, then its subfolders (hidden ones skipped).

    Raises:
        FileNotFoundError: none found.
        ValueError: several found at the same depth (pass the one you mean as ``csv``).
    """
    root = Path(root)
    names = {name + suffix for name in LABEL_CSV_NAMES for suffix in ("", ".gz")}
    found = sorted(root / name for name in names if (root / name).is_file())
    if not found:
        for directory, subdirectories, files in os.walk(root, followlinks=True):
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            found.extend(Path(directory, name) for name in sorted(names.intersection(files)))
    if not found:
        raise FileNotFoundError(
            f"{root}: no SIIM label file ({', '.join(LABEL_CSV_NAMES)}, optionally .gz) in it "
            "or its subfolders; pass csv= (--csv) to name it"
        )
    if len(found) > 1:
        raise ValueError(
            f"{root}: several SIIM label files: {', '.join(map(str, found))}; "
            "pass csv= (--csv) to choose one"
        )
    return found[0]


def find_dicoms(root: str | os.PathLike) -> dict[str, Path]:
    """Map image id (the file stem) → path for every ``*.dcm`` under ``root``, recursively.

    The suffix is matched case-insensitively; hidden files and folders (``.name``, e.g. macOS
    ``._*`` copies) are skipped; symbolic links to folders are followed.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        ValueError: two files share a stem (both paths are named).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    found: dict[str, Path] = {}
    for directory, subdirectories, files in os.walk(root, followlinks=True):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(".dcm"):
                continue
            path = Path(directory, name)
            if path.stem in found:
                raise ValueError(
                    f"two DICOM files have the image id {path.stem!r}: {found[path.stem]} "
                    f"and {path}"
                )
            found[path.stem] = path
    return found


def make_folds(
    labels_or_areas: Sequence[float] | np.ndarray,
    n_folds: int = 5,
    seed: int = 0,
    n_area_bins: int = 4,
) -> np.ndarray:
    """Cross-validation folds stratified by pneumothorax area.

    Strata: 0 = empty (value 0); positives are split into ``n_area_bins`` bins at the area
    quantiles (0/1 labels give one positive bin). Each stratum is shuffled with ``seed``; the
    strata are then chained (positive bins from small to large, then the empty one) and dealt
    round-robin, the deal continuing from one stratum to the next. So every stratum is spread
    over the folds within one image, and fold sizes differ by at most one.

    Args:
        labels_or_areas: one value per image: the mask area in pixels (or a 0/1 label);
            NaN = unlabelled.
        n_folds: number of folds, at least 2.
        seed: the shuffle's seed; the same input and seed always give the same folds.
        n_area_bins: number of area bins of the positives, at least 1.

    Returns:
        int64 array, the fold (0 .. n_folds - 1) of each image; -1 for NaN entries.

    Raises:
        ValueError: bad ``n_folds`` / ``n_area_bins``, a negative value, or not 1-D.
    """
    values = np.asarray(labels_or_areas, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"make_folds expects one value per image, got shape {values.shape}")
    if n_folds < 2 or n_area_bins < 1:
        raise ValueError(f"need n_folds >= 2 and n_area_bins >= 1, got {n_folds}, {n_area_bins}")
    known = ~np.isnan(values)
    if (values[known] < 0).any():
        raise ValueError(f"negative area at index {int(np.flatnonzero(values < 0)[0])}")
    strata = np.full(values.shape, -1, np.int64)
    strata[known & (values == 0)] = 0
    positive = known & (values > 0)
    if positive.any():
        quantiles = np.linspace(0.0, 1.0, n_area_bins + 1)[1:-1]
        edges = np.quantile(values[positive], quantiles)
        strata[positive] = 1 + np.searchsorted(edges, values[positive], side="right")
    rng = np.random.default_rng(seed)
    order = [1 + b for b in range(n_area_bins)] + [0]
    dealt = np.concatenate(
        [rng.permutation(np.flatnonzero(strata == stratum)) for stratum in order]
    )
    folds = np.full(values.shape, -1, np.int64)
    folds[dealt] = np.arange(dealt.size) % n_folds
    return folds


def load_siim(
    root: str | os.PathLike,
    *,
    csv: str | os.PathLike | None = None,
    n_folds: int = 5,
    seed: int = 0,
    shape: tuple[int, int] = (1024, 1024),
    keep_unlabelled: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Read a SIIM root into a manifest (columns of :mod:`ssl_ptx.data.manifest`).

    Rows of the label file without a DICOM, and DICOMs without a row, are not fatal: they are
    logged (a warning with the count and up to five ids) and listed in
    ``df.attrs["missing_dicom"]`` and ``df.attrs["unlabelled_dicom"]`` (sorted).

    Args:
        root: the SIIM folder (DICOMs anywhere below it).
        csv: the label file; found under ``root`` with :func:`find_label_csv` when None.
        n_folds, seed: folds by :func:`make_folds` over EVERY image of the label file, so an
            image keeps its fold whichever DICOMs are present.
        shape: the size at which multi-instance images are merged (:func:`read_rle_csv`).
        keep_unlabelled: keep DICOMs without a row (label NaN, rle NaN, fold -1,
            mask_area -1, n_instances -1) instead of dropping them.
        progress: show a progress bar while the DICOM headers are read.

    Returns:
        The validated manifest, label-file order then unlabelled ids sorted: ``source`` is
        ``"siim"``, ``label`` 1.0 / 0.0, ``rle`` the union, ``view`` / ``patient_id`` /
        ``height`` / ``width`` from the DICOM header, ``mask_area`` the union's pixels at the
        DICOM's size; plus the extra column ``n_instances``.

    Raises:
        FileNotFoundError: ``root`` or ``csv`` does not exist, or no label file is found.
        ValueError: a bad label file (see :func:`read_rle_csv`), duplicate DICOM ids, or an
            RLE whose runs end past its DICOM's pixels.
        DicomError: a DICOM header cannot be read.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: SIIM root is not a directory")
    csv_path = Path(csv) if csv is not None else find_label_csv(root)
    labels = read_rle_csv(csv_path, shape=shape)
    labels["fold"] = make_folds(labels["mask_area"].to_numpy(), n_folds=n_folds, seed=seed)
    dicoms = find_dicoms(root)

    has_dicom = labels["image_id"].isin(list(dicoms)).to_numpy()
    missing = sorted(labels["image_id"][~has_dicom])
    unlabelled = sorted(set(dicoms) - set(labels["image_id"]))
    if missing:
        logger.warning(
            "%d image(s) of %s have no DICOM under %s (e.g. %s); they are left out",
            len(missing),
            csv_path,
            root,
            ", ".join(missing[:_N_EXAMPLES]),
        )
    if unlabelled:
        logger.warning(
            "%d DICOM(s) under %s have no row in %s (e.g. %s); %s",
            len(unlabelled),
            root,
            csv_path,
            ", ".join(unlabelled[:_N_EXAMPLES]),
            "kept as unlabelled" if keep_unlabelled else "dropped (keep_unlabelled keeps them)",
        )

    rows = labels[has_dicom].assign(label=lambda t: t["label"].astype(np.float64))
    if keep_unlabelled and unlabelled:
        extra = pd.DataFrame(
            {
                "image_id": unlabelled,
                "rle": np.nan,
                "n_instances": -1,
                "label": np.nan,
                "mask_area": -1,
                "fold": -1,
            }
        )
        rows = pd.concat([rows, extra], ignore_index=True)
    rows = rows.reset_index(drop=True)
    rows["path"] = [os.path.abspath(dicoms[image_id]) for image_id in rows["image_id"]]
    _add_header_columns(rows, progress)
    _check_rles_fit(rows, csv_path)
    rows["source"] = "siim"
    rows["mask_path"] = pd.Series(np.nan, index=rows.index, dtype=object)
    manifest = validate_manifest(
        rows.astype({c: t for c, t in MANIFEST_COLUMNS.items() if t != "object"}),
        name=str(csv_path),
    )
    manifest.attrs["missing_dicom"] = missing
    manifest.attrs["unlabelled_dicom"] = unlabelled
    return manifest


def _add_header_columns(rows: pd.DataFrame, progress: bool) -> None:
    """Fill ``view``, ``patient_id``, ``height``, ``width`` from each DICOM header, in place."""
    headers = [
        read_dicom_metadata(path)
        for path in tqdm(rows["path"], desc="SIIM DICOM headers", unit="file", disable=not progress)
    ]
    rows["view"] = [header["ViewPosition"] for header in headers]
    rows["patient_id"] = [header["PatientID"] for header in headers]
    rows["height"] = [header["Rows"] or 0 for header in headers]
    rows["width"] = [header["Columns"] or 0 for header in headers]


def _check_rles_fit(rows: pd.DataFrame, csv_path: Path) -> None:
    """Raise if a positive row's runs end past its DICOM's pixels.

    The last run of an RLE ends at the sum of all its tokens (absolute first start, then
    gaps and lengths), so no decoding is needed.
    """
    positive = (rows["label"] == 1).to_numpy() & (rows["height"] * rows["width"] > 0).to_numpy()
    for index in np.flatnonzero(positive):
        code = rows.at[index, "rle"]
        n_pixels = int(rows.at[index, "height"]) * int(rows.at[index, "width"])
        end = sum(map(int, code.split()))
        if end > n_pixels:
            raise ValueError(
                f"{csv_path}: the RLE of {rows.at[index, 'image_id']} ends at pixel {end}, past "
                f"its {rows.at[index, 'height']}×{rows.at[index, 'width']} DICOM "
                f"({rows.at[index, 'path']})"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: read a SIIM root and write its manifest CSV atomically."""
    parser = argparse.ArgumentParser(
        prog="python -m ssl_ptx.data.siim",
        description="Read a SIIM-ACR root (DICOM tree + train-rle.csv or stage_2_train.csv) "
        "into a manifest CSV with stratified folds.",
    )
    parser.add_argument("root", type=Path, help="the SIIM folder")
    parser.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
    parser.add_argument("--csv", type=Path, default=None, help="label file (default: found)")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="fold shuffle seed (default: 0)")
    parser.add_argument(
        "--keep-unlabelled", action="store_true", help="keep DICOMs that have no label row"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = load_siim(
        args.root,
        csv=args.csv,
        n_folds=args.folds,
        seed=args.seed,
        keep_unlabelled=args.keep_unlabelled,
        progress=not args.no_progress,
    )
    with atomic_path(args.out) as tmp:
        manifest.to_csv(tmp, index=False)
    labelled = manifest[manifest["label"].notna()]
    per_fold = labelled.groupby("fold")["label"].agg(["size", "mean"])
    print(
        f"wrote {len(manifest)} images to {args.out}: {int(labelled['label'].sum())} positive "
        f"of {len(labelled)} labelled ({labelled['label'].mean():.1%}), "
        f"{len(manifest) - len(labelled)} unlabelled kept; "
        f"{len(manifest.attrs['missing_dicom'])} label rows without DICOM, "
        f"{len(manifest.attrs['unlabelled_dicom'])} DICOMs without label row"
    )
    for fold, (size, rate) in per_fold.iterrows():
        print(f"  fold {fold}: {int(size)} images, {rate:.1%} positive")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
