"""Pseudo labels from CheXpert (and NIH): the 3rd place's external-data method.

Four steps:
  1. teacher  a supervised UNet-CBAM trained on the SIIM labels here (OUT/teacher/, the same
              preset as the student but without pseudo data), or --teacher CKPT (a Trainer
              checkpoint, e.g. checkpoints/best-epochNNN.pt or model.pt of another run);
  2. filter   the teacher (with hflip TTA; lung crop when data.lung_crop is set) labels the
              frontal CheXpert images, and with --nih the NIH ChestX-ray14 images: a label-1
              image is kept when the teacher predicts more than --min-area pixels (stated at
              1024², scaled to the working size) above --threshold, with that prediction as
              its mask; every label-0 image is an empty-mask negative; uncertain and blank
              labels are dropped. Extensions: --agree-negatives keeps a label-0 image only when
              the teacher agrees; --band LOW HIGH leaves uncertain pixels out of the
              student's loss (see docs/pseudo_labels.md); --soft keeps the teacher's
              probability maps as soft targets (10th place; with --set loss.name=soft_bce).
              Outputs in OUT/pseudo/
              (pseudo_manifest.csv, masks.h5, decisions.csv, skipped.csv, audit.json,
              area_histogram.png, gallery.png); an interrupted filter resumes when rerun,
              with or without --resume;
  3. student  a new UNet-CBAM with symmetric Lovasz and an EMA of the weights trains on the
              SIIM training fold plus, each epoch, a fresh draw of pseudo images: --ratio
              pseudo positives per SIIM positive (default 0.5) and pseudo negatives at SIIM's
              negative:positive proportion;
  4. report   validation Dice of teacher and student on the same SIIM validation fold.

Data: the demo root by default (written to --demo-dir, default demo_data/, when missing: SIIM,
CheXpert-v1.0-small and NIH in their published layouts), or real downloads with --siim-dir,
--chexpert-dir (the folder holding CheXpert-v1.0-small/ or CheXpert-v1.0/, or that folder)
and --nih-dir.

Presets (--preset):
  demo  the supervised demo preset (ResNet18 UNet-CBAM at 128², symmetric Lovasz, Adam 1e-3
        cosine, 50 % positive sampling, batch 16, 16 epochs) with an EMA of the weights
        (exact copy for 2 epochs, then 0.99): minutes on 2 CPU cores per model.
  full  the 3rd place: SE-ResNeXt50 UNet-CBAM (r 16, k 1, hypercolumn), 576², Adam 1e-4
        constant, global batch 9, EMA copy for epochs 1-6 then 0.99 (checkpoints ranked by
        the EMA's Dice), 10 folds, 20 epochs; their lung crops with --set
        data.lung_crop=LUNG_CKPT (recipes/train_lung_segmenter.py).

Values change as in recipes/train_supervised.py: flags, then --set SECTION.KEY=VALUE, then
--config FILE.yaml, then the preset; the teacher uses the same config with
--teacher-epochs. The resolved config is written to OUT/config.yaml.

Outputs in --out: teacher/ (its run, model.pt), pseudo/ (the filter's outputs), student
run files (config.yaml, last.pt, metrics.csv, curves.png, checkpoints/), model.pt (the
student's best weights, trained model or EMA) and summary.json.

Interrupted? Run the same command again with --resume: a finished teacher (teacher/model.pt)
is reused, an interrupted teacher or student continues from its last.pt (the same final
weights as an uninterrupted run), the filter keeps the rows it had written.

Examples:
  python recipes/pseudo_chexpert.py                                 # demo data, ratio 0.5
  python recipes/pseudo_chexpert.py --epochs 4 --set data.size=64 --set data.labelled_fraction=0.25
  python recipes/pseudo_chexpert.py --teacher runs/f0/model.pt --nih --ratio 1.0
  python recipes/pseudo_chexpert.py --epochs 4 --resume                # after an interruption
  python recipes/pseudo_chexpert.py --teacher runs/f0/stage-2/last.pt --soft --filter-only \
      --out runs/soft                               # soft labels for a 10th-place stage
  python recipes/pseudo_chexpert.py --preset full --siim-dir /data/siim \\
      --chexpert-dir /data/chexpert --set data.lung_crop=runs/lung/lung.pt --fold 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from external_data import chexpert, nih
from ssl_ptx.cli import (
    LAST_NAME,
    add_config_arguments,
    add_run_arguments,
    configure_logging,
    resolve_config,
    start_process,
)
from ssl_ptx.config import (
    ConfigError,
    TrainConfig,
    config_to_dict,
    preset,
    save_config,
)
from ssl_ptx.engine import CheckpointError, Trainer, seed_everything
from ssl_ptx.engine.data import build_siim_datasets, ensure_demo_root
from ssl_ptx.engine.distributed import barrier, destroy_distributed
from ssl_ptx.engine.ema_callback import ExportedModel, build_ema_callback, export_best
from ssl_ptx.engine.loaders import build_fold_loaders, build_val_loader
from ssl_ptx.engine.pseudo_data import build_pseudo_datasets, build_pseudo_train_loader
from ssl_ptx.fileio import atomic_write_bytes
from ssl_ptx.inference import Predictor, load_model
from ssl_ptx.losses import build_loss
from ssl_ptx.lung_crop import LungCropper
from ssl_ptx.models import create_model
from ssl_ptx.pseudo import (
    ConfidenceBand,
    PseudoLabelFilter,
    published_rules,
    read_pseudo_manifest,
)

FLAG_KEYS = {
    "siim_dir": "data.siim_dir",
    "demo_dir": "data.demo_dir",
    "fold": "data.fold",
    "lung_crop": "data.lung_crop",
    "epochs": "trainer.epochs",
    "device": "trainer.device",
    "out": "out_dir",
}
EXPORT_NAME = "model.pt"


def _demo_preset() -> TrainConfig:
    base = preset("demo")
    ema = dataclasses.replace(base.ema, decay=0.99, schedule="third_place", copy_epochs=2)
    return dataclasses.replace(base, ema=ema, out_dir="outputs/demo_pseudo_chexpert")


def _full_preset() -> TrainConfig:
    return dataclasses.replace(preset("full"), out_dir="outputs/pseudo_chexpert_full")


PSEUDO_PRESETS = {"demo": _demo_preset, "full": _full_preset}


@dataclass
class PseudoRun:
    """What :func:`main` returns: validation Dice of both models and the filter's counts."""

    teacher_dice: float
    student_dice: float
    teacher_path: Path
    student: ExportedModel
    audit: dict[str, Any]
    pseudo_dir: Path
    images_per_second: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser, PSEUDO_PRESETS, set_example="data.labelled_fraction=0.25")
    parser.add_argument("--siim-dir", help="real SIIM root (default: the demo root's siim/)")
    parser.add_argument("--chexpert-dir", help="real CheXpert root (default: the demo root's)")
    parser.add_argument("--nih-dir", help="real NIH ChestX-ray14 root (default: the demo root's)")
    parser.add_argument("--nih", action="store_true", help="also pseudo-label the NIH images")
    parser.add_argument("--demo-dir", help="demo data root (default: demo_data)")
    parser.add_argument("--teacher", type=Path, metavar="CKPT", help="teacher checkpoint")
    parser.add_argument(
        "--teacher-epochs", type=int, help="epochs of the teacher (default: trainer.epochs)"
    )
    parser.add_argument(
        "--ratio",
        type=float,
        default=0.5,
        help="pseudo positives per SIIM positive per epoch (default 0.5: SIIM:pseudo = 1:0.5)",
    )
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="pixel probability threshold (0.5)"
    )
    parser.add_argument(
        "--min-area",
        type=float,
        default=100.0,
        help="pixels a label-1 image's prediction must exceed, at 1024² (default 100)",
    )
    parser.add_argument(
        "--agree-negatives",
        action="store_true",
        help="keep a label-0 image only when the teacher predicts at most --min-area pixels",
    )
    parser.add_argument(
        "--band",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="leave the pixels of kept images with probability in [LOW, HIGH) out of the "
        "student's loss (recorded as ignore_rle) instead of calling them background",
    )
    parser.add_argument(
        "--soft",
        action="store_true",
        help="keep the teacher's probability maps as soft targets (10th place); train the "
        "student with --set loss.name=soft_bce",
    )
    parser.add_argument(
        "--filter-only",
        action="store_true",
        help="stop after the filter (steps 1-2): OUT/pseudo for a supervised run or stage "
        "(--set pseudo.dir=OUT/pseudo) or recipes/mean_teacher_nih.py --pseudo",
    )
    add_run_arguments(parser, epochs_help="student epochs (trainer.epochs)")
    parser.add_argument(
        "--resume",
        dest="resume_run",  # not ssl_ptx.cli's --resume LAST_PT: this one takes no file
        action="store_true",
        help="continue an interrupted run of the same command in --out: reuse a finished "
        "teacher, continue the teacher or student from its last.pt",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The student's config: preset, --config, --set, then the flags."""
    return resolve_config(args, PSEUDO_PRESETS, FLAG_KEYS)[0]


def _resume_point(config: TrainConfig, resume: bool) -> Path | None:
    """``OUT/last.pt`` of ``config`` when resuming and it exists, else None (a fresh fit)."""
    last = Path(config.out_dir) / LAST_NAME
    return last if resume and last.exists() else None


def _fit(
    config: TrainConfig, train_loader: Any, val_loader: Any, context: Any, resume: bool
) -> Trainer:
    """Train one model of ``config`` (continuing from its last.pt with ``resume``); its best
    weights are then exported by the caller."""
    seed_everything(config.trainer.seed)  # the same initial weights whatever ran before
    ema = build_ema_callback(config.ema, default_top_k=config.trainer.top_k)
    trainer = Trainer(
        create_model(config_to_dict(config.model)),
        build_loss(config.loss.build_argument()),
        config.trainer,
        out_dir=config.out_dir,
        callbacks=[ema] if ema is not None else [],
        run_config=config,
    )
    if context.is_main:
        save_config(config, Path(config.out_dir) / "config.yaml")
    trainer.fit(train_loader, val_loader, resume=_resume_point(config, resume))
    return trainer


def train_teacher(config: TrainConfig, context: Any, progress: bool, resume: bool) -> Path:
    """Train the supervised teacher in OUT/teacher; returns its exported weights (with
    ``resume``, a finished teacher's model.pt is returned as it is)."""
    exported = Path(config.out_dir) / EXPORT_NAME
    if resume and exported.exists():
        return exported
    train_set, val_set, _ = build_siim_datasets(
        config.data, in_channels=config.model.in_channels, progress=progress
    )
    train_loader, val_loader = build_fold_loaders(train_set, val_set, config, context)
    if context.is_main:
        print(f"teacher: {len(train_set)} SIIM training images, {config.trainer.epochs} epochs")
    trainer = _fit(config, train_loader, val_loader, context, resume)
    return export_best(trainer, exported).path


def external_manifest(args: argparse.Namespace, demo_dir: str) -> pd.DataFrame:
    """Frontal CheXpert images (and NIH with --nih) to pseudo-label."""
    progress = not args.no_progress
    parts = [chexpert.load(args.chexpert_dir or Path(demo_dir) / "chexpert", progress=progress)]
    if args.nih:
        parts.append(nih.load(args.nih_dir or Path(demo_dir) / "nih"))
    columns = list(parts[0].columns.intersection(parts[-1].columns))
    return pd.concat([part[columns] for part in parts], ignore_index=True)


def run_filter(
    args: argparse.Namespace, config: TrainConfig, teacher: Path, out_dir: Path, context: Any
) -> PseudoLabelFilter:
    """The filter over the teacher (hflip TTA, lung crop with ``data.lung_crop``)."""
    cropper = None
    if config.data.lung_crop is not None:
        cropper = LungCropper.from_checkpoint(config.data.lung_crop, device=context.device)
    predictor = Predictor.from_checkpoints(
        [teacher],
        tta=("hflip",),
        lung_cropper=cropper,
        device=context.device,
        batch_size=config.data.batch_size,
        progress=False,
    )
    return PseudoLabelFilter(
        predictor,
        published_rules(args.threshold, args.min_area, agree_on_negatives=args.agree_negatives),
        band=ConfidenceBand(*args.band) if args.band else None,
        soft=args.soft,
        batch_size=config.data.val_batch_size or config.data.batch_size,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> PseudoRun | None:
    """Run the four steps (None with --filter-only, which stops after the filter)."""
    args = parse_args(argv)
    configure_logging()
    try:
        config = build_config(args)
    except (ConfigError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    context, progress = start_process(config.trainer)
    out_dir = Path(config.out_dir)
    if config.data.siim_dir is None:
        ensure_demo_root(
            config.data.demo_dir,
            n_images=config.data.demo_images,
            size=config.data.demo_size,
            progress=progress,
        )

    # 1. teacher
    teacher = args.teacher
    if teacher is None:
        epochs = args.teacher_epochs or config.trainer.epochs
        teacher_config = dataclasses.replace(
            config,
            trainer=dataclasses.replace(config.trainer, epochs=epochs),
            out_dir=str(out_dir / "teacher"),
        )
        teacher = train_teacher(teacher_config, context, progress, args.resume_run)

    # 2. filter (rank 0; the others wait for its outputs)
    pseudo_dir = out_dir / "pseudo"
    try:
        external = external_manifest(args, config.data.demo_dir)
        if context.is_main:
            result = run_filter(args, config, teacher, pseudo_dir, context).run(
                external, pseudo_dir
            )
            print(
                f"pseudo labels: {result.audit['n_kept_positive']} positives and "
                f"{result.audit['n_kept_negative']} negatives kept of {len(external)} images "
                f"({result.audit['n_skipped']} unreadable; {result.images_per_second:.1f} "
                f"images/s through the teacher) → {pseudo_dir}"
            )
        barrier()
        audit = json.loads((pseudo_dir / "audit.json").read_text())
        pseudo = read_pseudo_manifest(pseudo_dir)
        if args.filter_only:
            destroy_distributed()
            return None
        datasets = build_pseudo_datasets(
            config.data, pseudo, in_channels=config.model.in_channels, progress=progress
        )
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None

    # 3. student
    options = context.loader_options()
    train_loader = build_pseudo_train_loader(
        datasets,
        config.data,
        ratio=args.ratio,
        epochs=config.trainer.epochs,
        seed=config.trainer.seed,
        **options,
    )
    val_loader = build_val_loader(datasets.val, config.data, **options)
    if context.is_main:
        print(
            f"student: {len(datasets.siim)} SIIM + {len(datasets.pseudo)} pseudo images, "
            f"{train_loader.sampler!r}"
        )
    trainer = _fit(config, train_loader, val_loader, context, args.resume_run)
    student = export_best(trainer, out_dir / EXPORT_NAME)

    # 4. report, both on the student's validation fold
    teacher_model, _ = load_model(teacher)
    teacher_dice = trainer.evaluate(val_loader, teacher_model.to(trainer.device))["val_dice"]
    run = PseudoRun(
        teacher_dice,
        student.score,
        Path(teacher),
        student,
        audit,
        pseudo_dir,
        float("nan") if not context.is_main else result.images_per_second,
    )
    if context.is_main:
        summary = {
            "teacher": str(teacher),
            "teacher_val_dice": teacher_dice,
            "student": str(student.path),
            "student_source": student.source,
            "student_val_dice": student.score,
            "ratio": args.ratio,
            "pseudo": audit,
        }
        atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=2).encode())
        print(f"validation Dice (fold {config.data.fold}): teacher {teacher_dice:.4f}")
        print(
            f"validation Dice (fold {config.data.fold}): student {student.score:.4f} "
            f"({student.source}, epoch {student.epoch + 1}) → {student.path}"
        )
    destroy_distributed()
    return run


if __name__ == "__main__":
    main()
