"""Inference figures: throughput with and without TTA, probability storage, the rule tuner, and
what a tuned post-processing rule is worth on the demo root.

1. Throughput: images/s of ``Predictor.predict_batch`` on the demo preset's model
   (ResNet18 UNet-CBAM, random weights: speed does not depend on them) at 128², with and
   without horizontal-flip TTA, and end to end over the demo root's validation DICOMs
   (reading, resizing, pasting back at native size included).
2. Storage of N probability maps (default 2,000): peak memory of an in-memory
   ``ProbabilityStore`` (uint8) against a list of float32 maps at --store-side (default 512;
   at 1024² the figures are 4× larger, printed as computed), and the peak RSS and file size of
   the HDF5 store written at 1024². Maps are synthetic: a faint smooth background, a lesion
   on 22 % of them.
3. Tuner: a 6×6×4 triplet grid over N synthetic 1024² uint8 maps with truth masks, against
   applying each rule to each map (timed on a subset, extrapolated), and a grid that also
   removes small components.
4. With --checkpoint (a Trainer checkpoint, e.g. of the demo preset): on its run's validation
   fold (the only images it did not train on), split into two halves stratified by label, the
   triplet tuned on one half against p > 0.5 on the other, both ways, over --splits random
   halvings (mean and spread of the difference); Dice at 0.5 without and with TTA, and the
   end-to-end speed (reading the DICOMs included).

    python benchmarks/bench_inference.py [--checkpoint RUN/checkpoints/best-epochNNN.pt]
        [--maps 2000] [--store-side 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch

from ssl_ptx.config import config_to_dict, preset
from ssl_ptx.data import rle
from ssl_ptx.inference import Predictor, ProbabilityStore, load_model, run_validation_manifest
from ssl_ptx.metrics import dice_breakdown, dice_per_image
from ssl_ptx.models import create_model
from ssl_ptx.postprocess import (
    TRIPLET_GRID,
    RemoveSmallComponents,
    Threshold,
    TripletThreshold,
    tune_rule,
)

POSITIVE_SHARE = 0.22
PARTS = ("throughput", "storage", "tuner", "held_out")


def _status_kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS; returns the RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_kib("VmRSS")


def throughput(n_images: int, batch: int, repeats: int, size: int) -> dict[str, float]:
    """Best-of-``repeats`` images/s without and with TTA, the two timed alternately so that a
    change in the machine's load hits both."""
    torch.manual_seed(0)
    model = create_model(config_to_dict(preset("demo").model))
    images = torch.rand(n_images, 1, size, size)
    predictors = {
        "no_tta": Predictor(model, tta=(), size=size),
        "hflip_tta": Predictor(model, tta=("hflip",), size=size),
    }
    best = dict.fromkeys(predictors, float("inf"))
    for _ in range(repeats):
        for name, predictor in predictors.items():
            predictor.predict_batch(images[:batch])  # warm-up
            start = time.perf_counter()
            for first in range(0, n_images, batch):
                predictor.predict_batch(images[first : first + batch])
            best[name] = min(best[name], time.perf_counter() - start)
    return {
        "size": size,
        "threads": torch.get_num_threads(),
        "no_tta_img_s": n_images / best["no_tta"],
        "hflip_tta_img_s": n_images / best["hflip_tta"],
        "tta_cost_ratio": best["hflip_tta"] / best["no_tta"],
    }


def synthetic_maps(n: int, side: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(uint8 codes H×W, bool truth)``: a faint smooth background (p < 0.06) and, on 22 % of
    the maps, a lesion of probability up to ~0.95 whose core is the truth."""
    rng = np.random.default_rng(seed)
    small = 64
    rows, cols = np.ogrid[:small, :small]
    for _ in range(n):
        field = cv2.GaussianBlur(rng.random((small, small)).astype(np.float32), (0, 0), 4)
        prob = 0.06 * (field - field.min()) / max(float(np.ptp(field)), 1e-6)
        truth_small = np.zeros((small, small), np.float32)
        if rng.random() < POSITIVE_SHARE:
            cy, cx = rng.integers(12, 52, 2)
            ry, rx = rng.integers(3, 12, 2)
            distance = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2
            prob = np.maximum(prob, 0.95 * np.exp(-(distance**2)))
            truth_small = (distance <= 1.0).astype(np.float32)
        codes = np.rint(cv2.resize(prob, (side, side)) * 255).astype(np.uint8)
        yield codes, cv2.resize(truth_small, (side, side)) >= 0.5


def storage(n: int, side: int, big_side: int) -> dict[str, float]:
    maps = [codes for codes, _ in synthetic_maps(50, side, seed=1)]
    ids = [f"img{i:05d}" for i in range(n)]

    def measure(fill) -> tuple[float, float]:
        before = _reset_peak()
        tracemalloc.start()
        kept = fill()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        growth = (_status_kib("VmHWM") - before) / 1024
        del kept
        return peak / 2**20, growth

    def fill_store():
        store = ProbabilityStore()
        for image_id, codes in zip(ids, itertools.cycle(maps)):
            store.add(image_id, codes)
        return store

    def fill_float32():
        return [(codes / np.float32(255)) for _, codes in zip(ids, itertools.cycle(maps))]

    uint8_traced, uint8_rss = measure(fill_store)
    float_traced, float_rss = measure(fill_float32)
    scale = (big_side / side) ** 2
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "maps.h5"
        before = _reset_peak()
        start = time.perf_counter()
        with ProbabilityStore(path) as store:
            for image_id, (codes, _) in zip(ids, synthetic_maps(n, big_side, seed=2), strict=True):
                store.add(image_id, codes)
        write_s = time.perf_counter() - start
        h5_rss = (_status_kib("VmHWM") - before) / 1024
        file_mib = path.stat().st_size / 2**20
    return {
        "maps": n,
        "side": side,
        "uint8_store_traced_mib": uint8_traced,
        "uint8_store_rss_growth_mib": uint8_rss,
        "float32_list_traced_mib": float_traced,
        "float32_list_rss_growth_mib": float_rss,
        "memory_ratio": float_traced / uint8_traced,
        f"uint8_at_{big_side}_gib_computed": uint8_traced * scale / 1024,
        f"float32_at_{big_side}_gib_computed": float_traced * scale / 1024,
        f"hdf5_at_{big_side}_file_mib": file_mib,
        f"hdf5_at_{big_side}_rss_growth_mib": h5_rss,
        f"hdf5_at_{big_side}_write_s": write_s,
    }


def _naive_seconds_per_pair(
    rule: TripletThreshold, pairs: list[tuple[np.ndarray, np.ndarray]]
) -> float:
    """Seconds to apply one rule to one map and score it, the way a loop over rules does."""
    candidates = [
        rule.with_parameters(dict(zip(TRIPLET_GRID, values, strict=True)))
        for values in itertools.product(*TRIPLET_GRID.values())
    ][:12]
    start = time.perf_counter()
    for candidate in candidates:
        for codes, truth in pairs:
            dice_per_image(candidate(codes), truth)
    return (time.perf_counter() - start) / (len(candidates) * len(pairs))


def tuner(n: int, side: int) -> dict[str, float]:
    start = time.perf_counter()
    for _ in synthetic_maps(n, side, seed=3):
        pass
    generate_s = time.perf_counter() - start

    def timed(rule, grid) -> tuple[float, int]:
        # the maps and the truths come from one generator (tee keeps at most one pair)
        maps, truths = itertools.tee(synthetic_maps(n, side, seed=3))
        first = time.perf_counter()
        result = tune_rule(rule, grid, (m for m, _ in maps), (t for _, t in truths), progress=False)
        return time.perf_counter() - first - generate_s, len(result.table)

    triplet_s, points = timed(TripletThreshold(), TRIPLET_GRID)
    components_grid = {f"rule.{k}": v for k, v in TRIPLET_GRID.items()}
    components_grid["min_area"] = [0.0, 100 / 1024**2, 400 / 1024**2]
    components_s, components_points = timed(
        RemoveSmallComponents(TripletThreshold()), components_grid
    )
    pairs = list(itertools.islice(synthetic_maps(n, side, seed=3), 40))
    naive_pair_s = _naive_seconds_per_pair(TripletThreshold(), pairs)
    naive_s = naive_pair_s * n * points
    return {
        "maps": n,
        "side": side,
        "grid_points": points,
        "triplet_tune_s": triplet_s,
        "naive_estimate_s": naive_s,
        "speedup": naive_s / triplet_s,
        "with_components_grid_points": components_points,
        "with_components_tune_s": components_s,
        "map_generation_s_excluded": generate_s,
    }


def _halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    first, second = [], []
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        first.extend(members[::2])
        second.extend(members[1::2])
    return np.sort(first), np.sort(second)


def held_out_dice(checkpoint: Path, siim_dir: Path | None, splits: int) -> dict[str, float]:
    model, info = load_model(checkpoint)
    size = info["config"]["data"]["size"]
    manifest = run_validation_manifest(info, siim_dir)
    truths = [
        rle.decode(code, (int(h), int(w)))
        for code, h, w in zip(manifest["rle"], manifest["height"], manifest["width"], strict=True)
    ]
    ids = manifest["image_id"].tolist()
    results: dict[str, float] = {"images": len(ids), "positives": int(manifest["label"].sum())}
    stores = {}
    for name, tta in (("no_tta", ()), ("hflip_tta", ("hflip",))):
        predictor = Predictor(model, tta=tta, size=size, batch_size=16, progress=False)
        start = time.perf_counter()
        stores[name] = predictor.predict(manifest)
        results[f"{name}_end_to_end_img_s"] = len(ids) / (time.perf_counter() - start)
        masks = np.stack([Threshold(0.5)(stores[name].stored(i)) for i in ids])
        results[f"{name}_dice_at_0.5"] = dice_breakdown(masks, np.stack(truths))["dice"]
    store = stores["hflip_tta"]
    tuned_scores, plain_scores, chosen = [], [], []
    for seed in range(splits):
        first, second = _halves(manifest["label"].to_numpy(), seed=seed)
        for tune_on, test_on in ((first, second), (second, first)):
            result = tune_rule(
                TripletThreshold(),
                TRIPLET_GRID,
                (store.stored(ids[i]) for i in tune_on),
                (truths[i] for i in tune_on),
                progress=False,
            )
            chosen.append(result.rule)
            test_target = np.stack([truths[i] for i in test_on])
            for rule, scores in ((result.rule, tuned_scores), (Threshold(0.5), plain_scores)):
                masks = np.stack([rule(store.stored(ids[i])) for i in test_on])
                scores.append(dice_breakdown(masks, test_target))
    for name, scores in (("tuned", tuned_scores), ("plain_0.5", plain_scores)):
        for key in ("dice", "dice_positive", "false_positive_rate"):
            results[f"held_out_{name}_{key}"] = float(np.nanmean([s[key] for s in scores]))
    gains = np.array(
        [t["dice"] - p["dice"] for t, p in zip(tuned_scores, plain_scores, strict=True)]
    )
    results["held_out_evaluations"] = len(gains)
    results["tuned_minus_plain_dice_mean"] = float(gains.mean())
    results["tuned_minus_plain_dice_std"] = float(gains.std(ddof=1)) if len(gains) > 1 else 0.0
    results["tuned_better_share"] = float((gains > 0).mean())
    results["tuned_worse_share"] = float((gains < 0).mean())
    print("  rules chosen:", ", ".join(sorted({_short(rule) for rule in chosen})))
    return results


def _short(rule: TripletThreshold) -> str:
    return f"({rule.top:g}, {rule.min_area * 1024**2:.0f} px@1024², {rule.bottom:g})"


def _print(title: str, figures: dict[str, float]) -> None:
    print(title)
    for key, value in figures.items():
        print(f"  {key:38s} {value:.4g}" if isinstance(value, float) else f"  {key:38s} {value}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint for the Dice part")
    parser.add_argument("--siim-dir", type=Path, help="the checkpoint run's SIIM folder")
    parser.add_argument(
        "--maps", type=int, default=2000, help="maps in the storage and tuner parts"
    )
    parser.add_argument("--store-side", type=int, default=512, help="side of in-memory maps")
    parser.add_argument("--tuner-side", type=int, default=1024, help="side of the tuner's maps")
    parser.add_argument("--images", type=int, default=64, help="images in the throughput part")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best kept)")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="which parts to run (default all; held_out needs --checkpoint)",
    )
    parser.add_argument(
        "--splits", type=int, default=10, help="random halvings of the validation fold"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    figures: dict[str, dict[str, float]] = {}
    if "throughput" in args.parts:
        figures["throughput"] = throughput(args.images, 16, args.repeats, 128)
        _print("throughput (predict_batch, demo preset model, CPU)", figures["throughput"])
    if "storage" in args.parts:
        # in a fresh process, so that memory freed by the parts before does not hide the growth
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            figures["storage"] = pool.apply(storage, (args.maps, args.store_side, 1024))
        _print(f"storage of {args.maps} probability maps", figures["storage"])
    if "tuner" in args.parts:
        figures["tuner"] = tuner(args.maps, args.tuner_side)
        _print(f"tuner over {args.maps} maps", figures["tuner"])
    if "held_out" in args.parts and args.checkpoint is not None:
        figures["held_out"] = held_out_dice(args.checkpoint, args.siim_dir, args.splits)
        _print(
            "tuned rule vs p > 0.5 on held-out halves of the validation fold", figures["held_out"]
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
