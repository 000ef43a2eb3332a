"""Evidence for the lung crop (issue 6) on the demo root: prints, writes JSON and markdown.

1. The lung pre-segmenter (recipes/train_lung_segmenter.py, demo preset): lung Dice and IoU of
   the held-out Montgomery images at native size, boxes and fallbacks.
2. Its boxes on the demo SIIM images (cached at the demo's native side): the share of
   pneumothorax pixels inside the box (target >= 99 %), the box's share of the image, and —
   because the demo's SIIM images are phantoms, not Montgomery films — whether the model finds
   their lungs: lung Dice against the phantom's own lung fields, which this script re-draws
   from the demo generator's seeds (checked: every lesion pixel must fall inside them).
3. The pneumothorax model (recipes/train_supervised.py, demo preset, --ptx-epochs epochs) on
   whole images (the usual cache at data.size) and on lung crops (cut from a cache at the
   demo's native side, squashed to data.size): the same input size. Both are scored on the
   validation fold at native size (crop predictions pasted back): competition Dice, Dice of
   positive images, false-positive rate, Dice of small lesions (the lowest-area tercile of the
   positive validation images), threshold-free figures (pixel average precision, the best
   threshold's Dice of positive images), lesion pixels at the model input, inference CPU time
   per image (batch 1, the crop pipeline including its lung model) and training CPU time per
   epoch (CPU seconds, not wall time: the machine may be shared).

    python benchmarks/evidence_lung_crop.py --demo-dir demo_data --out outputs/evidence_lung_crop \
        [--lung-checkpoint outputs/lung_demo/lung_segmenter.pt] [--ptx-epochs 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_ptx.config import TrainConfig, config_from_dict
from ssl_ptx.data.cache import CacheReader
from ssl_ptx.data.demo import SEED_TAGS, _plans, _uid, lung_masks, sample_anatomy
from ssl_ptx.data.images import resize_image, resize_mask
from ssl_ptx.engine.checkpoint import load_checkpoint
from ssl_ptx.engine.data import build_siim_datasets, siim_cache_path
from ssl_ptx.engine.logging import read_metrics_csv
from ssl_ptx.engine.lung_data import cache_lung_boxes
from ssl_ptx.fileio import atomic_write_bytes
from ssl_ptx.lung_crop import LUNG_REASON, Box, LungCropper, crop, crop_mask, paste
from ssl_ptx.metrics import dice_breakdown, dice_per_image
from ssl_ptx.models import create_model

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def recipe(name: str) -> Any:
    """Import ``recipes/<name>.py`` as a module."""
    sys.path.insert(0, str(RECIPES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(RECIPES))


def replayed_lungs(siim_dir: Path) -> dict[str, np.ndarray]:
    """The lung fields the demo generator drew for each SIIM image (image id → 0/1 mask).

    Re-runs the generator's first draws (plans, then each image's anatomy) from its marker's
    seed; relies on ``ssl_ptx.data.demo`` internals, which is why the caller checks the result.
    """
    marker = json.loads((siim_dir / "ssl_ptx_demo.json").read_text())
    n, size, seed = marker["n_siim"], marker["size"], marker["seed"]
    streams = np.random.SeedSequence([seed, SEED_TAGS["siim"]]).spawn(4)
    plans = _plans(np.random.default_rng(streams[0]), n, marker["positive_fraction"])
    lungs = {}
    for index, (plan, image_seed) in enumerate(zip(plans, streams[2].spawn(n), strict=True)):
        anatomy = sample_anatomy(
            np.random.default_rng(image_seed), view=plan.view, female=plan.female
        )
        left, right = lung_masks(anatomy, size)
        lungs[_uid(seed, index, "sop")] = left | right
    return lungs


def siim_box_figures(
    siim_dir: Path,
    cache: CacheReader,
    boxes: np.ndarray,
    reasons: tuple[str, ...],
    cropper: LungCropper,
) -> dict[str, Any]:
    """Pneumothorax pixels inside the boxes, and the lung model on the phantoms' lungs."""
    truth = replayed_lungs(siim_dir)
    inside = total = 0
    per_image, lung_dice, lesion_in_lungs = [], [], []
    box_area = []
    for row in range(len(cache)):
        image, mask = cache[row]
        box = Box.from_fractions(boxes[row], image.shape)
        box_area.append(box.area / image.size)
        lungs = resize_mask(truth[cache.image_ids[row]], image.shape)
        probability = cropper.predict_lung([image])[0]
        lung_dice.append(dice_per_image(probability > cropper.threshold, lungs)[0])
        if mask.any():
            kept = int(mask[box.slices].sum())
            inside, total = inside + kept, total + int(mask.sum())
            per_image.append(kept / mask.sum())
            lesion_in_lungs.append((mask & lungs).sum() / mask.sum())
    per_image = np.array(per_image)
    replay_check = float(np.min(lesion_in_lungs))
    if replay_check < 0.999:  # the generator changed: the re-drawn lungs are not the image's
        print(f"lung replay does not match the demo (lesion share {replay_check:.3f}): no Dice")
        lung_dice = [float("nan")]
    return {
        "siim_images": len(cache),
        "siim_positive_images": len(per_image),
        "ptx_pixels_in_box": inside / total,
        "ptx_min_image_share_in_box": float(per_image.min()),
        "ptx_images_below_99pct": int((per_image < 0.99).sum()),
        "siim_box_area": float(np.mean(box_area)),
        "siim_fallbacks": int(sum(reason != LUNG_REASON for reason in reasons)),
        "siim_lung_dice": float(np.mean(lung_dice)),
        "siim_lung_dice_min": float(np.min(lung_dice)),
        "replay_check_lesion_in_lungs": replay_check,
    }


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (loader workers)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def load_model(last_checkpoint: Path) -> tuple[torch.nn.Module, TrainConfig]:
    state = load_checkpoint(last_checkpoint, required=("model", "config"))
    config = config_from_dict(state["config"], TrainConfig(), source=str(last_checkpoint))
    model = create_model({**state["config"]["model"], "encoder_weights": None})
    model.load_state_dict(state["model"])
    return model.eval(), config


@torch.inference_mode()
def probabilities(model: torch.nn.Module, inputs: list[np.ndarray]) -> np.ndarray:
    """Sigmoid of the model on uint8 S×S images → float32 [B, S, S]."""
    tensor = torch.from_numpy(np.stack(inputs)).float().div_(255.0).unsqueeze(1)
    return torch.sigmoid(model(tensor)[:, 0]).numpy()


def whole_image_pipeline(model: torch.nn.Module, size: int) -> Callable:
    def predict(image: np.ndarray, box: Box | None = None) -> np.ndarray:
        return resize_image(probabilities(model, [resize_image(image, size)])[0], image.shape)

    return predict


def crop_pipeline(model: torch.nn.Module, size: int, cropper: LungCropper) -> Callable:
    def predict(image: np.ndarray, box: Box | None = None) -> np.ndarray:
        if box is None:  # timed runs find the box too
            box, _ = cropper.boxes([image])[0]
        return paste(probabilities(model, [crop(image, box, size)])[0], box, image.shape)

    return predict


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of ranking the positive entries of ``labels`` by ``scores``."""
    order = np.argsort(-scores.ravel(), kind="stable")
    hits = labels.ravel()[order] != 0
    precision_at_hits = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    return float(precision_at_hits.mean()) if hits.any() else float("nan")


def score(
    predict: Callable, cache: CacheReader, rows: list[int], boxes: np.ndarray, threshold: float
) -> dict[str, Any]:
    """Competition figures at the cached (native) size, threshold-free figures, and batch-1
    CPU time per image."""
    probabilities_, masks = [], []
    for row in rows:
        image, mask = cache[row]
        probabilities_.append(predict(image, Box.from_fractions(boxes[row], image.shape)))
        masks.append(mask)
    probabilities_, masks = np.stack(probabilities_), np.stack(masks)
    predictions = probabilities_ > threshold
    scores = dice_per_image(predictions, masks)
    areas = masks.reshape(len(masks), -1).sum(1)
    positive = areas > 0
    small = positive & (areas <= np.quantile(areas[positive], 1 / 3))
    breakdown = dice_breakdown(predictions, masks)
    best_positive_dice = max(
        dice_per_image(probabilities_[positive] > t, masks[positive]).mean()
        for t in np.arange(0.05, 1.0, 0.05)
    )
    predict(cache[rows[0]][0])  # warm-up
    times = []
    for row in rows[:30]:
        image, _ = cache[row]
        start = time.process_time()  # CPU time: robust to other jobs on a shared machine
        predict(image)
        times.append(time.process_time() - start)
    return {
        "dice": breakdown["dice"],
        "dice_positive": breakdown["dice_positive"],
        "false_positive_rate": breakdown["false_positive_rate"],
        "dice_small_lesions": float(scores[small].mean()),
        "n_small_lesions": int(small.sum()),
        "small_lesion_max_area_px": int(areas[small].max()),
        "n_positive": breakdown["n_positive"],
        "n_negative": breakdown["n_negative"],
        "pixel_average_precision": average_precision(probabilities_, masks),
        "best_threshold_dice_positive": float(best_positive_dice),
        "max_probability_positive_median": float(
            np.median(probabilities_[positive].reshape(positive.sum(), -1).max(1))
        ),
        "cpu_ms_per_image": 1000 * statistics.median(times),
    }


def lesion_input_pixels(
    cache: CacheReader, rows: list[int], boxes: np.ndarray, size: int
) -> dict[str, float]:
    """Lesion pixels the model sees at its input, whole image vs lung crop (positive rows;
    small = the lowest-area tercile at native size)."""
    native, whole, cropped = [], [], []
    for row in rows:
        _, mask = cache[row]
        if mask.any():
            box = Box.from_fractions(boxes[row], mask.shape)
            native.append(mask.sum())
            whole.append(resize_mask(mask, size).sum())
            cropped.append(crop_mask(mask, box, size).sum())
    native, whole, cropped = np.array(native), np.array(whole), np.array(cropped)
    small = native <= np.quantile(native, 1 / 3)
    return {
        "lesion_input_px_gain_median": float(np.median(cropped / whole)),
        "small_lesion_input_px_whole_median": float(np.median(whole[small])),
        "small_lesion_input_px_crop_median": float(np.median(cropped[small])),
    }


def markdown(figures: dict[str, Any]) -> str:
    lung, siim, runs = figures["lung"], figures["siim"], figures["ptx"]
    lines = [
        "| lung pre-segmenter (held-out Montgomery, native size) | value |",
        "| --- | --- |",
        f"| images | {lung['n_images']} |",
        f"| lung Dice (min) | {lung['lung_dice']:.4f} ({lung['lung_dice_min']:.4f}) |",
        f"| lung IoU | {lung['lung_iou']:.4f} |",
        f"| true lung inside the box | {lung['lung_in_box']:.2%} |",
        f"| box share of the image | {lung['box_area']:.1%} |",
        f"| full-image fallbacks | {lung['fallbacks']} |",
        "",
        "| its boxes on the demo SIIM images | value |",
        "| --- | --- |",
        f"| images (positive) | {siim['siim_images']} ({siim['siim_positive_images']}) |",
        f"| pneumothorax pixels inside the box | {siim['ptx_pixels_in_box']:.2%} |",
        f"| lowest share of one image | {siim['ptx_min_image_share_in_box']:.2%} |",
        f"| positive images below 99 % | {siim['ptx_images_below_99pct']} |",
        f"| box share of the image | {siim['siim_box_area']:.1%} |",
        f"| full-image fallbacks | {siim['siim_fallbacks']} |",
        f"| lung box pass, CPU ms / image | {siim['box_pass_cpu_ms_per_image']:.1f} |",
        f"| lung Dice vs the phantom's lungs (min) | {siim['siim_lung_dice']:.4f} "
        f"({siim['siim_lung_dice_min']:.4f}) |",
        "",
        "| pneumothorax model, validation fold at native size | whole image | lung crop |",
        "| --- | --- | --- |",
    ]
    rows = [
        ("competition Dice", "dice", "{:.4f}"),
        ("Dice, positive images", "dice_positive", "{:.4f}"),
        ("false-positive rate, negative images", "false_positive_rate", "{:.1%}"),
        ("Dice, small lesions (lowest-area tercile)", "dice_small_lesions", "{:.4f}"),
        ("pixel average precision (threshold-free)", "pixel_average_precision", "{:.4f}"),
        ("best-threshold Dice, positive images", "best_threshold_dice_positive", "{:.4f}"),
        ("median of max probability, positive images", "max_probability_positive_median", "{:.3f}"),
        ("inference CPU ms / image (batch 1)", "cpu_ms_per_image", "{:.1f}"),
        ("training CPU s / epoch", "train_cpu_s_per_epoch", "{:.1f}"),
    ]
    for title, key, spec in rows:
        lines.append(
            f"| {title} | {spec.format(runs['whole'][key])} | {spec.format(runs['crop'][key])} |"
        )
    inputs = figures["lesion_input"]
    lines += [
        "",
        "| lesion pixels at the model input (validation positives) | value |",
        "| --- | --- |",
        f"| median gain, crop / whole | {inputs['lesion_input_px_gain_median']:.2f}× |",
        "| small lesions, median pixels: whole / crop | "
        f"{inputs['small_lesion_input_px_whole_median']:.0f} / "
        f"{inputs['small_lesion_input_px_crop_median']:.0f} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo-dir", type=Path, default=Path("demo_data"), help="demo root")
    parser.add_argument("--out", type=Path, default=Path("outputs/evidence_lung_crop"))
    parser.add_argument(
        "--lung-checkpoint", type=Path, help="use this lung model instead of training one"
    )
    parser.add_argument("--ptx-epochs", type=int, default=16, help="pneumothorax model epochs")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="score the pneumothorax runs already in OUT (last.pt) instead of training them",
    )
    parser.add_argument(
        "--ptx-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra --set for both pneumothorax runs (e.g. data.size=64 for a smoke test)",
    )
    args = parser.parse_args(argv)
    cache_dir = args.out / "cache"
    side = json.loads((args.demo_dir / "siim" / "ssl_ptx_demo.json").read_text())["size"]

    lung_checkpoint = args.lung_checkpoint
    if lung_checkpoint is None:
        lung_checkpoint = recipe("train_lung_segmenter").main(
            [
                *("--demo-dir", str(args.demo_dir), "--out", str(args.out / "lung")),
                *("--set", f"data.cache_dir={cache_dir}", "--no-progress"),
            ]
        )
    lung_state = load_checkpoint(lung_checkpoint, required=("metrics",))
    lung = {k: lung_state["metrics"][k] for k in ("n_images", "lung_dice", "lung_dice_min")}
    lung.update({k: lung_state["metrics"][k] for k in ("lung_iou", "lung_in_box", "box_area")})
    lung["fallbacks"] = lung_state["metrics"]["fallbacks"]
    cropper = LungCropper.from_checkpoint(lung_checkpoint)

    train_supervised = recipe("train_supervised")

    def train(name: str, *sets: str) -> tuple[torch.nn.Module, TrainConfig, float, float]:
        """(model, config, last validation Dice, training CPU s per epoch) of one run."""
        run_dir = args.out / f"ptx_{name}"
        record = run_dir / "train_cpu.json"
        if not (args.reuse and record.is_file()):
            cpu_before = cpu_seconds()
            result = train_supervised.main(
                [
                    *("--demo-dir", str(args.demo_dir), "--out", str(run_dir)),
                    *("--epochs", str(args.ptx_epochs), "--no-progress"),
                    *("--set", f"data.cache_dir={cache_dir}"),
                    *[option for value in [*args.ptx_set, *sets] for option in ("--set", value)],
                ]
            )
            cpu = (cpu_seconds() - cpu_before) / result.epochs
            atomic_write_bytes(record, json.dumps({"cpu_s_per_epoch": cpu}).encode())
        model, config = load_model(run_dir / "last.pt")
        last = read_metrics_csv(run_dir / "metrics.csv")[-1]["val_dice"]
        return model, config, last, json.loads(record.read_text())["cpu_s_per_epoch"]

    # whole images: the usual pipeline, cached at data.size (area-resampled once)
    runs = {"whole": train("whole")}
    # lung crops: cut from a cache at the demo's native side; the boxes are computed first
    config = runs["whole"][1]
    native = dataclasses.replace(config.data, cache_dir=str(cache_dir), cache_size=side)
    build_siim_datasets(native, progress=False)
    cache = CacheReader(siim_cache_path(args.demo_dir / "siim", cache_dir, side))
    box_record = args.out / "lung_box_pass.json"  # its CPU time, kept for --reuse
    cpu_before = cpu_seconds()
    stored = cache_lung_boxes(cache, lung_checkpoint, progress=False)
    if not (args.reuse and box_record.is_file()):
        cpu_ms = 1000 * (cpu_seconds() - cpu_before) / len(cache)
        atomic_write_bytes(box_record, json.dumps({"cpu_ms_per_image": cpu_ms}).encode())
    runs["crop"] = train("crop", f"data.cache_size={side}", f"data.lung_crop={lung_checkpoint}")
    siim = siim_box_figures(args.demo_dir / "siim", cache, stored.boxes, stored.reasons, cropper)
    siim["box_pass_cpu_ms_per_image"] = json.loads(box_record.read_text())["cpu_ms_per_image"]

    metadata = cache.metadata()
    rows = np.flatnonzero(metadata["fold"].to_numpy() == config.data.fold).tolist()
    pipelines = {
        "whole": whole_image_pipeline(runs["whole"][0], config.data.size),
        "crop": crop_pipeline(runs["crop"][0], config.data.size, cropper),
    }
    ptx = {}
    for name, predict in pipelines.items():
        ptx[name] = score(predict, cache, rows, stored.boxes, config.trainer.threshold)
        ptx[name]["train_cpu_s_per_epoch"] = runs[name][3]
        ptx[name]["trainer_val_dice_last_epoch"] = runs[name][2]
    figures = {
        "demo_dir": str(args.demo_dir),
        "lung_checkpoint": str(lung_checkpoint),
        "ptx_epochs": args.ptx_epochs,
        "size": config.data.size,
        "cache_size": side,
        "lung": lung,
        "siim": siim,
        "ptx": ptx,
        "lesion_input": lesion_input_pixels(cache, rows, stored.boxes, config.data.size),
    }
    text = markdown(figures)
    print(text)
    atomic_write_bytes(args.out / "evidence.json", json.dumps(figures, indent=2).encode())
    atomic_write_bytes(args.out / "evidence.md", text.encode())
    return figures


if __name__ == "__main__":
    main()
