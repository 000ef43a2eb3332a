"""The demo's Montgomery County part, in the published layout::

    <folder>/MontgomerySet/CXR_png/MCUCXR_0001_0.png          (_1: tuberculosis, ~42 %)
    <folder>/MontgomerySet/ManualMask/leftMask/MCUCXR_0001_0.png    the patient's LEFT lung
    <folder>/MontgomerySet/ManualMask/rightMask/MCUCXR_0001_0.png   the patient's right lung
    <folder>/MontgomerySet/ClinicalReadings/MCUCXR_0001_0.txt       sex, age, reading

Films are PA and not square, as the real 4020×4892 (portrait) and 4892×4020 (landscape) ones;
masks are 0/255 at the image's size. On a PA film the patient's left lung is on the image's
right, so ``leftMask`` holds the renderer's image-right lung.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ssl_ptx.data._demo_external import (
    ExternalSummary,
    aspect_shape,
    clipped_normal,
    encode_image,
    quota_labels,
)
from ssl_ptx.data._phantom import lung_masks, render_chest_xray, sample_anatomy
from ssl_ptx.fileio import atomic_write_bytes

__all__ = ["DATASET_FOLDER", "write_montgomery"]

DATASET_FOLDER = "MontgomerySet"
TUBERCULOSIS_SHARES = {"1": 58, "0": 80}  # the real set: 58 of 138 images
LANDSCAPE_SHARE = 0.15  # films stored 4892 wide × 4020 high
ASPECT = 4892 / 4020
MALE_SHARE = 0.46
TUBERCULOSIS_READINGS = (
    "right upper lobe infiltrate, cavitary",
    "bilateral upper lobe fibronodular opacities",
    "left upper lobe scarring, old TB",
    "right apical pleural thickening and nodules",
    "miliary pattern both lungs",
)


def write_montgomery(
    folder: Path,
    *,
    n_images: int,
    size: int,
    seed: np.random.SeedSequence,
    progress: bool,
) -> ExternalSummary:
    """Write the Montgomery part into ``folder`` (which holds ``MontgomerySet/``).

    Args:
        folder: an empty demo folder (``<root>/montgomery``).
        n_images: images to write (each with a left and a right lung mask).
        size: the short side in pixels; the long side is ``size * 4892 / 4020``.
        seed: this part's seed.
        progress: show a tqdm progress bar.
    """
    label_seed, image_seed = seed.spawn(2)
    label_rng = np.random.default_rng(label_seed)
    tuberculosis = quota_labels(label_rng, n_images, TUBERCULOSIS_SHARES)
    dataset = folder / DATASET_FOLDER
    for number, (label, image_seq) in enumerate(
        tqdm(
            list(zip(tuberculosis, image_seed.spawn(n_images), strict=True)),
            desc="demo Montgomery",
            disable=not progress,
            unit="img",
        ),
        start=1,
    ):
        rng = np.random.default_rng(image_seq)
        shape = aspect_shape(size, ASPECT, portrait=rng.random() >= LANDSCAPE_SHARE)
        male = rng.random() < MALE_SHARE
        anatomy = sample_anatomy(rng, view="PA", female=not male)
        pixels = render_chest_xray(rng.spawn(1)[0], shape, anatomy=anatomy)
        image_left, image_right = lung_masks(anatomy, shape)
        stem = f"MCUCXR_{number:04d}_{label}"
        files = {
            "CXR_png": pixels,
            "ManualMask/leftMask": image_right * 255,  # the patient's left lung
            "ManualMask/rightMask": image_left * 255,
        }
        for subfolder, image in files.items():
            path = dataset / subfolder / f"{stem}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, encode_image(image, ".png"))
        reading = str(rng.choice(TUBERCULOSIS_READINGS)) if label == "1" else "normal"
        age = clipped_normal(rng, 40, 18, 2, 89)
        text = f"Patient's Sex: {'M' if male else 'F'}\nPatient's Age: {age:03d}Y\n{reading}\n"
        atomic_write_bytes(dataset / "ClinicalReadings" / f"{stem}.txt", text.encode())
    return ExternalSummary(
        folder=folder,
        images=n_images,
        published_positives=int(np.count_nonzero(tuberculosis == "1")),
        true_positives=0,
    )
