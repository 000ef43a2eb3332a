"""Write a synthetic demo data root in the datasets' own published layouts.

The SIIM part mirrors the real download exactly, so the same readers run on demo and real data::

    <root>/siim/dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    <root>/siim/train-rle.csv          "ImageId, EncodedPixels", " -1" or " <rle>", one row per
                                       pneumothorax instance
    <root>/siim/ssl_ptx_demo.json      marks the folder as synthetic (the generator's arguments)

Images are synthetic chest radiographs (:mod:`ssl_ptx.data._phantom`). Pneumothorax *shapes* are
the real SIIM masks from the label file that ships with torchxrayvision, resized to the demo size
and clipped to the rendered lung fields; multi-instance images come from multi-row real images,
so instances overlap as often as in the real data. Without torchxrayvision the shapes are
parametric crescents along the lateral and apical chest wall. Some negatives carry look-alikes
(a skin fold or a chest drain). The same arguments always give byte-identical files.

Command line::

    python -m ssl_ptx.data.demo --root demo_data --n-siim 500 --size 256 --seed 0
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from pydicom import config as dicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from tqdm.auto import tqdm

from ssl_ptx.data import rle
from ssl_ptx.data._phantom import lung_masks, render_chest_xray, sample_anatomy
from ssl_ptx.fileio import atomic_path, atomic_write_bytes

__all__ = [
    "DemoSummary",
    "lung_masks",
    "main",
    "real_siim_shapes",
    "render_chest_xray",
    "sample_anatomy",
    "write_demo_root",
]

SIIM_CSV_HEADER = "ImageId, EncodedPixels"
MARKER_NAME = "ssl_ptx_demo.json"
MIN_SIZE, MAX_SIZE = 64, 1024
REAL_SIZE = 1024
REAL_CSV_NAME = "siim-pneumothorax-train-rle.csv.gz"
#: share of positive SIIM images with 2+ rows, and of those whose instances overlap (real file)
MULTI_INSTANCE_SHARE = 624 / 2669
OVERLAP_SHARE = 183 / 624
LOOKALIKE_SHARE = 0.15  # negatives with a skin fold or a chest drain
DRAIN_WITH_PNEUMOTHORAX_SHARE = 0.25  # positives that also have a drain, as in ward films
MIN_LUNG_FRACTION = 0.5  # keep a real instance if at least half of it falls in the lung fields
MAX_SHAPE_TRIES = 5000  # candidate shape sets tried per positive image before giving up


@dataclass(frozen=True)
class DemoSummary:
    """What :func:`write_demo_root` wrote.

    Attributes:
        root: the demo data root.
        csv: the SIIM ``train-rle.csv``.
        images: number of SIIM DICOM files.
        positives: images with at least one pneumothorax instance.
        rows: CSV rows (one per negative image, one per instance of a positive image).
        multi_instance_images: positive images with two or more instances.
    """

    root: Path
    csv: Path
    images: int
    positives: int
    rows: int
    multi_instance_images: int


@dataclass(frozen=True)
class _Plan:
    """The per-image decisions drawn up front, so an image depends only on the seed and index."""

    positive: bool
    multi: bool
    overlap: bool
    drain: bool
    skin_fold: bool
    view: str
    female: bool


def _min_instance_area(size: int) -> int:
    """Smallest instance kept, in pixels: ~1,000 px at 1024² (the real 2 % quantile)."""
    return max(6, round(1000 * (size / REAL_SIZE) ** 2))


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a 0/1 mask to ``size``² by area averaging, then threshold at one half."""
    if mask.shape == (size, size):
        return mask
    shrunk = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return (shrunk > 0.5).astype(np.uint8)


def _xrv_siim_csv() -> Path | None:
    """The real SIIM ``train-rle.csv`` shipped with torchxrayvision, or None if not installed."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / REAL_CSV_NAME
    return path if path.is_file() else None


def real_siim_shapes(
    csv_path: str | Path, rng: np.random.Generator, size: int, *, multi: bool
) -> Iterator[list[np.ndarray]]:
    """Endlessly yield the instance masks of real positive SIIM images, in a random order.

    Every real image is used once per pass; each new pass reshuffles, and odd passes mirror the
    masks left-right, so large demos do not repeat shapes verbatim.

    Args:
        csv_path: a SIIM stage-1 ``train-rle.csv`` (optionally gzipped): ``ImageId`` and
            `` EncodedPixels`` columns, one row per instance, ``-1`` for negatives.
        rng: decides the order.
        size: masks are resized from 1024² to ``size``² (area average, then > 0.5).
        multi: yield images with two or more rows if True, single-row images otherwise.

    Yields:
        One list per real image: its instance masks, uint8 0/1, ``size``×``size`` each, in the
        file's row order. Instances that vanish at ``size`` are dropped.

    Raises:
        ValueError: the file lacks the two columns, holds no image of the requested kind, or
            an RLE does not decode at 1024² (the message names the file and ImageId).
    """
    table = pd.read_csv(csv_path)
    table.columns = [c.strip() for c in table.columns]
    if set(table.columns) != {"ImageId", "EncodedPixels"}:
        raise ValueError(
            f"{csv_path}: expected columns ImageId, EncodedPixels; got {list(table.columns)}"
        )
    encoded = table["EncodedPixels"].astype(str).str.strip()
    positives = table[encoded != rle.EMPTY].assign(EncodedPixels=encoded[encoded != rle.EMPTY])
    groups = positives.groupby("ImageId", sort=True)["EncodedPixels"].agg(list)
    groups = groups[(groups.str.len() > 1) == multi]
    if groups.empty:
        kind = "multi-row" if multi else "single-row"
        raise ValueError(f"{csv_path}: no {kind} positive image to take shapes from")
    for epoch in itertools.count():
        for index in rng.permutation(len(groups)):
            masks = [
                _decode_real(code, csv_path, groups.index[index], size)
                for code in groups.iloc[index]
            ]
            masks = [np.fliplr(m) if epoch % 2 else m for m in masks if m.any()]
            if masks:
                yield masks


def _decode_real(code: str, csv_path: str | Path, image_id: str, size: int) -> np.ndarray:
    try:
        mask = rle.decode(code, (REAL_SIZE, REAL_SIZE))
    except ValueError as error:
        raise ValueError(f"{csv_path}: ImageId {image_id}: {error}") from None
    return _resize_mask(mask, size)


def _parametric_shapes(
    rng: np.random.Generator, size: int, *, multi: bool
) -> Iterator[list[np.ndarray]]:
    """Endless crescents along the lateral-apical chest wall (fallback without real shapes).

    Each crescent is the part of a lung-shaped ellipse not covered by a copy shifted medially and
    down; a multi-instance image splits one crescent into overlapping upper and lower parts.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    while True:
        side = rng.choice([-1.0, 1.0])
        cx, cy = 0.5 + side * rng.uniform(0.22, 0.28), rng.uniform(0.38, 0.45)
        rx, ry = rng.uniform(0.13, 0.17), rng.uniform(0.3, 0.36)
        shift_x, shift_y = -side * rng.uniform(0.02, 0.07), rng.uniform(0.02, 0.06)
        outer = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        inner = ((xx - cx - shift_x) / rx) ** 2 + ((yy - cy - shift_y) / ry) ** 2 < 1
        crescent = outer & ~inner & (yy < cy + rng.uniform(0.0, 0.2))
        if not multi:
            yield [crescent.astype(np.uint8)]
            continue
        cut = rng.uniform(0.25, 0.4)
        margin = rng.choice([-0.03, 0.03])  # > 0: the two parts overlap
        yield [
            (crescent & (yy < cut + margin)).astype(np.uint8),
            (crescent & (yy >= cut - margin)).astype(np.uint8),
        ]


def _overlaps(masks: Sequence[np.ndarray]) -> bool:
    return bool((np.sum(masks, axis=0) > 1).any())


def _snap_to_chest_wall(
    masks: Sequence[np.ndarray], left: np.ndarray, right: np.ndarray
) -> list[np.ndarray]:
    """Move a real image's instances onto this chest's wall, keeping their shapes and overlaps.

    A real mask follows its own patient's chest wall; on a synthetic chest it would float inside
    the lung or spill out of it. Instances are grouped by hemithorax; each group is moved down
    if it starts above the apex, then every row is shifted sideways (smoothly from row to row)
    so that the group's lateral edge lies one pixel past the lung's lateral edge. Row widths,
    the vertical extent and the instances' relative positions are kept.

    Args:
        masks: instance masks, uint8 0/1, H×W.
        left, right: the image-left and image-right lung masks, uint8 0/1, H×W.

    Returns:
        The moved masks, same order, uint8 0/1, H×W (pixels pushed out of the frame are lost).
    """
    size = left.shape[0]
    midline = 0.5 * (
        np.flatnonzero(left.any(axis=0)).max() + np.flatnonzero(right.any(axis=0)).min()
    )
    on_left = [np.nonzero(m)[1].mean() < midline for m in masks]
    moved = [np.zeros_like(m) for m in masks]
    for side_is_left, lung in ((True, left), (False, right)):
        group = [i for i, flag in enumerate(on_left) if flag == side_is_left]
        if not group:
            continue
        union = np.bitwise_or.reduce([masks[i] for i in group]).astype(bool)
        rows_with_lung = np.flatnonzero(lung.any(axis=1))
        mask_rows = np.flatnonzero(union.any(axis=1))
        down = int(np.clip(rows_with_lung[0] + 1 - mask_rows[0], 0, round(0.06 * size)))
        columns = np.arange(size)
        if side_is_left:
            wall = np.where(lung, columns, size).min(axis=1) - 1
            edge = np.where(union, columns, size).min(axis=1)
        else:
            wall = np.where(lung, columns, -1).max(axis=1) + 1
            edge = np.where(union, columns, -1).max(axis=1)
        target_rows = np.clip(mask_rows + down, rows_with_lung[0], rows_with_lung[-1])
        per_row = wall[target_rows] - edge[mask_rows]
        sigma = max(1.0, 0.015 * size)
        per_row = cv2.GaussianBlur(per_row.astype(np.float32)[:, None], (1, 0), sigma)[:, 0]
        shift = np.zeros(size, np.int64)
        shift[mask_rows] = np.round(per_row).astype(np.int64)
        for i in group:
            ys, xs = np.nonzero(masks[i])
            ys2, xs2 = ys + down, xs + shift[ys]
            keep = (ys2 < size) & (xs2 >= 0) & (xs2 < size)
            moved[i][ys2[keep], xs2[keep]] = 1
    return moved


def _fit_to_lungs(
    candidates: Iterator[list[np.ndarray]],
    left: np.ndarray,
    right: np.ndarray,
    plan: _Plan,
    size: int,
) -> list[np.ndarray]:
    """Take candidate shape sets until one fits the lung fields and the plan; clip it to them.

    Each set is first moved against the chest wall (:func:`_snap_to_chest_wall`). An instance
    is kept when at least :data:`MIN_LUNG_FRACTION` of it lies inside the lungs and its clipped
    area reaches :func:`_min_instance_area`. A set fits when its surviving instance count
    (1, or 2+) and whether they overlap match the plan.
    """
    lungs = left | right
    min_area = _min_instance_area(size)
    for masks in itertools.islice(candidates, MAX_SHAPE_TRIES):
        clipped = []
        for mask in _snap_to_chest_wall(masks, left, right):
            inside = mask & lungs
            area = int(inside.sum())
            if area >= min_area and area >= MIN_LUNG_FRACTION * int(mask.sum()):
                clipped.append(inside)
        if not clipped or (len(clipped) > 1) != plan.multi:
            continue
        if plan.multi and _overlaps(clipped) != plan.overlap:
            continue
        return clipped
    kind = "overlapping " if plan.overlap else "several " if plan.multi else "single "
    raise RuntimeError(
        f"no {kind}pneumothorax shape fitted the lung fields in {MAX_SHAPE_TRIES} tries at {size}²"
    )


def _plans(rng: np.random.Generator, n_images: int, positive_fraction: float) -> list[_Plan]:
    """Draw the label, instance count, look-alikes and patient attributes of every image."""
    n_pos = round(n_images * positive_fraction)
    n_multi = min(n_pos // 2, max(1, round(n_pos * MULTI_INSTANCE_SHARE))) if n_pos >= 2 else 0
    n_overlap = max(1, round(n_multi * OVERLAP_SHARE)) if n_multi else 0
    order = rng.permutation(n_images)
    positive, multi, overlap = (
        np.isin(np.arange(n_images), order[:n]) for n in (n_pos, n_multi, n_overlap)
    )
    lookalike = rng.random(n_images) < LOOKALIKE_SHARE
    drain_with_ptx = rng.random(n_images) < DRAIN_WITH_PNEUMOTHORAX_SHARE
    drain_not_fold = rng.random(n_images) < 0.5
    views = np.where(rng.random(n_images) < 0.6, "PA", "AP")
    female = rng.random(n_images) < 0.45
    return [
        _Plan(
            positive=bool(positive[i]),
            multi=bool(multi[i]),
            overlap=bool(overlap[i]),
            drain=bool(drain_with_ptx[i] if positive[i] else lookalike[i] and drain_not_fold[i]),
            skin_fold=bool(not positive[i] and lookalike[i] and not drain_not_fold[i]),
            view=str(views[i]),
            female=bool(female[i]),
        )
        for i in range(n_images)
    ]


def _uid(seed: int, index: int, kind: str) -> str:
    """A deterministic DICOM UID for image ``index`` of a demo written with ``seed``."""
    return generate_uid(entropy_srcs=["ssl_ptx demo siim", str(seed), str(index), kind])


def _dicom_dataset(
    pixels: np.ndarray, *, seed: int, index: int, plan: _Plan, rng: np.random.Generator
) -> FileDataset:
    """A SIIM-like DICOM: 8-bit MONOCHROME2 CR, secondary capture, SIIM's tags and conventions."""
    size = pixels.shape[0]
    sop_uid = _uid(seed, index, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    patient = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {plan.view}"
    ds.PatientName = patient
    ds.PatientID = patient
    ds.PatientBirthDate = ""
    ds.PatientSex = "F" if plan.female else "M"
    # SIIM writes the age as a bare number ("38"), which is not a valid AS value: keep it so
    # readers are tested against the real convention, and skip pydicom's validation warning.
    age = str(int(rng.integers(18, 90)))
    ds.add(DataElement(0x00101010, "AS", age, validation_mode=dicom_config.IGNORE))
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = plan.view
    ds.StudyInstanceUID = _uid(seed, index, "study")
    ds.SeriesInstanceUID = _uid(seed, index, "series")
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    spacing = round(0.143 * REAL_SIZE / size, 6)
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.add_new(0x7FE00010, "OB", np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return ds


def _claim_siim_folder(siim: Path, marker: dict) -> None:
    """Make ``siim`` an empty demo folder, refusing to touch a folder that is not a demo.

    A previous demo (recognised by its marker file) is removed first, so no stale image survives
    an overwrite. The marker is written before any image, so an interrupted write can be redone.
    """
    if siim.exists() and any(siim.iterdir()):
        if not (siim / MARKER_NAME).is_file():
            raise FileExistsError(
                f"{siim} exists and is not a demo folder (no {MARKER_NAME}); "
                "refusing to overwrite what may be a real SIIM download"
            )
        shutil.rmtree(siim)
    siim.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(siim / MARKER_NAME, (json.dumps(marker, indent=2) + "\n").encode())


def _check_arguments(n_siim: int, size: int, positive_fraction: float) -> None:
    if n_siim < 1:
        raise ValueError(f"n_siim must be at least 1, got {n_siim}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")


def write_demo_root(
    root: str | Path,
    *,
    n_siim: int = 500,
    size: int = 256,
    seed: int = 0,
    positive_fraction: float = 0.22,
    progress: bool = True,
) -> DemoSummary:
    """Write (or deterministically overwrite) the SIIM part of a demo data root.

    Args:
        root: the demo data root; the SIIM files go to ``root/siim`` in SIIM's own layout.
        n_siim: number of SIIM images.
        size: image height = width in pixels, 64 to 1024 (the real data is 1024).
        seed: everything (anatomy, shapes, exposure, UIDs, patient tags) follows from it; the
            same arguments give byte-identical files.
        positive_fraction: share of images with a pneumothorax (the real data: 0.222).
        progress: show a tqdm progress bar.

    Returns:
        The counts and paths of what was written.

    Raises:
        ValueError: an argument is out of range.
        FileExistsError: ``root/siim`` holds something that is not a previous demo.
    """
    _check_arguments(n_siim, size, positive_fraction)
    root = Path(root)
    siim = root / "siim"
    real_csv = _xrv_siim_csv()
    _claim_siim_folder(
        siim,
        {
            "generator": "ssl_ptx.data.demo",
            "n_siim": n_siim,
            "size": size,
            "seed": seed,
            "positive_fraction": positive_fraction,
            "shapes": "parametric" if real_csv is None else f"real SIIM masks ({REAL_CSV_NAME})",
        },
    )
    streams = np.random.SeedSequence([seed, 0x5113]).spawn(4)
    plans = _plans(np.random.default_rng(streams[0]), n_siim, positive_fraction)
    shape_rng = [np.random.default_rng(s) for s in streams[1].spawn(3)]
    if real_csv is None:
        single = _parametric_shapes(shape_rng[0], size, multi=False)
        multi_sets = _parametric_shapes(shape_rng[1], size, multi=True)
        multi_overlap = multi_sets
    else:
        single = real_siim_shapes(real_csv, shape_rng[0], size, multi=False)
        multi_sets = real_siim_shapes(real_csv, shape_rng[1], size, multi=True)
        multi_overlap = real_siim_shapes(real_csv, shape_rng[2], size, multi=True)
    image_seeds = streams[2].spawn(n_siim)

    rows: list[str] = []
    positives = multi_count = 0
    for index, plan in enumerate(tqdm(plans, desc="demo SIIM", disable=not progress, unit="img")):
        rng = np.random.default_rng(image_seeds[index])
        anatomy = sample_anatomy(rng, view=plan.view, female=plan.female)
        instances: list[np.ndarray] = []
        if plan.positive:
            left, right = lung_masks(anatomy, size)
            source = multi_overlap if plan.overlap else multi_sets if plan.multi else single
            instances = _fit_to_lungs(source, left, right, plan, size)
        union = np.bitwise_or.reduce(instances) if instances else None
        pixels = render_chest_xray(
            rng,
            size,
            anatomy=anatomy,
            pneumothorax=union,
            drain=plan.drain,
            skin_fold=plan.skin_fold,
        )
        ds = _dicom_dataset(pixels, seed=seed, index=index, plan=plan, rng=rng)
        path = (
            siim
            / "dicom-images-train"
            / ds.StudyInstanceUID
            / ds.SeriesInstanceUID
            / f"{ds.SOPInstanceUID}.dcm"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        codes = [rle.encode(m) for m in instances] or [rle.EMPTY]
        rows.extend(f"{ds.SOPInstanceUID}, {code}" for code in codes)
        positives += bool(instances)
        multi_count += len(instances) > 1

    csv_path = siim / "train-rle.csv"
    atomic_write_bytes(csv_path, ("\n".join([SIIM_CSV_HEADER, *rows]) + "\n").encode())
    return DemoSummary(
        root=root,
        csv=csv_path,
        images=n_siim,
        positives=positives,
        rows=len(rows),
        multi_instance_images=multi_count,
    )


def main(argv: Sequence[str] | None = None) -> DemoSummary:
    """Command line: write a demo data root and print what was written."""
    parser = argparse.ArgumentParser(
        prog="python -m ssl_ptx.data.demo",
        description="Write a synthetic demo data root in SIIM's own layout "
        "(DICOM tree + train-rle.csv) so every recipe can run without the real data.",
    )
    parser.add_argument(
        "--root", type=Path, required=True, help="demo data root to write (siim/ goes inside)"
    )
    parser.add_argument(
        "--n-siim", type=int, default=500, help="number of SIIM images (default: 500)"
    )
    parser.add_argument(
        "--size",
        type=int,
        default=256,
        help=f"image size in pixels, {MIN_SIZE}-{MAX_SIZE} (default: 256)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; same seed, same bytes (default: 0)"
    )
    parser.add_argument(
        "--positive-fraction",
        type=float,
        default=0.22,
        help="share of images with a pneumothorax (default: 0.22)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        summary = write_demo_root(
            args.root,
            n_siim=args.n_siim,
            size=args.size,
            seed=args.seed,
            positive_fraction=args.positive_fraction,
            progress=not args.no_progress,
        )
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    print(
        f"wrote {summary.images} SIIM images ({summary.positives} with pneumothorax, "
        f"{summary.multi_instance_images} with several instances; {summary.rows} CSV rows) "
        f"at {args.size}² to {summary.root / 'siim'} in {time.perf_counter() - started:.1f} s\n"
        f"labels: {summary.csv}"
    )
    return summary


if __name__ == "__main__":
    main()
