"""Mean Teacher on SIIM-ACR with unlabelled NIH ChestX-ray14 images (the 5th place's method).

A student UNet-CBAM learns from labelled SIIM images (its supervised loss) and from unlabelled
images (a consistency loss toward its teacher, an exponential moving average of the student's
weights). Each optimiser step takes a labelled batch and an unlabelled batch from separate
samplers (data.batch_size + unlabelled.batch_size images; 5th place 16 + 4). The two views of an
unlabelled image share geometry (one augmentation) and differ in intensity: the student's is
multiplied by U(0.9, 1.1). Every epoch the student and the teacher are validated on the SIIM
validation fold (their Dice is logged side by side); at the end the better of the two, by its
best validation Dice, is exported.

Data: the demo root by default (written to --demo-dir, default demo_data/, when missing: SIIM
and NIH in their published layouts), or real downloads with --siim-dir (DICOM tree +
train-rle.csv or stage_2_train.csv) and --nih-dir (images_NNN/images/*.png +
Data_Entry_2017.csv). Unlabelled images: the NIH images (--nih-select all, or pneumothorax =
only those whose finding labels include Pneumothorax; --nih-exclude FILE leaves out listed
image ids, e.g. the NIH images behind your SIIM validation fold), plus, when
--labelled-fraction < 1, the SIIM training images whose masks are not used. Images are decoded
once into HDF5 caches (data.cache_dir, default outputs/cache/) that later runs reuse.

Presets (--preset):
  demo  the supervised demo preset's ResNet18 UNet-CBAM, symmetric Lovasz and cosine Adam 1e-3,
        at 96² for 35 epochs, with 25 % of the SIIM training masks kept; the other SIIM
        training images and the demo NIH images unlabelled; 8 labelled + 4 unlabelled images
        per step; teacher decay 0.95 with the Mean Teacher warm-up; consistency weight 30
        ramped up over 20 epochs: minutes on 2 CPU cores (the setting of
        benchmarks/evidence_mean_teacher.py; --labelled-fraction 1 uses every SIIM mask).
  full  the 5th place's schedule: 1024², 16 labelled + 4 unlabelled NIH images per step, Adam
        3e-4 (weight decay 1e-4) constant, gradient clipping at 10, 50 % positive sampling, 6
        folds, teacher decay 0.5 / 0.9 / 0.99 / 0.999 from epochs 1 / 6 / 11 / 21, consistency
        weight 0.001, then 2·exp(-5(1 - e/30)²) from epoch 6 (2.0 from epoch 31), MSE on
        sigmoid probabilities, teacher BatchNorm refreshed on the labelled batch, 40 epochs,
        with our SE-ResNeXt50 UNet-CBAM (hypercolumn head).

Pseudo labels + Mean Teacher (--pseudo DIR): the kept images of a finished pseudo-label filter
(OUT/pseudo of recipes/pseudo_chexpert.py) join the labelled stream as in that recipe's
student: every kept SIIM mask plus, each epoch, a fresh draw of --ratio pseudo positives per
SIIM positive (default 0.5) and pseudo negatives at SIIM's proportion; the unlabelled stream
is unchanged.

Losses (--loss): lovasz (default: the preset's symmetric Lovasz) or bce_cls (the 5th place's
1024·BCE + BCE of an image-level presence head, which it adds to the model; the presence
output then also enters the consistency loss with weight mean_teacher.presence_weight).

Every value can be changed, in this order of precedence: the flags below, then --set
SECTION.KEY=VALUE (repeatable; sections model, loss, data, trainer, ema, mean_teacher,
unlabelled; e.g. --set mean_teacher.consistency_weight=2 --set unlabelled.batch_size=8 --set
mean_teacher.buffers=average --set mean_teacher.teacher_bn=eval), then --config FILE.yaml, then
the preset. The resolved config is written to OUT/config.yaml.

Outputs in --out: config.yaml, last.pt (full state: student, optimiser, teacher, unlabelled
stream position; --resume continues from it), checkpoints/best-epochNNN.pt (student) and
checkpoints/teacher_best-epochNNN.pt (teacher) by validation Dice (NNN: the epoch number the
log prints, from 001), model.pt (the better of the two; its "source" says which),
metrics.csv (val_* of the student, teacher_val_* of the teacher, train_supervised,
train_consistency, train_consistency_weight), curves.png, tensorboard/.

Examples:
  python recipes/mean_teacher_nih.py                          # demo data, demo preset
  python recipes/mean_teacher_nih.py --epochs 2 --set data.size=64
  python recipes/mean_teacher_nih.py --preset full --siim-dir /data/siim --nih-dir /data/nih \\
      --nih-exclude siim_val_nih_ids.txt --fold 0 --out runs/mt_f0
  torchrun --nproc_per_node=4 recipes/mean_teacher_nih.py --preset full --siim-dir /data/siim \\
      --nih-dir /data/nih --loss bce_cls
  python recipes/mean_teacher_nih.py --resume outputs/demo_mean_teacher/last.pt --epochs 20
  python recipes/mean_teacher_nih.py --pseudo outputs/demo_pseudo_chexpert/pseudo --ratio 0.5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from torch.utils.data import DataLoader

from external_data import nih
from ssl_ptx.cli import (
    add_config_arguments,
    add_resume_argument,
    add_run_arguments,
    configure_logging,
    resolve_config,
    start_process,
)
from ssl_ptx.config import (
    MEAN_TEACHER_PRESETS,
    ConfigError,
    MeanTeacherTrainConfig,
    config_to_dict,
    save_config,
)
from ssl_ptx.engine import (
    CheckpointError,
    ExportedModel,
    MeanTeacherTrainer,
    build_ema_callback,
    export_best,
)
from ssl_ptx.engine.data import build_semi_datasets, ensure_demo_root, select_unlabelled
from ssl_ptx.engine.distributed import destroy_distributed
from ssl_ptx.engine.loaders import build_two_stream_loader, build_val_loader
from ssl_ptx.engine.pseudo_data import build_training_stream
from ssl_ptx.losses import build_loss
from ssl_ptx.models import create_model

#: command-line flag → dotted config key
FLAG_KEYS = {
    "siim_dir": "data.siim_dir",
    "demo_dir": "data.demo_dir",
    "nih_dir": "unlabelled.nih_dir",
    "nih_select": "unlabelled.nih_select",
    "nih_exclude": "unlabelled.nih_exclude",
    "labelled_fraction": "data.labelled_fraction",
    "fold": "data.fold",
    "lung_crop": "data.lung_crop",
    "pseudo": "pseudo.dir",
    "ratio": "pseudo.ratio",
    "epochs": "trainer.epochs",
    "device": "trainer.device",
    "out": "out_dir",
}
#: --loss choice → overrides (lovasz keeps the preset's loss)
LOSS_OVERRIDES = {
    "lovasz": [],
    "bce_cls": ["loss.terms={bce: 1024, presence_bce: 1}", "model.presence_head=true"],
}
EXPORT_NAME = "model.pt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(
        parser, MEAN_TEACHER_PRESETS, set_example="mean_teacher.consistency_weight=2"
    )
    parser.add_argument("--siim-dir", help="real SIIM root (default: the demo root's siim/)")
    parser.add_argument("--nih-dir", help="real NIH ChestX-ray14 root (default: the demo root's)")
    parser.add_argument("--demo-dir", help="demo data root (default: demo_data)")
    parser.add_argument(
        "--nih-select",
        choices=["all", "pneumothorax"],
        help="unlabelled NIH images: all, or only those labelled Pneumothorax "
        "(unlabelled.nih_select)",
    )
    parser.add_argument(
        "--nih-exclude",
        metavar="FILE",
        help="text file of NIH image ids to leave out, one per line (unlabelled.nih_exclude)",
    )
    parser.add_argument(
        "--labelled-fraction",
        type=float,
        help="share of the SIIM training images whose masks are used; the others join the "
        "unlabelled images (data.labelled_fraction)",
    )
    parser.add_argument(
        "--pseudo",
        metavar="DIR",
        help="pseudo labels + Mean Teacher: mix the kept images of a finished pseudo-label "
        "filter (OUT/pseudo of recipes/pseudo_chexpert.py) into the labelled stream (pseudo.dir)",
    )
    parser.add_argument(
        "--ratio",
        type=float,
        help="with --pseudo: pseudo positives per SIIM positive per epoch (pseudo.ratio, "
        "default 0.5)",
    )
    parser.add_argument(
        "--loss",
        choices=sorted(LOSS_OVERRIDES),
        help="lovasz: the preset's symmetric Lovasz (default); bce_cls: the 5th place's "
        "1024·BCE + presence-head BCE (adds the head)",
    )
    add_run_arguments(parser)
    add_resume_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> tuple[MeanTeacherTrainConfig, Path | None]:
    """The run's config and the checkpoint to resume from (None for a fresh run)."""
    extra = LOSS_OVERRIDES[args.loss] if args.loss else []
    return resolve_config(args, MEAN_TEACHER_PRESETS, FLAG_KEYS, extra_overrides=extra)


def read_nih(config: MeanTeacherTrainConfig) -> pd.DataFrame | None:
    """The unlabelled NIH rows the config asks for (None without ``unlabelled.nih``)."""
    unlabelled = config.unlabelled
    if not unlabelled.nih:
        return None
    root = unlabelled.nih_dir or Path(config.data.demo_dir) / "nih"
    manifest = nih.load(root, exclude_ids=unlabelled.nih_exclude)
    return select_unlabelled(
        manifest,
        unlabelled.nih_select,
        max_images=unlabelled.nih_max_images,
        seed=config.data.labelled_seed,
    )


def _pseudo_note(config: MeanTeacherTrainConfig, labelled_loader: DataLoader) -> str:
    if config.pseudo.dir is None:
        return ""
    return f" (with pseudo labels of {config.pseudo.dir}: {labelled_loader.sampler!r})"


def _scores(metrics: dict, prefix: str) -> str:
    return (
        f"Dice {metrics[prefix + 'val_dice']:.4f} | positive images "
        f"{metrics[prefix + 'val_dice_pos']:.4f} | false positives on negative images "
        f"{metrics[prefix + 'val_fp_rate']:.1%}"
    )


def _report(metrics: dict, exported: ExportedModel, out_dir: str) -> None:
    print(f"last epoch, student: {_scores(metrics, '')}")
    print(f"last epoch, teacher: {_scores(metrics, 'teacher_')}")
    best = "  ".join(f"{source} {score:.4f}" for source, score in exported.scores.items())
    print(f"best validation Dice: {best}")
    print(
        f"exported the {'student' if exported.source == 'model' else exported.source} "
        f"(epoch {exported.epoch + 1}, Dice {exported.score:.4f}) to {exported.path}"
    )
    print(f"outputs: {out_dir} (config.yaml, last.pt, metrics.csv, curves.png, checkpoints/)")


def main(argv: list[str] | None = None) -> ExportedModel:
    args = parse_args(argv)
    configure_logging()
    try:
        config, resume = build_config(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    context, progress = start_process(config.trainer)
    data = config.data
    if data.siim_dir is None:  # the demo root holds the NIH images too
        ensure_demo_root(
            data.demo_dir, n_images=data.demo_images, size=data.demo_size, progress=progress
        )
    options = context.loader_options()
    try:
        external = read_nih(config)
        labelled, unlabelled, val = build_semi_datasets(config, external, progress=progress)
        labelled_loader = build_training_stream(config, labelled, progress=progress, **options)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    train_loader = build_two_stream_loader(
        labelled_loader,
        unlabelled,
        batch_size=config.unlabelled.batch_size,
        seed=config.trainer.seed,
        num_workers=data.num_workers,
        **options,
    )
    val_loader = build_val_loader(val, data, **options)
    ema = build_ema_callback(config.ema, default_top_k=config.trainer.top_k)
    trainer = MeanTeacherTrainer(
        create_model(config_to_dict(config.model)),
        build_loss(config.loss.build_argument()),
        config.trainer,
        config.mean_teacher,
        out_dir=config.out_dir,
        callbacks=[ema] if ema is not None else [],
        run_config=config,
    )
    if context.is_main:
        save_config(config, Path(config.out_dir) / "config.yaml")
        print(
            f"Mean Teacher: {config.model.encoder_name} UNet-CBAM at {data.size}² on "
            f"{len(labelled)} labelled{_pseudo_note(config, labelled_loader)} + "
            f"{len(unlabelled)} unlabelled images "
            f"({data.batch_size} + {config.unlabelled.batch_size} per step), validating "
            f"student and teacher on {len(val)} (fold {data.fold}), {context.world_size} "
            f"process(es) on {trainer.device}"
        )
    result = trainer.fit(train_loader, val_loader, resume=resume)
    exported = export_best(trainer, Path(config.out_dir) / EXPORT_NAME)
    if context.is_main:
        _report(result.metrics, exported, config.out_dir)
    destroy_distributed()
    return exported


if __name__ == "__main__":
    main()
