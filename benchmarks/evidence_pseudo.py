"""Evidence for the pseudo-label filter and ``recipes/pseudo_chexpert.py`` on the demo root.

The demo root knows the true masks of its external images (``_truth/``), so the pseudo
labels can be scored. For each seed (which SIIM labels are kept: ``data.labelled_fraction``,
and the training seed):

1. ``recipes/pseudo_chexpert.py`` trains the teacher on the kept SIIM labels (the supervised
   arm: same preset, EMA on, no pseudo data), filters the demo CheXpert frontal images with
   the published agreement rule and trains the student on SIIM + pseudo at ``--ratio``;
2. the same teacher labels the same images with a rule that keeps *every* label-1 image
   (its prediction as the mask, even empty): the unfiltered arm;
3. both pseudo-positive sets are scored against the truth: precision (share of kept
   positives that truly show a pneumothorax) and competition Dice of the pseudo masks.

Validation Dice of student and teacher at their LAST epoch (no checkpoint selection on the
reported fold) are reported as mean ± std over seeds, with the filter's throughput. With
``--teachers`` the teachers are not trained here but taken from another run per seed — e.g.
the supervised arm of ``benchmarks/evidence_mean_teacher.py``, so both studies share one
supervised baseline. A finished seed (its ``evidence_seed.json``) is reused when rerun.
Writes ``OUT/evidence_pseudo.json`` and ``.md``.

    python benchmarks/evidence_pseudo.py --seeds 0 1 2 --epochs 6 --size 64
    python benchmarks/evidence_pseudo.py --size 96 --batch-size 8 --epochs 35 \
        --teachers 'outputs/evidence_mean_teacher/supervised-seed{seed}/last.pt'
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from external_data import chexpert
from ssl_ptx.data import rle
from ssl_ptx.data.images import read_image
from ssl_ptx.engine.logging import read_metrics_csv
from ssl_ptx.fileio import atomic_write_bytes
from ssl_ptx.inference import Predictor
from ssl_ptx.metrics import dice_per_image
from ssl_ptx.pseudo import Decision, PseudoLabelFilter, PseudoRule, published_rules

ROOT = Path(__file__).resolve().parents[1]


def load_recipe() -> ModuleType:
    path = ROOT / "recipes" / "pseudo_chexpert.py"
    spec = importlib.util.spec_from_file_location("pseudo_chexpert", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class KeepEveryPositive(PseudoRule):
    """The unfiltered arm: every label-1 image, its prediction above 0.5 as the mask."""

    threshold: float = 0.5

    def claims(self, label: float) -> bool:
        return label == 1.0

    def needs_prediction(self, label: float) -> bool:
        return True

    def decide(self, label: float, probability: np.ndarray | None) -> Decision:
        mask = (probability > self.threshold).astype(np.uint8)
        return Decision(True, 1.0, "label_1", mask, int(mask.sum()))


def score_positives(manifest: pd.DataFrame, truth: pd.DataFrame, demo: Path) -> dict[str, float]:
    """Precision and mean competition Dice (vs the true masks) of the pseudo positives."""
    positives = manifest[manifest["label"] == 1.0]
    truth = truth.set_index("image_id")
    dices, true_positive = [], []
    for row in positives.itertuples():
        true_mask_path = demo / "_truth" / "chexpert" / f"{row.image_id}.png"
        target = read_image(true_mask_path) > 0
        mask = rle.decode(row.rle, target.shape) if row.rle != "-1" else np.zeros_like(target)
        dices.append(float(dice_per_image(mask[None], target[None])[0]))
        true_positive.append(bool(truth.at[row.image_id, "true_label"] == 1))
    return {
        "n": len(positives),
        "precision": float(np.mean(true_positive)) if true_positive else float("nan"),
        "dice": float(np.mean(dices)) if dices else float("nan"),
        "dice_true_positives": float(
            np.mean([d for d, t in zip(dices, true_positive, strict=True) if t])
        )
        if any(true_positive)
        else float("nan"),
    }


def last_epoch_dice(run_dir: Path) -> dict[str, float]:
    """Validation Dice of the trained model and of its EMA at the last epoch of a run."""
    last = read_metrics_csv(run_dir / "metrics.csv")[-1]
    return {"model": last["val_dice"], "ema": last.get("ema_val_dice", float("nan"))}


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    out = args.out / f"seed{seed}"
    record = out / "evidence_seed.json"
    if record.exists():
        return json.loads(record.read_text())
    started = time.perf_counter()
    common = [
        "--demo-dir", str(args.demo_dir), "--out", str(out), "--epochs", str(args.epochs),
        "--ratio", str(args.ratio), "--no-progress",
        "--set", f"data.size={args.size}", "--set", f"data.labelled_fraction={args.labelled}",
        "--set", f"data.labelled_seed={seed}", "--set", f"trainer.seed={seed}",
        "--set", f"data.cache_dir={args.out / 'cache'}", "--set", "data.num_workers=0",
    ]  # fmt: skip
    if args.batch_size:
        common += ["--set", f"data.batch_size={args.batch_size}"]
    if args.teachers:
        common += ["--teacher", args.teachers.format(seed=seed)]
    run = load_recipe().main(common)
    truth = pd.read_csv(args.demo_dir / "_truth" / "labels.csv")
    truth = truth[truth["dataset"] == "chexpert"]
    agreement = pd.read_csv(out / "pseudo" / "pseudo_manifest.csv")
    pool = chexpert.load(args.demo_dir / "chexpert", progress=False)
    predictor = Predictor.from_checkpoints([run.teacher_path], tta=("hflip",), progress=False)
    every = PseudoLabelFilter(
        predictor, [KeepEveryPositive(), *published_rules()[1:]], progress=False
    ).run(pool, out / "pseudo_every")
    teacher_dir = Path(args.teachers.format(seed=seed)).parent if args.teachers else out / "teacher"
    result = {
        "seed": seed,
        "teacher_val_dice": last_epoch_dice(teacher_dir)["model"],
        "teacher_ema_val_dice": last_epoch_dice(teacher_dir)["ema"],
        "student_val_dice": last_epoch_dice(out)["model"],
        "student_ema_val_dice": last_epoch_dice(out)["ema"],
        "student_exported_val_dice": run.student_dice,
        "student_source": run.student.source,
        "filter_images_per_second": run.images_per_second,
        "agreement": score_positives(agreement, truth, args.demo_dir),
        "every_label_1": score_positives(every.manifest, truth, args.demo_dir),
        "kept_negatives": run.audit["n_kept_negative"],
        "seconds": time.perf_counter() - started,
    }
    atomic_write_bytes(record, json.dumps(result, indent=2).encode())
    return result


def _mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else float("nan"),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = {
        "teacher val Dice (supervised), last epoch": lambda r: r["teacher_val_dice"],
        "student val Dice (SIIM + pseudo), last epoch": lambda r: r["student_val_dice"],
        "teacher's EMA val Dice, last epoch": lambda r: r["teacher_ema_val_dice"],
        "student's EMA val Dice, last epoch": lambda r: r["student_ema_val_dice"],
        "student − teacher (paired)": lambda r: r["student_val_dice"] - r["teacher_val_dice"],
        "agreement precision": lambda r: r["agreement"]["precision"],
        "agreement pseudo-mask Dice": lambda r: r["agreement"]["dice"],
        "agreement kept positives": lambda r: r["agreement"]["n"],
        "every label-1 precision": lambda r: r["every_label_1"]["precision"],
        "every label-1 pseudo-mask Dice": lambda r: r["every_label_1"]["dice"],
        "every label-1 positives": lambda r: r["every_label_1"]["n"],
        "filter images/s": lambda r: r["filter_images_per_second"],
    }
    return {name: _mean_std([float(get(r)) for r in runs]) for name, get in keys.items()}


def markdown(summary: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# Pseudo labels on the demo root",
        "",
        f"Demo root {args.demo_dir}, {args.labelled:.0%} of the SIIM training labels kept, "
        f"{args.size}², {args.epochs} epochs per model, ratio {args.ratio}, seeds "
        f"{args.seeds}.",
        "",
        "| measure | mean | std |",
        "| --- | ---: | ---: |",
    ]
    for name, value in summary.items():
        lines.append(f"| {name} | {value['mean']:.4f} | {value['std']:.4f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=ROOT / "demo_data")
    parser.add_argument("--out", type=Path, default=Path("/tmp/evidence_pseudo"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6, help="epochs of teacher and student")
    parser.add_argument("--size", type=int, default=64, help="training side in pixels")
    parser.add_argument("--labelled", type=float, default=0.25, help="SIIM labels kept")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, help="SIIM images per step (the preset's)")
    parser.add_argument(
        "--teachers",
        help="teacher checkpoint per seed, with {seed} (default: train one per seed)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(args, seed))
        print(json.dumps(runs[-1], indent=1))
    summary = summarise(runs)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "summary": summary}
    atomic_write_bytes(args.out / "evidence_pseudo.json", json.dumps(report, indent=2).encode())
    text = markdown(summary, args)
    atomic_write_bytes(args.out / "evidence_pseudo.md", text.encode())
    print(text)
    return report


if __name__ == "__main__":
    main()
