"""Evidence for gating and heavier TTA on the demo root (issue 11, parts 4 and 6).

(a) **Gating.** The supervised demo model (``outputs/demo_supervised``, its best checkpoint by
    validation Dice; trained on folds 1–4, validated on fold 0) predicts folds 0 and 1 with
    flip TTA. Each gate's threshold is tuned on **fold 1** (mask: probability > 0.5, the gate
    threshold on :data:`~ssl_ptx.postprocess.GATE_GRID`, maximising the competition Dice) and
    the tuned rule is scored on **fold 0**, the report fold, which no tuning sees. Fold 1 is
    part of the training folds of both models, so the tuned thresholds are in-sample there;
    each gate is therefore also reported at the fixed threshold 0.5. Gates:

    * none — probability > 0.5;
    * classifier — a ResNet18 image classifier (``recipes/train_classifier.py``, demo preset:
      128², balanced batches, same folds), trained first when ``--classifier`` is missing;
    * max_pixel — the 8th place's score (largest pixel probability);
    * presence — the presence head, if the model has one (the demo model does not).

(b) **TTA.** Competition Dice on fold 0 at probability > 0.5 with flip only, flip + rotations
    −20…20° in steps of 5, flip + zoom 0.9/1.1, flip + CLAHE; with the seconds per image.

Writes ``OUT/evidence.json`` and ``OUT/evidence.md`` and prints the tables.

    python benchmarks/evidence_toolbox.py
    python benchmarks/evidence_toolbox.py --classifier runs/cls/classifier.pt --out runs/evidence
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ssl_ptx.data import rle
from ssl_ptx.data.siim import load_siim
from ssl_ptx.engine import load_checkpoint
from ssl_ptx.fileio import atomic_write_bytes
from ssl_ptx.inference import Predictor, ProbabilityStore, load_model
from ssl_ptx.metrics import dice_breakdown
from ssl_ptx.postprocess import GATE_GRID, MaskRule, PresenceGate, Threshold, tune_rule
from ssl_ptx.tta import rotation_names

ROOT = Path(__file__).resolve().parents[1]
TTA_SETS = {
    "flip": ("hflip",),
    "flip + rotations ±20° step 5": ("hflip", *rotation_names(20, 5)),
    "flip + zoom 0.9/1.1": ("hflip", "scale0.9", "scale1.1"),
    "flip + CLAHE": ("hflip", "clahe"),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoints",
        type=Path,
        default=ROOT / "outputs" / "demo_supervised" / "checkpoints",
        help="segmentation checkpoint, or a folder: its best file by val_dice",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "evidence_toolbox")
    parser.add_argument(
        "--classifier",
        type=Path,
        help="classifier checkpoint (default: OUT/classifier/classifier.pt, trained if missing)",
    )
    parser.add_argument("--classifier-epochs", type=int, default=5)
    parser.add_argument("--tune-fold", type=int, default=1)
    parser.add_argument("--report-fold", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def best_checkpoint(path: Path) -> Path:
    """``path``, or the file of the folder ``path`` with the highest stored val_dice."""
    if path.is_file():
        return path
    files = sorted(path.glob("*.pt"))
    if not files:
        raise SystemExit(f"error: no checkpoint in {path}")
    return max(files, key=lambda f: load_checkpoint(f)["metrics"].get("val_dice", -1.0))


def train_classifier(out: Path, epochs: int, progress: bool) -> Path:
    """``recipes/train_classifier.py`` with the demo preset into ``out``; its export."""
    spec = importlib.util.spec_from_file_location(
        "train_classifier", ROOT / "recipes" / "train_classifier.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    argv = ["--epochs", str(epochs), "--out", str(out), "--set", "data.num_workers=0"]
    return module.main(argv + ([] if progress else ["--no-progress"])).path


def folds(info: dict[str, Any], wanted: Sequence[int]) -> dict[int, pd.DataFrame]:
    """The manifest rows of the wanted folds, under the run's fold split."""
    data = info["config"]["data"]
    siim_dir = data.get("siim_dir") or Path(data["demo_dir"]) / "siim"
    manifest = load_siim(siim_dir, n_folds=data["n_folds"], seed=data["fold_seed"], progress=False)
    return {k: manifest[manifest["fold"] == k].reset_index(drop=True) for k in wanted}


def truths(manifest: pd.DataFrame) -> list[np.ndarray]:
    return [rle.decode(r.rle, (int(r.height), int(r.width))) for r in manifest.itertuples()]


def score(
    rule: MaskRule, store: ProbabilityStore, manifest: pd.DataFrame, truth: list[np.ndarray]
) -> dict[str, float]:
    ids = manifest["image_id"].tolist()
    masks = np.stack([rule(store.stored(i), store.presence(i)) for i in ids])
    result = dice_breakdown(masks, np.stack(truth))
    return {
        "dice": result["dice"],
        "dice_positive": result["dice_positive"],
        "fp_rate": result["false_positive_rate"],
        "n_images": len(ids),
    }


def gating(
    checkpoint: Path, classifier: Path, sets: dict[int, pd.DataFrame], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """One row per gate: tuned on the tune fold, scored on the report fold."""
    progress = not args.no_progress
    model, _ = load_model(checkpoint)
    has_head = bool(getattr(model, "model_config", {}).get("presence_head"))
    gates = {"none": None, "max_pixel": "max_pixel", "classifier": "classifier"}
    if has_head:
        gates["presence"] = "presence"
    truth = {k: truths(m) for k, m in sets.items()}
    rows = []
    for name, gate in gates.items():
        predictor = Predictor.from_checkpoints(
            [checkpoint],
            tta=("hflip",),
            gate=gate,
            classifier_checkpoints=[classifier] if gate == "classifier" else (),
            progress=progress,
        )
        stores = {k: predictor.predict(m) for k, m in sets.items()}
        tune, report = args.tune_fold, args.report_fold
        if gate is None:
            rule, tuned_on = Threshold(0.5), "—"
            fixed = score(rule, stores[report], sets[report], truth[report])
        else:
            ids = sets[tune]["image_id"].tolist()
            tuned = tune_rule(
                PresenceGate(Threshold(0.5)),
                {"threshold": GATE_GRID},
                (stores[tune].stored(i) for i in ids),
                truth[tune],
                stores[tune].presences(ids),
                progress=False,
            )
            rule, tuned_on = tuned.rule, f"fold {tune}: Dice {tuned.score:.4f}"
            fixed_rule = PresenceGate(Threshold(0.5), 0.5)
            fixed = score(fixed_rule, stores[report], sets[report], truth[report])
        reported = score(rule, stores[report], sets[report], truth[report])
        scores = stores[report].presences(sets[report]["image_id"].tolist())
        rows.append(
            {
                "gate": name,
                "threshold": getattr(rule, "threshold", None) if gate else None,
                "tuned_on": tuned_on,
                **{f"tuned_{k}": v for k, v in reported.items()},
                **{f"fixed05_{k}": v for k, v in fixed.items()},
                "score_mean": float(np.nanmean(scores)) if gate else None,
            }
        )
    if not has_head:
        rows.append({"gate": "presence", "note": "the demo model has no presence head"})
    return rows


def tta_comparison(
    checkpoint: Path, manifest: pd.DataFrame, progress: bool
) -> list[dict[str, Any]]:
    truth = truths(manifest)
    rows = []
    for name, tta in TTA_SETS.items():
        predictor = Predictor.from_checkpoints([checkpoint], tta=tta, progress=progress)
        started = time.perf_counter()
        store = predictor.predict(manifest)
        seconds = time.perf_counter() - started
        rows.append(
            {
                "tta": name,
                "views": len(tta) + 1,
                **score(Threshold(0.5), store, manifest, truth),
                "seconds_per_image": seconds / len(manifest),
            }
        )
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Evidence: gating and heavier TTA on the demo root",
        "",
        f"Segmentation model: `{result['checkpoint']}` (flip TTA for the gates). Classifier: "
        f"`{result['classifier']}`. Report fold {result['report_fold']}; gate thresholds "
        f"tuned on fold {result['tune_fold']} (in the training folds of both models, so "
        "in-sample; the fixed threshold 0.5 is shown too).",
        "",
        "## (a) Gating — competition Dice on the report fold",
        "",
        "| gate | threshold (tuned) | Dice | Dice pos. | FP rate neg. | Dice @0.5 | FP rate @0.5 "
        "| tuning |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["gating"]:
        if "note" in row:
            lines.append(f"| {row['gate']} | — | — | — | — | — | — | {row['note']} |")
            continue
        threshold = "—" if row["threshold"] is None else f"{row['threshold']:.2f}"
        lines.append(
            f"| {row['gate']} | {threshold} | {row['tuned_dice']:.4f} | "
            f"{row['tuned_dice_positive']:.4f} | {row['tuned_fp_rate']:.3f} | "
            f"{row['fixed05_dice']:.4f} | {row['fixed05_fp_rate']:.3f} | {row['tuned_on']} |"
        )
    lines += [
        "",
        "## (b) TTA — report fold, probability > 0.5",
        "",
        "| TTA | views | Dice | Dice pos. | FP rate neg. | s / image |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["tta"]:
        lines.append(
            f"| {row['tta']} | {row['views']} | {row['dice']:.4f} | {row['dice_positive']:.4f} "
            f"| {row['fp_rate']:.3f} | {row['seconds_per_image']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    progress = not args.no_progress
    checkpoint = best_checkpoint(args.checkpoints)
    classifier = args.classifier or args.out / "classifier" / "classifier.pt"
    if not classifier.is_file():
        classifier = train_classifier(classifier.parent, args.classifier_epochs, progress)
    info = load_checkpoint(checkpoint)
    sets = folds(info, [args.tune_fold, args.report_fold])
    result = {
        "checkpoint": str(checkpoint),
        "classifier": str(classifier),
        "classifier_metrics": load_checkpoint(classifier)["metrics"],
        "tune_fold": args.tune_fold,
        "report_fold": args.report_fold,
        "gating": gating(checkpoint, classifier, sets, args),
        "tta": tta_comparison(checkpoint, sets[args.report_fold], progress),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "evidence.json", json.dumps(result, indent=2).encode())
    text = markdown(result)
    atomic_write_bytes(args.out / "evidence.md", text.encode())
    print(text)
    return result


if __name__ == "__main__":
    main()
