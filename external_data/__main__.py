"""Check that external dataset downloads are found: print, per dataset, the images listed,
found and missing, and the label counts.

Command line::

    python -m external_data --chexpert-dir D --nih-dir D --montgomery-dir D

The exit status is 0 when every dataset given was read and has at least one image, 1
otherwise (the reason is printed).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from external_data import chexpert, montgomery, nih

__all__ = ["main", "summarize_chexpert", "summarize_montgomery", "summarize_nih"]


def _counts(**counts: int) -> str:
    """``name 1,234 | other 5`` with underscores in names printed as spaces."""
    return " | ".join(f"{name.replace('_', ' ')} {value:,}" for name, value in counts.items())


def summarize_chexpert(manifest: pd.DataFrame) -> list[str]:
    """Report lines for a manifest from :func:`external_data.chexpert.load`."""
    label = manifest["label"]
    n_missing = len(manifest.attrs["missing"])
    return [
        f"dataset folder: {manifest.attrs['dataset_dir']}",
        "label files: " + ", ".join(Path(path).name for path in manifest.attrs["label_csvs"]),
        _counts(images_listed=len(manifest) + n_missing, found=len(manifest), missing=n_missing),
        "Pneumothorax: "
        + _counts(
            positive=int((label == 1).sum()),
            negative=int((label == 0).sum()),
            uncertain=int((label == -1).sum()),
            blank=int(label.isna().sum()),
        ),
    ]


def summarize_nih(manifest: pd.DataFrame) -> list[str]:
    """Report lines for a manifest from :func:`external_data.nih.load`."""
    attrs = manifest.attrs
    n_missing, n_excluded = len(attrs["missing"]), len(attrs["excluded"])
    return [
        f"label file: {attrs['label_csv']}",
        _counts(
            images_listed=len(manifest) + n_missing + n_excluded,
            found=len(manifest),
            missing=n_missing,
            excluded=n_excluded,
            PNGs_not_listed=len(attrs["unlisted"]),
        ),
        "Pneumothorax: "
        + _counts(
            positive=int((manifest["label"] == 1).sum()),
            negative=int((manifest["label"] == 0).sum()),
        ),
    ]


def summarize_montgomery(manifest: pd.DataFrame) -> list[str]:
    """Report lines for a manifest from :func:`external_data.montgomery.load`."""
    n_skipped = len(manifest.attrs["skipped"])
    lines = [
        f"dataset folder: {manifest.attrs['dataset_dir']}",
        _counts(images_listed=len(manifest) + n_skipped, read=len(manifest), skipped=n_skipped),
        _counts(
            tuberculosis=int((manifest["tuberculosis"] == 1).sum()),
            normal=int((manifest["tuberculosis"] == 0).sum()),
        ),
    ]
    if len(manifest):
        share = manifest["mask_area"] / (manifest["height"] * manifest["width"])
        lines[-1] += f" | lung area median {np.median(share):.1%} of the image"
    lines += [
        f"skipped {image_id}: {reason}" for image_id, reason in manifest.attrs["skipped"].items()
    ]
    return lines


def _report(
    name: str, read: Callable[[], pd.DataFrame], summarize: Callable[[pd.DataFrame], list[str]]
) -> bool:
    """Print one dataset's report; True when it was read and has at least one image."""
    try:
        manifest = read()
    except (FileNotFoundError, ValueError) as error:
        print(f"{name}: error: {error}")
        return False
    print(f"{name}:")
    for line in summarize(manifest):
        print(f"  {line}")
    if manifest.empty:
        print(f"  error: no {name} image was found")
    return not manifest.empty


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns the exit status (0 all found, 1 otherwise, 2 usage)."""
    parser = argparse.ArgumentParser(
        prog="python -m external_data",
        description="Check external dataset downloads: for each dataset given, print the "
        "images listed, found and missing, and the label counts.",
    )
    parser.add_argument(
        "--chexpert-dir",
        type=Path,
        help="folder holding CheXpert-v1.0-small (or CheXpert-v1.0), or that folder itself",
    )
    parser.add_argument(
        "--chexpert-all-views",
        action="store_true",
        help="count lateral CheXpert images too (default: frontal only)",
    )
    parser.add_argument(
        "--nih-dir", type=Path, help="NIH ChestX-ray14 folder (images_*/images, Data_Entry_2017)"
    )
    parser.add_argument("--nih-csv", type=Path, help="NIH label file (default: found in --nih-dir)")
    parser.add_argument(
        "--nih-exclude", type=Path, help="text file of NIH image ids to leave out, one per line"
    )
    parser.add_argument(
        "--montgomery-dir", type=Path, help="folder holding MontgomerySet, or that folder itself"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if not (args.chexpert_dir or args.nih_dir or args.montgomery_dir):
        parser.error("give at least one of --chexpert-dir, --nih-dir, --montgomery-dir")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    progress = not args.no_progress

    ok = True
    if args.chexpert_dir:
        ok &= _report(
            "CheXpert",
            lambda: chexpert.load(
                args.chexpert_dir, frontal_only=not args.chexpert_all_views, progress=progress
            ),
            summarize_chexpert,
        )
    if args.nih_dir:
        ok &= _report(
            "NIH",
            lambda: nih.load(args.nih_dir, csv=args.nih_csv, exclude_ids=args.nih_exclude),
            summarize_nih,
        )
    if args.montgomery_dir:
        ok &= _report(
            "Montgomery",
            lambda: montgomery.load(args.montgomery_dir, progress=progress),
            summarize_montgomery,
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
