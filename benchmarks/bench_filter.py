"""Pseudo-label filter throughput: ``PseudoLabelFilter.run`` end to end against the model alone.

The filter runs the demo preset's model (ResNet18 UNet-CBAM, random weights: speed does not
depend on them) over the frontal images of a CheXpert folder (the demo root's by default) with
the published rules, negatives checked by the model too (``agree_on_negatives``) so that every
labelled image is predicted. Its end-to-end rate (reading the JPEGs, resizing, predicting,
deciding, writing masks, decisions, audit, histogram and gallery) is compared with
``Predictor.predict_batch`` alone on the same images, already read and resized, in the same run:
the ratio is the share of the model's speed the filter keeps.

    python benchmarks/bench_filter.py [--chexpert-dir demo_data/chexpert] [--images 128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from external_data import chexpert
from ssl_ptx.config import config_to_dict, preset
from ssl_ptx.data.images import read_image, resize_image
from ssl_ptx.inference import Predictor
from ssl_ptx.models import create_model
from ssl_ptx.pseudo import PseudoLabelFilter, published_rules

ROOT = Path(__file__).resolve().parents[1]


def labelled_frontal(chexpert_dir: Path, n_images: int) -> pd.DataFrame:
    """The first ``n_images`` frontal images labelled 0 or 1 (the ones the rules predict)."""
    manifest = chexpert.load(chexpert_dir, progress=False)
    manifest = manifest[manifest["label"].isin([0.0, 1.0])]
    if manifest.empty:
        raise SystemExit(f"{chexpert_dir}: no frontal image labelled 0 or 1")
    return manifest.iloc[:n_images].reset_index(drop=True)


def model_alone(
    predictor: Predictor, manifest: pd.DataFrame, size: int, batch: int, repeats: int
) -> float:
    """Best-of-``repeats`` images/s of ``predict_batch`` on the images read and resized once."""
    images = np.stack([resize_image(read_image(path), size) for path in manifest["path"]])
    tensor = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    predictor.predict_batch(tensor[:batch])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for first in range(0, len(tensor), batch):
            predictor.predict_batch(tensor[first : first + batch])
        best = min(best, time.perf_counter() - start)
    return len(tensor) / best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--chexpert-dir",
        type=Path,
        default=ROOT / "demo_data" / "chexpert",
        help="CheXpert folder (default: the demo root's, written by `make demo`)",
    )
    parser.add_argument("--images", type=int, default=128, help="labelled images filtered")
    parser.add_argument("--size", type=int, default=128, help="working side in pixels")
    parser.add_argument("--batch", type=int, default=16, help="images per forward pass")
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats (best kept)")
    parser.add_argument("--tta", action="store_true", help="with horizontal-flip TTA")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    manifest = labelled_frontal(args.chexpert_dir, args.images)
    torch.manual_seed(0)
    model = create_model(config_to_dict(preset("demo").model))
    predictor = Predictor(
        model, tta=("hflip",) if args.tta else (), size=args.size, device="cpu", progress=False
    )
    rules = published_rules(agree_on_negatives=True)
    filter_seconds = float("inf")
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out_dir:
            pseudo = PseudoLabelFilter(predictor, rules, batch_size=args.batch, progress=False)
            result = pseudo.run(manifest, out_dir)
        filter_seconds = min(filter_seconds, result.seconds)
    figures = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "images": len(manifest),
        "size": args.size,
        "tta": bool(args.tta),
        "filter_end_to_end_img_s": len(manifest) / filter_seconds,
        "filter_model_time_img_s": result.images_per_second,
        "model_alone_img_s": model_alone(predictor, manifest, args.size, args.batch, args.repeats),
    }
    figures["end_to_end_share_of_model_speed"] = (
        figures["filter_end_to_end_img_s"] / figures["model_alone_img_s"]
    )
    print(
        f"PseudoLabelFilter over {len(manifest)} CheXpert images at {args.size}² "
        f"({figures['threads']} threads): {figures['filter_end_to_end_img_s']:.1f} img/s end to "
        f"end, model alone {figures['model_alone_img_s']:.1f} img/s "
        f"({figures['end_to_end_share_of_model_speed']:.0%} of it)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
