"""The demo's NIH ChestX-ray14 part, in the published layout::

    <folder>/images_001/images/00000001_000.png   (1–2 of them RGBA, one 16-bit, as in the wild)
    <folder>/images_002/images/...                (when there are 20 images or more)
    <folder>/Data_Entry_2017.csv                  bracketed two-value column names, trailing comma
    <folder>/BBox_List_2017.csv                   "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    <folder>/train_val_list.txt, test_list.txt    a patient-wise split, one image name a line

Labels are per image and text-mined in the real set: ~4.7 % mention Pneumothorax, and the true
state disagrees more often than in CheXpert (about 15 % of positives show no pneumothorax, 4 %
of negatives show one). Only the pneumothorax is drawn; the other findings in ``Finding Labels``
and their boxes mirror the real file's frequencies and format but are not in the pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ssl_ptx.data._demo_external import (
    ExternalSummary,
    TruthRecorder,
    clipped_normal,
    draw_devices,
    draw_truth,
    encode_image,
    frontal_pneumothorax,
    quota_labels,
)
from ssl_ptx.data._demo_findings import PneumothoraxShapes
from ssl_ptx.data._phantom import lung_masks, render_chest_xray, sample_anatomy
from ssl_ptx.fileio import atomic_write_bytes

__all__ = ["BBOX_HEADER", "DATA_ENTRY_HEADER", "write_nih"]

DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
PNEUMOTHORAX = "Pneumothorax"
#: share of all images mentioning each other finding (torchxrayvision's v2020 file, 112,120 rows)
OTHER_FINDING_SHARES = {
    "Atelectasis": 0.1031,
    "Cardiomegaly": 0.0248,
    "Consolidation": 0.0416,
    "Edema": 0.0205,
    "Effusion": 0.1188,
    "Emphysema": 0.0224,
    "Fibrosis": 0.0150,
    "Hernia": 0.0020,
    "Infiltration": 0.1774,
    "Mass": 0.0516,
    "Nodule": 0.0565,
    "Pleural_Thickening": 0.0302,
    "Pneumonia": 0.0128,
}
PNEUMOTHORAX_SHARES = {"1.0": 5302, "0.0": 112120 - 5302}
#: share of images with a visible pneumothorax, per published label
TRUE_GIVEN_PUBLISHED = {"1.0": 0.85, "0.0": 0.04}
#: the box list names findings as Data_Entry does, except "Infiltrate"
BOX_NAMES = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Effusion",
    "Infiltration": "Infiltrate",
    "Mass": "Mass",
    "Nodule": "Nodule",
    "Pneumonia": "Pneumonia",
}
PNEUMOTHORAX_BOX_SHARE = 0.4  # visible published positives with a box (the real: 98 of 5,302)
OTHER_BOX_SHARE = 0.05  # images with a boxable other finding that get a box for it
#: images per patient (the real counts for 1..8 follow-ups; longer series are left out)
IMAGES_PER_PATIENT = {1: 17503, 2: 4113, 3: 2100, 4: 1330, 5: 938, 6: 787, 7: 608, 8: 494}
#: (width, height, pixel spacing as written) of the original films, the eight commonest
ORIGINAL_GEOMETRY = {
    ("2500", "2048", "0.168"): 29986,
    ("2992", "2991", "0.14300000000000002"): 21961,
    ("3056", "2544", "0.139"): 15340,
    ("2500", "2048", "0.171"): 7141,
    ("2048", "2500", "0.168"): 5817,
    ("2021", "2021", "0.19431099999999998"): 4264,
    ("2048", "2500", "0.171"): 2838,
    ("2544", "3056", "0.139"): 2418,
}
TEST_PATIENT_SHARE = 0.228  # images of test_list.txt (25,596 of 112,120), split by patient
MALE_SHARE = 0.565
PA_SHARE = 0.6
SECOND_FOLDER_FROM = 20  # from this many images on, they are split over images_001, images_002
QUIRKS = ("rgba", "16-bit", "rgba")  # odd PNG formats, given to random images in this order


def _choice(rng: np.random.Generator, weighted: dict) -> object:
    keys = list(weighted)
    weights = np.array([weighted[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=weights / weights.sum()))]


def _patients(rng: np.random.Generator, n_images: int) -> list[tuple[int, int]]:
    """``(patient id, follow-up #)`` per image, patients numbered from 1, in file order."""
    images: list[tuple[int, int]] = []
    patient = 1
    while len(images) < n_images:
        count = min(int(_choice(rng, IMAGES_PER_PATIENT)), n_images - len(images))
        images += [(patient, follow_up) for follow_up in range(count)]
        patient += 1
    return images


def _finding_labels(rng: np.random.Generator, pneumothorax: bool) -> list[str]:
    """The image's findings, alphabetical as in the real file; empty means "No Finding"."""
    findings = [name for name, share in OTHER_FINDING_SHARES.items() if rng.random() < share]
    return sorted([*findings, PNEUMOTHORAX] if pneumothorax else findings)


def _bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    """``(x, y, w, h)`` of the nonzero pixels, in the PNG's pixel grid."""
    ys, xs = np.nonzero(mask)
    return (
        float(xs.min()),
        float(ys.min()),
        float(xs.max() - xs.min() + 1),
        float(ys.max() - ys.min() + 1),
    )


def _lung_box(rng: np.random.Generator, lungs: np.ndarray) -> tuple[float, float, float, float]:
    """A box for a finding that is listed but not drawn: a random box over the lung fields."""
    x, y, w, h = _bbox(lungs)
    bw, bh = w * rng.uniform(0.15, 0.45), h * rng.uniform(0.1, 0.35)
    return x + rng.uniform(0, w - bw), y + rng.uniform(0, h - bh), bw, bh


def _png(pixels: np.ndarray, quirk: str | None) -> bytes:
    """8-bit grey PNG bytes; ``rgba``: grey in R, G and B with opaque alpha; ``16-bit``: ×257."""
    if quirk == "rgba":
        pixels = np.dstack([pixels, pixels, pixels, np.full_like(pixels, 255)])
    elif quirk == "16-bit":
        pixels = pixels.astype(np.uint16) * 257
    return encode_image(pixels, ".png")


def write_nih(
    folder: Path,
    truth: TruthRecorder,
    *,
    n_images: int,
    size: int,
    seed: np.random.SeedSequence,
    real_csv: Path | None,
    progress: bool,
) -> ExternalSummary:
    """Write the NIH part into ``folder`` (the folder that holds ``images_001``).

    Args:
        folder: an empty demo folder (``<root>/nih``).
        truth: records every image's true mask.
        n_images: PNG files to write, ``size``×``size`` (the real ones are 1024²).
        size: image side in pixels.
        seed: this part's seed.
        real_csv: the real SIIM label file for pneumothorax shapes (None: parametric shapes).
        progress: show a tqdm progress bar.
    """
    layout_seed, label_seed, shape_seed, image_seed = seed.spawn(4)
    layout_rng, label_rng = np.random.default_rng(layout_seed), np.random.default_rng(label_seed)
    images = _patients(layout_rng, n_images)
    names = [f"{patient:08d}_{follow_up:03d}.png" for patient, follow_up in images]
    first_folder = n_images if n_images < SECOND_FOLDER_FROM else round(n_images / 3)
    quirks = dict(zip(layout_rng.permutation(n_images).tolist(), QUIRKS, strict=False))
    published = quota_labels(label_rng, n_images, PNEUMOTHORAX_SHARES)
    truly = draw_truth(label_rng, published, TRUE_GIVEN_PUBLISHED)

    shapes = PneumothoraxShapes(shape_seed, size, real_csv)
    rows, boxes = [], []
    patient_info: dict[int, tuple[str, int]] = {}
    true_positives = 0
    iterator = zip(images, names, published, truly, image_seed.spawn(n_images), strict=True)
    for index, ((patient, follow_up), name, label, true, image_seq) in enumerate(
        tqdm(iterator, total=n_images, desc="demo NIH", disable=not progress, unit="img")
    ):
        rng = np.random.default_rng(image_seq)
        if patient not in patient_info:
            gender = "M" if rng.random() < MALE_SHARE else "F"
            patient_info[patient] = (gender, clipped_normal(rng, 47, 16.6, 1, 95))
        gender, first_age = patient_info[patient]
        view = "PA" if rng.random() < PA_SHARE else "AP"
        anatomy = sample_anatomy(rng, view=view, female=gender == "F")
        drain, skin_fold = draw_devices(rng, bool(true))
        mask = (
            frontal_pneumothorax(rng, (size, size), anatomy, shapes)
            if true
            else np.zeros((size, size), np.uint8)
        )
        pixels = render_chest_xray(
            rng.spawn(1)[0],
            size,
            anatomy=anatomy,
            pneumothorax=mask if true else None,
            drain=drain,
            skin_fold=skin_fold,
        )
        subfolder = "images_001" if index < first_folder else "images_002"
        path = folder / subfolder / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, _png(pixels, quirks.get(index)))
        truth.add("nih", name, path, str(label), mask)
        true_positives += bool(true)

        findings = _finding_labels(rng, label == "1.0")
        width, height, spacing = _choice(rng, ORIGINAL_GEOMETRY)
        age = first_age + follow_up // 3
        rows.append(
            f"{name},{'|'.join(findings) or 'No Finding'},{follow_up},{patient},{age},"
            f"{gender},{view},{width},{height},{spacing},{spacing},"
        )
        if label == "1.0" and true and rng.random() < PNEUMOTHORAX_BOX_SHARE:
            boxes.append((name, "Pneumothorax", _bbox(mask)))
        boxable = [f for f in findings if f in BOX_NAMES]
        if boxable and rng.random() < OTHER_BOX_SHARE:
            lungs = np.bitwise_or(*lung_masks(anatomy, size))
            boxes.append((name, BOX_NAMES[str(rng.choice(boxable))], _lung_box(rng, lungs)))

    _write_lists(folder, names, images, layout_rng)
    atomic_write_bytes(
        folder / "Data_Entry_2017.csv", ("\n".join([DATA_ENTRY_HEADER, *rows]) + "\n").encode()
    )
    # 15 significant digits, as in the real file ("225.084745762712"), always with a decimal point
    box_lines = [
        f"{name},{finding}," + ",".join(repr(float(f"{v:.15g}")) for v in box)
        for name, finding, box in boxes
    ]
    atomic_write_bytes(
        folder / "BBox_List_2017.csv", ("\n".join([BBOX_HEADER, *box_lines]) + "\n").encode()
    )
    return ExternalSummary(
        folder=folder,
        images=n_images,
        published_positives=int(np.count_nonzero(published == "1.0")),
        true_positives=true_positives,
    )


def _write_lists(
    folder: Path, names: list[str], images: list[tuple[int, int]], rng: np.random.Generator
) -> None:
    """``train_val_list.txt`` and ``test_list.txt``: a random patient-wise split."""
    patients = sorted({patient for patient, _ in images})
    n_test = round(len(patients) * TEST_PATIENT_SHARE)
    test = set(rng.permutation(patients)[:n_test].tolist())
    for filename, keep in (("train_val_list.txt", False), ("test_list.txt", True)):
        chosen = [
            n for n, (patient, _) in zip(names, images, strict=True) if (patient in test) == keep
        ]
        atomic_write_bytes(folder / filename, "".join(f"{name}\n" for name in chosen).encode())
