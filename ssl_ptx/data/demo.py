"""Write a synthetic demo data root in the datasets' own published layouts.

Every part mirrors its real download, so the same readers run on demo and real data::

    <root>/siim/dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    <root>/siim/train-rle.csv           "ImageId, EncodedPixels", " -1" or " <rle>", one row per
                                        pneumothorax instance
    <root>/chexpert/CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyN/viewN_{frontal,lateral}.jpg
    <root>/chexpert/CheXpert-v1.0-small/{train,valid}.csv
    <root>/nih/images_00N/images/NNNNNNNN_NNN.png, Data_Entry_2017.csv, BBox_List_2017.csv
    <root>/montgomery/MontgomerySet/{CXR_png,ManualMask/leftMask,ManualMask/rightMask}/*.png
    <root>/<part>/ssl_ptx_demo.json     marks each folder as synthetic (the generator's arguments)
    <root>/_truth/{chexpert,nih}/<image_id>.png, labels.csv
                                        true masks and labels of the external images (outside
                                        every published layout; the readers ignore it)

Images are synthetic chest radiographs (:mod:`ssl_ptx.data._phantom`). Pneumothorax *shapes* are
the real SIIM masks from the label file that ships with torchxrayvision, resized to the demo size
and clipped to the rendered lung fields; multi-instance images come from multi-row real images,
so instances overlap as often as in the real data. Without torchxrayvision the shapes are
parametric crescents along the lateral and apical chest wall. Some negatives carry look-alikes
(a skin fold or a chest drain). The external labels follow the real files' frequencies and are
noisy the way the real ones are (:mod:`ssl_ptx.data._demo_chexpert`, ``_demo_nih``,
``_demo_montgomery``). Each part draws from its own seed stream, so adding or resizing one part
leaves the others' bytes unchanged, and the same arguments always give byte-identical files.

Command line::

    python -m ssl_ptx.data.demo --root demo_data --n-siim 500 --n-chexpert 300 --n-nih 300 \
        --n-montgomery 40 --size 256 --seed 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import config as dicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from tqdm.auto import tqdm

from ssl_ptx.data import rle
from ssl_ptx.data._demo_chexpert import write_chexpert
from ssl_ptx.data._demo_external import ExternalSummary, TruthRecorder
from ssl_ptx.data._demo_findings import (
    DRAIN_WITH_PNEUMOTHORAX_SHARE,
    LOOKALIKE_SHARE,
    MULTI_INSTANCE_SHARE,
    OVERLAP_SHARE,
    REAL_CSV_NAME,
    REAL_SIZE,
    PneumothoraxShapes,
    real_siim_shapes,
    xrv_siim_csv,
)
from ssl_ptx.data._demo_montgomery import write_montgomery
from ssl_ptx.data._demo_nih import write_nih
from ssl_ptx.data._phantom import lung_masks, render_chest_xray, sample_anatomy
from ssl_ptx.fileio import atomic_path, atomic_write_bytes

__all__ = [
    "DemoSummary",
    "ExternalSummary",
    "lung_masks",
    "main",
    "real_siim_shapes",
    "render_chest_xray",
    "sample_anatomy",
    "write_demo_root",
]

SIIM_CSV_HEADER = "ImageId, EncodedPixels"
GENERATOR = "ssl_ptx.data.demo"
MARKER_NAME = "ssl_ptx_demo.json"
MIN_SIZE, MAX_SIZE = 64, 1024
#: each part's folder name inside the root, and the entropy tag of its seed stream
SEED_TAGS = {"siim": 0x5113, "chexpert": 0xC4E9, "nih": 0x0714, "montgomery": 0x3C0D}
TRUTH_FOLDER = "_truth"


@dataclass(frozen=True)
class DemoSummary:
    """What :func:`write_demo_root` wrote.

    Attributes:
        root: the demo data root.
        csv: the SIIM ``train-rle.csv``.
        images: number of SIIM DICOM files.
        positives: SIIM images with at least one pneumothorax instance.
        rows: SIIM CSV rows (one per negative image, one per instance of a positive image).
        multi_instance_images: positive SIIM images with two or more instances.
        chexpert, nih, montgomery: what each external part wrote (None when disabled).
        truth_csv: ``_truth/labels.csv`` (None when neither CheXpert nor NIH was written).
    """

    root: Path
    csv: Path
    images: int
    positives: int
    rows: int
    multi_instance_images: int
    chexpert: ExternalSummary | None = None
    nih: ExternalSummary | None = None
    montgomery: ExternalSummary | None = None
    truth_csv: Path | None = None


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


def _write_siim(
    siim: Path,
    *,
    n_images: int,
    size: int,
    seed: int,
    positive_fraction: float,
    real_csv: Path | None,
    progress: bool,
) -> tuple[Path, int, int, int]:
    """Write the SIIM DICOM tree and ``train-rle.csv`` into the (claimed, empty) ``siim`` folder.

    Returns:
        ``(csv path, positive images, CSV rows, multi-instance images)``.
    """
    streams = np.random.SeedSequence([seed, SEED_TAGS["siim"]]).spawn(4)
    plans = _plans(np.random.default_rng(streams[0]), n_images, positive_fraction)
    shapes = PneumothoraxShapes(streams[1], size, real_csv)
    image_seeds = streams[2].spawn(n_images)

    rows: list[str] = []
    positives = multi_count = 0
    for index, plan in enumerate(tqdm(plans, desc="demo SIIM", disable=not progress, unit="img")):
        rng = np.random.default_rng(image_seeds[index])
        anatomy = sample_anatomy(rng, view=plan.view, female=plan.female)
        instances: list[np.ndarray] = []
        if plan.positive:
            left, right = lung_masks(anatomy, size)
            instances = shapes.fit(left, right, multi=plan.multi, overlap=plan.overlap)
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
    return csv_path, positives, len(rows), multi_count


def _is_foreign(folder: Path) -> bool:
    """True when ``folder`` holds something and is not a demo folder (no marker file)."""
    return folder.exists() and any(folder.iterdir()) and not (folder / MARKER_NAME).is_file()


def _claim_demo_folder(folder: Path, marker: dict) -> None:
    """Make ``folder`` an empty demo folder holding only its marker file.

    A previous demo is removed first, so no stale image survives an overwrite. The marker is
    written before any image, so an interrupted write can be redone. The caller has checked
    with :func:`_is_foreign` that ``folder`` is not real data.
    """
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    atomic_write_bytes(folder / MARKER_NAME, (json.dumps(marker, indent=2) + "\n").encode())


def _marker(
    part: str, count: int, size: int, seed: int, positive_fraction: float, shapes: str
) -> dict:
    """The marker file's content for one folder: the generator's arguments that shaped it."""
    if part == TRUTH_FOLDER:
        contents = "true masks and labels of the external images"
        return {"generator": GENERATOR, "contents": contents, "size": size, "seed": seed}
    marker = {"generator": GENERATOR, f"n_{part}": count, "size": size, "seed": seed}
    if part == "siim":
        marker["positive_fraction"] = positive_fraction
    return {**marker, "shapes": shapes}


def _prepare_folders(
    root: Path, counts: dict[str, int], markers: dict[str, dict]
) -> dict[str, Path]:
    """Claim the folder of every part to be written; remove a previous demo's left-out parts.

    Every folder is checked before any is touched, so real data stops the whole write.

    Returns:
        Folder per part (those with a count > 0).

    Raises:
        FileExistsError: a part's folder holds something that is not a previous demo.
    """
    folders = {part: root / part for part in counts}
    for part in markers:
        if _is_foreign(folders[part]):
            raise FileExistsError(
                f"{folders[part]} exists and is not a demo folder (no {MARKER_NAME}); "
                f"refusing to overwrite what may be a real {part} download"
            )
    for part, folder in folders.items():
        if part in markers:
            _claim_demo_folder(folder, markers[part])
        elif folder.exists() and not _is_foreign(folder):
            shutil.rmtree(folder)  # a stale demo part: the readers would find it
    return {part: folders[part] for part in markers}


def _check_arguments(size: int, positive_fraction: float, counts: dict[str, int]) -> None:
    if counts["siim"] < 1:
        raise ValueError(f"n_siim must be at least 1, got {counts['siim']}")
    for part, count in counts.items():
        if count < 0:
            raise ValueError(f"n_{part} must be 0 (part left out) or more, got {count}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")


def write_demo_root(
    root: str | Path,
    *,
    n_siim: int = 500,
    n_chexpert: int = 300,
    n_nih: int = 300,
    n_montgomery: int = 40,
    size: int = 256,
    seed: int = 0,
    positive_fraction: float = 0.22,
    progress: bool = True,
) -> DemoSummary:
    """Write (or deterministically overwrite) a demo data root.

    Args:
        root: the demo data root; each dataset goes to its own folder in its own layout
            (see the module docstring).
        n_siim: number of SIIM images (DICOM, ``size``²).
        n_chexpert: CheXpert JPEGs (train and valid; ``size`` wide, ``size·390/320`` tall);
            0 leaves the part out.
        n_nih: NIH ChestX-ray14 PNGs (``size``²); 0 leaves the part out.
        n_montgomery: Montgomery images with lung masks (short side ``size``); 0 leaves it out.
        size: image size in pixels, 64 to 1024 (the real SIIM and NIH data are 1024).
        seed: everything (anatomy, shapes, labels, exposure, UIDs, patient tags) follows from it;
            the same arguments give byte-identical files, and each part's files depend only on
            the seed, the size and that part's count.
        positive_fraction: share of SIIM images with a pneumothorax (the real data: 0.222).
        progress: show tqdm progress bars.

    Returns:
        The counts and paths of what was written.

    Raises:
        ValueError: an argument is out of range.
        FileExistsError: the folder of a part to be written holds something that is not a
            previous demo (checked for every part before anything is written). The folder of
            a part left out (count 0) is removed only if it is a previous demo.
    """
    counts = {"siim": n_siim, "chexpert": n_chexpert, "nih": n_nih, "montgomery": n_montgomery}
    _check_arguments(size, positive_fraction, counts)
    root = Path(root)
    counts[TRUTH_FOLDER] = n_chexpert + n_nih
    real_csv = xrv_siim_csv()
    shapes = "parametric" if real_csv is None else f"real SIIM masks ({REAL_CSV_NAME})"
    markers = {
        part: _marker(part, count, size, seed, positive_fraction, shapes)
        for part, count in counts.items()
        if count
    }
    folders = _prepare_folders(root, counts, markers)

    csv_path, positives, rows, multi = _write_siim(
        folders["siim"],
        n_images=n_siim,
        size=size,
        seed=seed,
        positive_fraction=positive_fraction,
        real_csv=real_csv,
        progress=progress,
    )
    truth = TruthRecorder(root)
    external = {}
    for part, writer in (("chexpert", write_chexpert), ("nih", write_nih)):
        if part in folders:
            external[part] = writer(
                folders[part],
                truth,
                n_images=counts[part],
                size=size,
                seed=np.random.SeedSequence([seed, SEED_TAGS[part]]),
                real_csv=real_csv,
                progress=progress,
            )
    if n_montgomery:
        external["montgomery"] = write_montgomery(
            folders["montgomery"],
            n_images=n_montgomery,
            size=size,
            seed=np.random.SeedSequence([seed, SEED_TAGS["montgomery"]]),
            progress=progress,
        )
    return DemoSummary(
        root=root,
        csv=csv_path,
        images=n_siim,
        positives=positives,
        rows=rows,
        multi_instance_images=multi,
        truth_csv=truth.write_csv() if truth.rows else None,
        **external,
    )


def main(argv: Sequence[str] | None = None) -> DemoSummary:
    """Command line: write a demo data root and print what was written."""
    parser = argparse.ArgumentParser(
        prog="python -m ssl_ptx.data.demo",
        description="Write a synthetic demo data root: SIIM (DICOM tree + train-rle.csv), "
        "CheXpert-v1.0-small, NIH ChestX-ray14 and the Montgomery set, each in its own "
        "published layout, plus the external images' true masks in _truth/, so every recipe "
        "can run without the real data.",
    )
    parser.add_argument(
        "--root", type=Path, required=True, help="demo data root to write (one folder per set)"
    )
    parser.add_argument(
        "--n-siim", type=int, default=500, help="number of SIIM images (default: 500)"
    )
    for part, name, default in (
        ("chexpert", "CheXpert", 300),
        ("nih", "NIH ChestX-ray14", 300),
        ("montgomery", "Montgomery", 40),
    ):
        parser.add_argument(
            f"--n-{part}",
            type=int,
            default=default,
            help=f"number of {name} images; 0 leaves the part out (default: {default})",
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
        help="share of SIIM images with a pneumothorax (default: 0.22)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        summary = write_demo_root(
            args.root,
            n_siim=args.n_siim,
            n_chexpert=args.n_chexpert,
            n_nih=args.n_nih,
            n_montgomery=args.n_montgomery,
            size=args.size,
            seed=args.seed,
            positive_fraction=args.positive_fraction,
            progress=not args.no_progress,
        )
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    lines = [
        f"wrote {summary.images} SIIM images ({summary.positives} with pneumothorax, "
        f"{summary.multi_instance_images} with several instances; {summary.rows} CSV rows) "
        f"to {summary.root / 'siim'}",
        f"labels: {summary.csv}",
    ]
    for name, part, positive in (
        ("CheXpert", summary.chexpert, "labelled Pneumothorax 1.0"),
        ("NIH", summary.nih, "labelled Pneumothorax"),
        ("Montgomery", summary.montgomery, "tuberculosis"),
    ):
        if part is not None:
            drawn = (
                f", {part.true_positives} with a pneumothorax drawn" if name != "Montgomery" else ""
            )
            lines.append(
                f"wrote {part.images} {name} images ({part.published_positives} {positive}"
                f"{drawn}) to {part.folder}"
            )
    if summary.truth_csv is not None:
        lines.append(f"true masks and labels of the external images: {summary.truth_csv}")
    lines.append(f"{args.size} px, seed {args.seed}, {time.perf_counter() - started:.1f} s")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
