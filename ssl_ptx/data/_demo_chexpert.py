"""The demo's CheXpert part, in CheXpert-v1.0-small's published layout::

    <folder>/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg
    <folder>/CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg
    <folder>/CheXpert-v1.0-small/valid/patient00042/study1/view1_frontal.jpg
    <folder>/CheXpert-v1.0-small/train.csv, valid.csv   (``Path`` starts "CheXpert-v1.0-small/")

Labels are per study, as in the real file (every view of a study carries the same values). The
frequencies follow torchxrayvision's ``chexpert_train.csv.gz`` (191,027 frontal rows): the
Pneumothorax column exactly (by quota), the other columns as independent draws; ``valid.csv``
carries only ``1.0``/``0.0`` (radiologist consensus) and is noise-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ssl_ptx.data._demo_external import (
    ExternalSummary,
    TruthRecorder,
    aspect_shape,
    clipped_normal,
    draw_devices,
    draw_truth,
    encode_image,
    frontal_pneumothorax,
    lateral_pneumothorax,
    quota_labels,
)
from ssl_ptx.data._demo_findings import PneumothoraxShapes
from ssl_ptx.data._phantom import render_chest_xray, render_lateral_xray, sample_anatomy
from ssl_ptx.fileio import atomic_write_bytes

__all__ = ["CHEXPERT_HEADER", "DATASET_FOLDER", "write_chexpert"]

DATASET_FOLDER = "CheXpert-v1.0-small"
FINDINGS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
CHEXPERT_HEADER = ",".join(("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS))
POSITIVE, NEGATIVE, UNCERTAIN, BLANK = "1.0", "0.0", "-1.0", ""
#: frontal-row shares of (1.0, 0.0, -1.0) per column in the real train.csv; the rest is blank
REAL_SHARES = {
    "Enlarged Cardiomediastinum": (0.0481, 0.0803, 0.0538),
    "Cardiomegaly": (0.1224, 0.0412, 0.0351),
    "Lung Opacity": (0.4932, 0.0264, 0.0232),
    "Lung Lesion": (0.0369, 0.0041, 0.0058),
    "Edema": (0.2600, 0.0833, 0.0619),
    "Consolidation": (0.0680, 0.1026, 0.1276),
    "Pneumonia": (0.0245, 0.0098, 0.0837),
    "Atelectasis": (0.1556, 0.0054, 0.1563),
    "Pleural Effusion": (0.4026, 0.1324, 0.0501),
    "Pleural Other": (0.0131, 0.0011, 0.0095),
    "Fracture": (0.0389, 0.0104, 0.0026),
    "Support Devices": (0.5610, 0.0280, 0.0048),
}
#: the real frontal Pneumothorax counts: 17,693 / 47,823 / 2,708 / 122,803 blank
PNEUMOTHORAX_SHARES = {POSITIVE: 17693, NEGATIVE: 47823, UNCERTAIN: 2708, BLANK: 122803}
NO_FINDING_SHARE = 0.0889  # frontal rows with No Finding = 1.0 (the rest blank)
VALID_PNEUMOTHORAX_SHARE = 0.05  # positives in valid.csv (8 of 234 images in the real one)
VALID_SHARE = 0.1  # share of the demo's CheXpert images in valid/ (the real: 234 images)
#: share of studies with a visible pneumothorax, per published train label: about 7.5 % of
#: positives show none, 2.5 % of negatives show one; uncertain and blank hide a mix
TRUE_GIVEN_PUBLISHED = {POSITIVE: 0.925, NEGATIVE: 0.025, UNCERTAIN: 0.4, BLANK: 0.03}
STUDIES_PER_PATIENT = {1: 0.6, 2: 0.25, 3: 0.15}
TWO_VIEW_SHARE = 0.18  # studies with a second view (the real: 17 % two, 1 % three)
SECOND_FRONTAL_SHARE = 0.1  # of those, a second frontal instead of a lateral
MALE_SHARE = 0.594
AP_SHARE = 0.846  # frontal views that are AP (the real: 161,590 AP, 29,420 PA)
ASPECT = 390 / 320  # CheXpert-small images are ~320 wide by ~390 tall


@dataclass(frozen=True)
class _Study:
    """One study: where it lives, who it is, which views it has and its published labels."""

    split: str
    patient: int
    number: int
    views: tuple[str, ...]  # "frontal" / "lateral", in view order
    sex: str
    age: int
    ap_pa: str

    def files(self) -> list[tuple[str, str, str]]:
        """``(view, path, image_id)`` per view.

        ``path`` is as ``Path`` in the CSV (``CheXpert-v1.0-small/train/patient00001/study1/
        view1_frontal.jpg``); ``image_id`` is the reader's id (``patient00001_study1_view1_
        frontal``): the path components below ``train/`` or ``valid/`` joined by ``_``.
        """
        patient, study = f"patient{self.patient:05d}", f"study{self.number}"
        return [
            (
                view,
                f"{DATASET_FOLDER}/{self.split}/{patient}/{study}/view{i}_{view}.jpg",
                f"{patient}_{study}_view{i}_{view}",
            )
            for i, view in enumerate(self.views, start=1)
        ]


def _studies(
    rng: np.random.Generator, split: str, n_images: int, first_patient: int
) -> list[_Study]:
    """Patients with 1–3 studies (1 in valid/) of 1–2 views, until ``n_images`` views exist."""
    studies: list[_Study] = []
    patient, left = first_patient, n_images
    counts, weights = zip(*STUDIES_PER_PATIENT.items(), strict=True)
    while left > 0:
        n_studies = 1 if split == "valid" else int(rng.choice(counts, p=weights))
        sex = "Male" if rng.random() < MALE_SHARE else "Female"
        age = clipped_normal(rng, 62, 17, 18, 90)
        for number in range(1, n_studies + 1):
            views = ["frontal"]
            if rng.random() < TWO_VIEW_SHARE:
                views.append("frontal" if rng.random() < SECOND_FRONTAL_SHARE else "lateral")
            views = views[:left]
            ap_pa = "AP" if rng.random() < AP_SHARE else "PA"
            studies.append(_Study(split, patient, number, tuple(views), sex, age, ap_pa))
            left -= len(views)
            age = min(90, age + int(rng.integers(0, 2)))
            if left == 0:
                break
        patient += 1
    return studies


def _other_labels(rng: np.random.Generator, pneumothorax: str, *, valid: bool) -> dict[str, str]:
    """The 13 other columns of one study, given its Pneumothorax value.

    ``No Finding`` is ``1.0`` only for studies without a positive or uncertain pneumothorax, and
    then every other finding is ``0.0`` or blank. In valid.csv every value is 1.0 or 0.0.
    """
    values = (POSITIVE, NEGATIVE, UNCERTAIN, BLANK)
    labels = {}
    eligible = pneumothorax in (NEGATIVE, BLANK)
    no_finding = eligible and rng.random() < NO_FINDING_SHARE / (
        (PNEUMOTHORAX_SHARES[NEGATIVE] + PNEUMOTHORAX_SHARES[BLANK])
        / sum(PNEUMOTHORAX_SHARES.values())
    )
    labels["No Finding"] = POSITIVE if no_finding else NEGATIVE if valid else BLANK
    for column, (pos, neg, unc) in REAL_SHARES.items():
        if no_finding and column != "Support Devices":
            pos, unc = 0.0, 0.0
        if valid:
            labels[column] = POSITIVE if rng.random() < pos else NEGATIVE
        else:
            probabilities = np.array([pos, neg, unc, max(0.0, 1.0 - pos - neg - unc)])
            labels[column] = str(rng.choice(values, p=probabilities / probabilities.sum()))
    return labels


def _csv_row(path: str, study: _Study, view: str, labels: dict[str, str]) -> str:
    """One line of train.csv / valid.csv (AP/PA is blank for a lateral view, as published)."""
    ap_pa = study.ap_pa if view == "frontal" else ""
    columns = [path, study.sex, str(study.age), view.capitalize(), ap_pa]
    return ",".join(columns + [labels[column] for column in FINDINGS])


def write_chexpert(
    folder: Path,
    truth: TruthRecorder,
    *,
    n_images: int,
    size: int,
    seed: np.random.SeedSequence,
    real_csv: Path | None,
    progress: bool,
) -> ExternalSummary:
    """Write the CheXpert part into ``folder`` (which holds ``CheXpert-v1.0-small/``).

    Args:
        folder: an empty demo folder (``<root>/chexpert``).
        truth: records every image's true mask.
        n_images: JPEG files to write (train and valid together; about 10 % go to valid).
        size: image width in pixels; height is ``size * 390 / 320`` (CheXpert-small's shape).
        seed: this part's seed.
        real_csv: the real SIIM label file for pneumothorax shapes (None: parametric shapes).
        progress: show a tqdm progress bar.
    """
    layout_seed, label_seed, shape_seed, image_seed = seed.spawn(4)
    layout_rng, label_rng = np.random.default_rng(layout_seed), np.random.default_rng(label_seed)
    n_valid = round(n_images * VALID_SHARE)
    train = _studies(layout_rng, "train", n_images - n_valid, first_patient=1)
    first_valid = (train[-1].patient + 1) if train else 1
    valid = _studies(layout_rng, "valid", n_valid, first_patient=first_valid)

    published = list(quota_labels(label_rng, len(train), PNEUMOTHORAX_SHARES))
    valid_shares = {POSITIVE: VALID_PNEUMOTHORAX_SHARE, NEGATIVE: 1 - VALID_PNEUMOTHORAX_SHARE}
    published += list(quota_labels(label_rng, len(valid), valid_shares))
    truly = draw_truth(label_rng, published[: len(train)], TRUE_GIVEN_PUBLISHED)
    truly = np.concatenate([truly, np.array(published[len(train) :]) == POSITIVE])

    shape = aspect_shape(size, ASPECT)
    shapes = PneumothoraxShapes(shape_seed, size, real_csv)
    dataset = folder / DATASET_FOLDER
    rows: dict[str, list[str]] = {"train": [], "valid": []}
    published_positives = true_positives = 0
    studies = train + valid
    bar = tqdm(total=n_images, desc="demo CheXpert", disable=not progress, unit="img")
    for study, label, true, study_seed in zip(
        studies, published, truly, image_seed.spawn(len(studies)), strict=True
    ):
        rng = np.random.default_rng(study_seed)
        anatomy = sample_anatomy(rng, view=study.ap_pa, female=study.sex == "Female")
        drain, skin_fold = draw_devices(rng, bool(true))
        labels = _other_labels(rng, label, valid=study.split == "valid")
        labels["Pneumothorax"] = label
        if drain:
            labels["Support Devices"] = POSITIVE
        frontal_mask = frontal_pneumothorax(rng, shape, anatomy, shapes) if true else None
        has_lateral = "lateral" in study.views
        lateral_mask = lateral_pneumothorax(rng, shape, anatomy) if true and has_lateral else None
        for (view, relative, image_id), render_rng in zip(
            study.files(), rng.spawn(len(study.views)), strict=True
        ):
            if view == "frontal":
                mask = frontal_mask
                pixels = render_chest_xray(
                    render_rng,
                    shape,
                    anatomy=anatomy,
                    pneumothorax=mask,
                    drain=drain,
                    skin_fold=skin_fold,
                )
            else:
                mask = lateral_mask
                pixels = render_lateral_xray(render_rng, shape, anatomy=anatomy, pneumothorax=mask)
            path = folder / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, encode_image(pixels, ".jpg"))
            mask = np.zeros(shape, np.uint8) if mask is None else mask
            truth.add("chexpert", image_id, path, label, mask)
            rows[study.split].append(_csv_row(relative, study, view, labels))
            published_positives += label == POSITIVE
            true_positives += mask.any()
            bar.update()
    bar.close()
    for split, lines in rows.items():
        text = "\n".join([CHEXPERT_HEADER, *lines]) + "\n"
        atomic_write_bytes(dataset / f"{split}.csv", text.encode())
    return ExternalSummary(
        folder=folder,
        images=n_images,
        published_positives=int(published_positives),
        true_positives=int(true_positives),
    )
