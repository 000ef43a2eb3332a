"""Checkpoints → probability maps → post-processing rule → submission.csv, with pictures.

Images: a folder of DICOMs (--dicom-dir, e.g. the SIIM test set), or by default the validation
fold of the first checkpoint's training run (its data.siim_dir, or the demo root's siim/ folder;
--data-dir overrides the folder), where the truth is known and the Dice is printed.

Models: each CHECKPOINT is a Trainer weights file (checkpoints/best-epochNNN.pt); the network
is rebuilt from the run config stored in it. Several checkpoints are an ensemble whose
probabilities are averaged (--weights, one per member in order); a folder stands for its .pt
files, best first by the validation metric stored in each, so "RUN/checkpoints --weights 0.5
0.3 0.2" is the 3rd place's top-3 weighting; "A.pt,B.pt" (joined by a comma) is one model whose
WEIGHTS are the mean of A's and B's (checkpoints of one run). Horizontal-flip TTA is on
unless --no-tta; --tta NAME... chooses the augmentations (hflip, rot<deg>, scale<s>, clahe:
e.g. --tta hflip rot-10 rot10 scale1.1; see ssl_ptx.tta). --lung-crop LUNG.pt crops every
image to the lung box predicted by a lung model (lung_segmenter.pt of
recipes/train_lung_segmenter.py, with its crop settings) before segmenting and pastes the maps
back.

Post-processing: --rule RULE.json (written by an earlier run or ssl_ptx.postprocess.save_rule),
or --tune-on-val: search the 1st place's triplet (top threshold, min area above it, bottom
threshold; with a presence head also the 4th place's presence gate) on the run's validation
fold, maximising the competition Dice; default: probability > 0.5 (the 3rd place).

Gating (--gate): an image is empty when an image-level score is below a threshold, tuned with
the triplet by --tune-on-val (or stored in the --rule file): "classifier" (the probability of
the image classifiers given with --classifier CLASSIFIER.pt..., from
recipes/train_classifier.py), "max_pixel" (the 8th place's score: each model's largest pixel
probability, averaged over the ensemble), "presence" (the models' presence heads; the default
when they have one), or "none".

Outputs in --out: submission.csv (one row per image, -1 when empty), probabilities.h5 (the
maps, uint8 by default; ssl_ptx.inference.ProbabilityStore.open reads it), rule.json (the rule
used; keep it beside the checkpoints), skipped.csv (image_id, path, error of the images that
could not be read; they are left out of everything else, and the run goes on),
overlays/<image_id>.png for --overlays images with the predicted mask outlined, and
contact_sheet.png of the same images.

Examples:
  python recipes/predict.py outputs/demo_supervised/checkpoints --weights 0.5 0.3 0.2 --tune-on-val
  python recipes/predict.py f0/best-a.pt f0/best-b.pt f0/best-c.pt --weights 0.5 0.3 0.2 \\
      --dicom-dir /data/siim/stage_2_images --rule rule.json --stage 2 \\
      --sample-submission /data/siim/stage_2_sample_submission.csv --out sub/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ssl_ptx.cli import configure_logging
from ssl_ptx.data import rle
from ssl_ptx.data.cache import write_skipped_csv
from ssl_ptx.data.images import read_image
from ssl_ptx.engine import CheckpointError, load_checkpoint
from ssl_ptx.engine.callbacks import monitor_mode
from ssl_ptx.inference import (
    Predictor,
    ProbabilityStore,
    manifest_from_dicom_folder,
    run_validation_manifest,
)
from ssl_ptx.lung_crop import LungCropper
from ssl_ptx.metrics import dice_breakdown, dice_per_image
from ssl_ptx.postprocess import (
    GATE_GRID,
    TRIPLET_GRID,
    MaskRule,
    PresenceGate,
    Threshold,
    TripletThreshold,
    load_rule,
    save_rule,
    tune_rule,
)
from ssl_ptx.submission import check_submission, write_submission
from ssl_ptx.viz import contact_sheet, outline_mask, write_png

PRESENCE_GRID = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help="Trainer weights files or a checkpoints/ folder (ranked); 'A.pt,B.pt' averages",
    )
    parser.add_argument(
        "--weights", type=float, nargs="+", help="ensemble weight per CHECKPOINT (default equal)"
    )
    parser.add_argument("--no-tta", action="store_true", help="no TTA (overrides --tta)")
    parser.add_argument(
        "--tta",
        nargs="+",
        default=["hflip"],
        metavar="NAME",
        help="TTA views: hflip, rot<deg>, scale<s>, clahe (default: hflip)",
    )
    parser.add_argument(
        "--classifier",
        type=Path,
        nargs="+",
        default=[],
        metavar="CLASSIFIER_PT",
        help="image classifiers (recipes/train_classifier.py) for --gate classifier",
    )
    parser.add_argument(
        "--gate",
        choices=["none", "classifier", "max_pixel", "presence"],
        help="image-level score that can empty an image (default: presence heads if any)",
    )
    parser.add_argument("--lung-crop", type=Path, metavar="LUNG_PT", help="lung model checkpoint")
    parser.add_argument(
        "--dicom-dir", type=Path, help="predict these DICOMs (default: the run's validation fold)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="SIIM folder of the run's validation fold (default: from the checkpoint's config)",
    )
    rules = parser.add_mutually_exclusive_group()
    rules.add_argument("--rule", type=Path, help="post-processing rule JSON")
    rules.add_argument(
        "--tune-on-val",
        action="store_true",
        help="tune the triplet rule (and presence gate) on the run's validation fold",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/predict"), help="output folder")
    parser.add_argument(
        "--store-dtype",
        choices=["uint8", "float16"],
        default="uint8",
        help="how probabilities.h5 keeps the maps (default uint8)",
    )
    parser.add_argument(
        "--stage", type=int, choices=[1, 2], help="check that image ids are of this stage"
    )
    parser.add_argument(
        "--sample-submission", type=Path, help="check submission.csv against this file"
    )
    parser.add_argument(
        "--overlays", type=int, default=24, help="images drawn with their masks (default 24)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--device", help="cuda, cpu, cuda:N (default: CUDA when available)")
    parser.add_argument("--workers", type=int, default=0, help="processes reading the images")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def expand_checkpoints(arguments: list[str]) -> list[Path | list[Path]]:
    """Ensemble members: a file; "A.pt,B.pt" (weights averaged); a folder's ``*.pt`` files,
    best first by the metric each stored (the run's ``trainer.monitor``)."""
    members: list[Path | list[Path]] = []
    for argument in arguments:
        path = Path(argument)
        if "," in argument:
            members.append([Path(part) for part in argument.split(",")])
        elif path.is_dir():
            ranked = []
            for file in sorted(path.glob("*.pt")):
                state = load_checkpoint(file, required=("metrics", "config"))
                monitor = state["config"].get("trainer", {}).get("monitor", "val_dice")
                score = float(state["metrics"].get(monitor, np.nan))
                ranked.append((-score if monitor_mode(monitor) == "max" else score, file))
            if not ranked:
                raise SystemExit(f"error: {path} holds no .pt checkpoint")
            members.extend(file for _, file in sorted(ranked))
            print(f"{path}: {', '.join(file.name for _, file in sorted(ranked))} (best first)")
        else:
            members.append(path)
    return members


def truth_masks(manifest: pd.DataFrame) -> dict[str, np.ndarray]:
    """Image id → truth mask at native size, from the manifest's RLE."""
    return {
        row.image_id: rle.decode(row.rle, (int(row.height), int(row.width)))
        for row in manifest.itertuples()
    }


def tune(
    predictor: Predictor,
    store: ProbabilityStore,
    manifest: pd.DataFrame,
    progress: bool,
    gate_grid: list[float] | None = PRESENCE_GRID,
) -> MaskRule:
    """Triplet (and, with ``gate_grid`` and image scores in the store, the gate's threshold)
    tuned on the maps of ``manifest``'s images."""
    if any(image_id not in store for image_id in manifest["image_id"]):
        store = predictor.predict(manifest)
    ids = [image_id for image_id in manifest["image_id"] if image_id in store]  # readable ones
    truths = truth_masks(manifest)
    presence = store.presences(ids)
    rule: MaskRule = TripletThreshold()
    grid = dict(TRIPLET_GRID)
    if gate_grid is not None and not np.isnan(presence).any():
        rule = PresenceGate(rule)
        grid = {f"rule.{name}": values for name, values in grid.items()}
        grid["threshold"] = gate_grid
    result = tune_rule(
        rule,
        grid,
        (store.stored(i) for i in ids),
        (truths[i] for i in ids),
        presence if isinstance(rule, PresenceGate) else None,
        progress=progress,
    )
    print(f"tuned on {result.n_images} validation images; best 5 of {len(result.table)}:")
    print(result.table.head(5).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return result.rule


def report_dice(
    store: ProbabilityStore, truths: dict[str, np.ndarray], rules: dict[str, MaskRule]
) -> None:
    ids = list(truths)
    target = np.stack([truths[i] for i in ids])
    for name, rule in rules.items():
        masks = np.stack([rule(store.stored(i), store.presence(i)) for i in ids])
        b = dice_breakdown(masks, target)
        print(
            f"{name}: Dice {b['dice']:.4f} | positive images {b['dice_positive']:.4f} "
            f"({b['n_positive']}) | false positives {b['false_positive_rate']:.1%} of "
            f"{b['n_negative']} empty images"
        )


def write_pictures(
    store: ProbabilityStore,
    manifest: pd.DataFrame,
    rule: MaskRule,
    out: Path,
    n: int,
    truths: dict[str, np.ndarray] | None,
) -> None:
    """Overlays (predicted mask outlined) of the ``n`` images with the most predicted plus true
    lesion pixels, and a contact sheet of them captioned with the areas (and the Dice)."""
    paths = dict(zip(manifest["image_id"], manifest["path"], strict=True))
    masks = {i: rule(store.stored(i), store.presence(i)) for i in store.image_ids}
    truth_area = {i: int(np.count_nonzero(truths[i])) if truths else 0 for i in masks}
    chosen = sorted(masks, key=lambda i: -(int(masks[i].sum()) + truth_area[i]))[:n]
    images, titles = [], []
    for image_id in chosen:
        image = read_image(paths[image_id])
        write_png(out / "overlays" / f"{image_id}.png", outline_mask(image, masks[image_id]))
        images.append(image)
        title = f"{image_id[-8:]} pred {int(masks[image_id].sum())}"
        if truths:
            dice = dice_per_image(masks[image_id], truths[image_id])[0]
            title += f" true {truth_area[image_id]} D{dice:.2f}"
        titles.append(title)
    if images:
        sheet = contact_sheet(images, [masks[i] for i in chosen], titles)
        write_png(out / "contact_sheet.png", sheet)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    progress = not args.no_progress
    entries = expand_checkpoints(args.checkpoints)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        cropper = None
        if args.lung_crop is not None:
            cropper = LungCropper.from_checkpoint(args.lung_crop, device=device)
        predictor = Predictor.from_checkpoints(
            entries,
            weights=args.weights,
            tta=() if args.no_tta else tuple(args.tta),
            lung_cropper=cropper,
            classifier_checkpoints=args.classifier,
            gate=None if args.gate in (None, "none") else args.gate,
            device=device,
            batch_size=args.batch_size,
            progress=progress,
        )
        rule = load_rule(args.rule) if args.rule is not None else Threshold(0.5)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    print(predictor)

    validation = None
    if args.dicom_dir is None or args.tune_on_val:
        first = entries[0] if isinstance(entries[0], Path) else entries[0][0]
        run = load_checkpoint(first, required=("config",))
        try:
            validation = run_validation_manifest(run, args.data_dir)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"error: {error} (use --data-dir)") from None
    target = manifest_from_dicom_folder(args.dicom_dir) if args.dicom_dir else validation
    store_path = args.out / "probabilities.h5"
    with ProbabilityStore(store_path, dtype=args.store_dtype) as writing:
        predictor.predict(target, writing, num_workers=args.workers)
    store = ProbabilityStore.open(store_path)
    write_skipped_csv(args.out / "skipped.csv", predictor.skipped)
    if predictor.skipped:
        print(f"skipped {len(predictor.skipped)} unreadable image(s): see {args.out}/skipped.csv")
        target = target[target["image_id"].isin(store.image_ids)]
        if args.dicom_dir is None:
            validation = target

    if args.tune_on_val:
        gate_grid = {"none": None, "classifier": GATE_GRID, "max_pixel": GATE_GRID}
        rule = tune(predictor, store, validation, progress, gate_grid.get(args.gate, PRESENCE_GRID))
        if args.dicom_dir is None:
            print("note: tuned and scored on the same images, so the tuned Dice is optimistic")
    save_rule(rule, args.out / "rule.json")
    print(f"rule: {rule}")

    masks = ((i, rule(store.stored(i), store.presence(i))) for i in store.image_ids)
    submission = write_submission(masks, args.out / "submission.csv", stage=args.stage)
    truths = truth_masks(target) if args.dicom_dir is None else None
    if truths is not None:
        report_dice(store, truths, {"p > 0.5": Threshold(0.5), "rule": rule})
    write_pictures(store, target, rule, args.out, args.overlays, truths)
    print(f"outputs: {args.out} (submission.csv, probabilities.h5, rule.json, overlays/)")
    if args.sample_submission is not None:
        check = check_submission(submission, args.sample_submission)
        print(check.summary())
        return 0 if check.ok else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
