"""Evidence for gating and heavier TTA on the demo root (issue 11, parts 4 and 6).

(a) **Gating.** Two segmentation models, both the supervised demo preset (ResNet18 UNet-CBAM,
    128², trained on folds 1–4, validated on fold 0, best checkpoint by validation Dice):

    * "no head" — ``outputs/demo_supervised`` (symmetric Lovasz);
    * "presence head" — the same with ``model.presence_head=true`` and the loss symmetric
      Lovasz + 0.1 · presence BCE (:data:`PRESENCE_OVERRIDES`), started from the "no head"
      model's weights (the head at random) and trained for 5 epochs at lr 3e-4 into
      OUT/presence when ``--presence-checkpoints`` is missing. (Trained from scratch for the
      preset's 16 epochs, the same model had not found the lesions yet: positive-image Dice
      0.01; the "no head" model found them only in its 10th epoch.)

    Each predicts folds 0 and 1 with flip TTA. Each gate's threshold is tuned on **fold 1**
    (mask: probability > 0.5, the gate threshold on :data:`~ssl_ptx.postprocess.GATE_GRID`,
    maximising the competition Dice) and the tuned rule is scored on **fold 0**, the report
    fold, which no tuning sees. Fold 1 is part of the training folds of every model, so the
    tuned thresholds are in-sample there; each gate is therefore also reported at the fixed
    threshold 0.5. Gates:

    * none — probability > 0.5;
    * classifier (scratch) — a ResNet18 image classifier (``recipes/train_classifier.py``,
      demo preset: 128², balanced batches, 16 epochs, same folds) from a random
      initialisation;
    * classifier (seg. encoder) — the same for 6 epochs, its backbone initialised from the
      "no head" model's encoder (``--encoder-init``);
    * max_pixel — the 8th place's score (largest pixel probability);
    * presence — the presence head (the "presence head" model only).

    Missing classifiers are trained first. Per gate: the ROC AUC of its image score on the
    report fold (how well it tells positive from negative images), the competition Dice, the
    Dice of positive images, the false-positive rate of negative images, and the images it
    decides wrongly (negatives with a predicted mask, positives left empty).

(b) **TTA.** Competition Dice on fold 0 at probability > 0.5 with flip only, flip + rotations
    −20…20° in steps of 5, flip + zoom 0.9/1.1, flip + CLAHE; with the seconds per image.

Writes ``OUT/evidence.json`` and ``OUT/evidence.md`` and prints the tables.

    python benchmarks/evidence_toolbox.py
    python benchmarks/evidence_toolbox.py --classifier runs/cls/classifier.pt --out runs/evidence
    python benchmarks/evidence_toolbox.py --presence-checkpoints runs/seg_head/checkpoints
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import torch

from ssl_ptx.classifier import binary_auc
from ssl_ptx.config import apply_overrides, config_to_dict
from ssl_ptx.data import rle
from ssl_ptx.data.siim import load_siim
from ssl_ptx.engine import load_checkpoint, save_checkpoint
from ssl_ptx.fileio import atomic_write_bytes
from ssl_ptx.inference import Predictor, ProbabilityStore, load_model
from ssl_ptx.metrics import dice_breakdown
from ssl_ptx.models import create_model
from ssl_ptx.postprocess import GATE_GRID, MaskRule, PresenceGate, Threshold, tune_rule
from ssl_ptx.tta import rotation_names

ROOT = Path(__file__).resolve().parents[1]
TTA_SETS = {
    "flip": ("hflip",),
    "flip + rotations ±20° step 5": ("hflip", *rotation_names(20, 5)),
    "flip + zoom 0.9/1.1": ("hflip", "scale0.9", "scale1.1"),
    "flip + CLAHE": ("hflip", "clahe"),
}
#: the "presence head" model: the supervised demo preset with a presence head and its loss term
#: (0.1: Adam scales the head's own steps anyway; the small weight keeps the shared encoder
#: trained mostly by the mask loss, so that the masks stay comparable to the "no head" model's)
PRESENCE_OVERRIDES = (
    "model.presence_head=true",
    "loss.terms={symmetric_lovasz: 1, presence_bce: 0.1}",
)
#: its training from the "no head" model's weights: short, at a lower learning rate
PRESENCE_FINE_TUNING = ("trainer.epochs=5", "trainer.lr=3e-4")
#: classifier name → its folder under OUT and whether its backbone starts from the encoder of
#: the "no head" segmentation model
CLASSIFIERS = {
    "classifier (scratch)": ("classifier", False),
    "classifier (seg. encoder)": ("classifier_init", True),
}
#: epochs of a classifier trained here: the preset's from scratch, fewer from the encoder
CLASSIFIER_EPOCHS = {"classifier": None, "classifier_init": 6}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoints",
        type=Path,
        default=ROOT / "outputs" / "demo_supervised" / "checkpoints",
        help="segmentation checkpoint without presence head, or a folder: its best file by "
        "val_dice",
    )
    parser.add_argument(
        "--presence-checkpoints",
        type=Path,
        help="segmentation checkpoint with a presence head, or a folder (default: "
        "OUT/presence/checkpoints, trained if missing)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "evidence_toolbox")
    parser.add_argument(
        "--classifier",
        type=Path,
        help="classifier checkpoint trained from scratch (default: "
        "OUT/classifier/classifier.pt, trained if missing)",
    )
    parser.add_argument(
        "--classifier-init",
        type=Path,
        help="classifier checkpoint initialised from the segmentation encoder (default: "
        "OUT/classifier_init/classifier.pt, trained if missing)",
    )
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


def recipe(name: str) -> ModuleType:
    """``recipes/<name>.py`` as a module (the recipes folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _quiet(progress: bool) -> list[str]:
    return [] if progress else ["--no-progress"]


def train_classifier(
    out: Path, epochs: int | None, encoder_init: Path | None, progress: bool
) -> Path:
    """``recipes/train_classifier.py`` with the demo preset into ``out``; its export."""
    argv = ["--out", str(out), "--set", "data.num_workers=0"]
    if epochs is not None:
        argv += ["--epochs", str(epochs)]
    if encoder_init is not None:
        argv += ["--encoder-init", str(encoder_init)]
    return recipe("train_classifier").main(argv + _quiet(progress)).path


def train_presence_model(out: Path, start: Path, progress: bool) -> Path:
    """The "presence head" model in ``out``: the demo preset + :data:`PRESENCE_OVERRIDES`,
    from ``start``'s weights and a new (random) presence head, trained by
    ``recipes/train_supervised.py``'s ``fit_run`` with :data:`PRESENCE_FINE_TUNING`.
    Returns its checkpoints folder."""
    module = recipe("train_supervised")
    settings = [f"out_dir={out}", "data.num_workers=0", f"trainer.progress={progress}"]
    overrides = [*PRESENCE_OVERRIDES, *PRESENCE_FINE_TUNING, *settings]
    config = apply_overrides(module.PRESETS["demo"](), overrides)
    weights = load_checkpoint(start)["model"]
    torch.manual_seed(config.trainer.seed)
    fresh = create_model(config_to_dict(config.model)).state_dict()
    head = {key: value for key, value in fresh.items() if key not in weights}
    initial = save_checkpoint({"model": {**weights, **head}}, out / "initial.pt")
    module.fit_run(config, init_weights=initial)
    return out / "checkpoints"


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
    """Competition Dice and its halves; the negatives with a mask and the positives without."""
    ids = manifest["image_id"].tolist()
    masks = np.stack([rule(store.stored(i), store.presence(i)) for i in ids])
    target = np.stack(truth)
    result = dice_breakdown(masks, target)
    predicted, positive = masks.any(axis=(1, 2)), target.any(axis=(1, 2))
    return {
        "dice": result["dice"],
        "dice_positive": result["dice_positive"],
        "fp_rate": result["false_positive_rate"],
        "fp_images": int((predicted & ~positive).sum()),
        "missed_positives": int((~predicted & positive).sum()),
        "n_images": len(ids),
    }


def tune_gate(store: ProbabilityStore, manifest: pd.DataFrame, truth: list[np.ndarray]) -> Any:
    """The gate threshold on :data:`GATE_GRID` (mask: probability > 0.5) that maximises the
    competition Dice of these images; the tuner's result (``rule``, ``score``)."""
    ids = manifest["image_id"].tolist()
    return tune_rule(
        PresenceGate(Threshold(0.5)),
        {"threshold": GATE_GRID},
        (store.stored(i) for i in ids),
        truth,
        store.presences(ids),
        progress=False,
    )


def gating(
    checkpoint: Path,
    classifiers: dict[str, Path],
    sets: dict[int, pd.DataFrame],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """One row per gate of ``checkpoint``'s model: tuned on the tune fold, scored on the
    report fold."""
    progress = not args.no_progress
    model, _ = load_model(checkpoint)
    has_head = bool(getattr(model, "model_config", {}).get("presence_head"))
    gates: dict[str, tuple[str | None, list[Path]]] = {"none": (None, [])}
    gates["max_pixel"] = ("max_pixel", [])
    gates.update({name: ("classifier", [path]) for name, path in classifiers.items()})
    if has_head:
        gates["presence"] = ("presence", [])
    truth = {k: truths(m) for k, m in sets.items()}
    tune, report = args.tune_fold, args.report_fold
    labels = np.array([t.any() for t in truth[report]])
    rows = []
    for name, (gate, judges) in gates.items():
        predictor = Predictor.from_checkpoints(
            [checkpoint],
            tta=("hflip",),
            gate=gate,
            classifier_checkpoints=judges,
            progress=progress,
        )
        stores = {k: predictor.predict(m) for k, m in sets.items()}
        if gate is None:
            rule, tuned_on = Threshold(0.5), "—"
            fixed = score(rule, stores[report], sets[report], truth[report])
        else:
            tuned = tune_gate(stores[tune], sets[tune], truth[tune])
            rule, tuned_on = tuned.rule, f"fold {tune}: Dice {tuned.score:.4f}"
            fixed = score(
                PresenceGate(Threshold(0.5), 0.5), stores[report], sets[report], truth[report]
            )
        reported = score(rule, stores[report], sets[report], truth[report])
        scores = stores[report].presences(sets[report]["image_id"].tolist())
        rows.append(
            {
                "model": "presence head" if has_head else "no head",
                "gate": name,
                "threshold": getattr(rule, "threshold", None) if gate else None,
                "tuned_on": tuned_on,
                "score_auc": binary_auc(scores, labels) if gate else None,
                **{f"tuned_{k}": v for k, v in reported.items()},
                **{f"fixed05_{k}": v for k, v in fixed.items()},
            }
        )
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
        f"Segmentation models: no head `{result['checkpoint']}`, presence head "
        f"`{result['presence_checkpoint']}` (flip TTA). Report fold {result['report_fold']}; "
        f"gate thresholds tuned on fold {result['tune_fold']} (in the training folds of every "
        "model, so in-sample; the fixed threshold 0.5 is shown too).",
        "",
        "Classifiers (their best validation epoch, on the report fold):",
        "",
    ]
    for name, info in result["classifiers"].items():
        metrics = info["metrics"]
        lines.append(
            f"- {name}: ROC AUC {metrics['val_auc']:.3f}, F0.5 {metrics['val_f05']:.3f} at 0.5 "
            f"(epoch {info['epoch'] + 1}; `{info['path']}`)"
        )
    lines += [
        "",
        "## (a) Gating — competition Dice on the report fold",
        "",
        "FP img.: negative images with a predicted mask; missed: positive images left empty "
        "(by the tuned rule).",
        "",
        "| model | gate | score AUC | threshold (tuned) | Dice | Dice pos. | FP rate neg. "
        "| FP img. | missed | Dice @0.5 | FP rate @0.5 | tuning |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["gating"]:
        threshold = "—" if row["threshold"] is None else f"{row['threshold']:.2f}"
        auc = "—" if row["score_auc"] is None else f"{row['score_auc']:.3f}"
        lines.append(
            f"| {row['model']} | {row['gate']} | {auc} | {threshold} | {row['tuned_dice']:.4f} | "
            f"{row['tuned_dice_positive']:.4f} | {row['tuned_fp_rate']:.3f} | "
            f"{row['tuned_fp_images']} | {row['tuned_missed_positives']} | "
            f"{row['fixed05_dice']:.4f} | {row['fixed05_fp_rate']:.3f} | {row['tuned_on']} |"
        )
    lines += [
        "",
        "## (b) TTA — report fold, probability > 0.5 (no-head model)",
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


def classifier_paths(args: argparse.Namespace, checkpoint: Path) -> dict[str, Path]:
    """Each classifier's checkpoint, trained first when missing."""
    given = {"classifier": args.classifier, "classifier_init": args.classifier_init}
    paths = {}
    for name, (folder, from_encoder) in CLASSIFIERS.items():
        path = given[folder] or args.out / folder / "classifier.pt"
        if not path.is_file():
            encoder_init = checkpoint if from_encoder else None
            epochs = CLASSIFIER_EPOCHS[folder]
            path = train_classifier(path.parent, epochs, encoder_init, not args.no_progress)
        paths[name] = path
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    progress = not args.no_progress
    checkpoint = best_checkpoint(args.checkpoints)
    presence = args.presence_checkpoints or args.out / "presence" / "checkpoints"
    if not presence.exists():
        presence = train_presence_model(presence.parent, checkpoint, progress)
    presence = best_checkpoint(presence)
    classifiers = classifier_paths(args, checkpoint)
    sets = folds(load_checkpoint(checkpoint), [args.tune_fold, args.report_fold])
    described = {}
    for name, path in classifiers.items():
        info = load_checkpoint(path)
        described[name] = {"path": str(path), "epoch": info["epoch"], "metrics": info["metrics"]}
    result = {
        "checkpoint": str(checkpoint),
        "presence_checkpoint": str(presence),
        "classifiers": described,
        "tune_fold": args.tune_fold,
        "report_fold": args.report_fold,
        "gating": [
            *gating(checkpoint, classifiers, sets, args),
            *gating(presence, classifiers, sets, args),
        ],
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
