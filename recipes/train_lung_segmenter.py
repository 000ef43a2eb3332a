"""Lung pre-segmenter: train UNet-CBAM on lung masks, save it with its crop settings.

The 3rd place of SIIM-ACR segments the lungs first and trains the pneumothorax model on each
X-ray's lung box. This recipe trains that lung model and saves one checkpoint holding the
weights, the model config and the crop settings, which ssl_ptx.lung_crop.LungCropper
.from_checkpoint(PATH) rebuilds and `--set data.lung_crop=PATH` in the training recipes uses.

Data: the demo root's montgomery/ folder by default (the demo root, --demo-dir, default
demo_data/, is written when missing), or a real Montgomery County set with --montgomery-dir
(the folder holding MontgomerySet/, or MontgomerySet/ itself: CXR_png/ and
ManualMask/{leftMask,rightMask}/). The target is leftMask OR rightMask; images and masks are
squashed to a square (data.size) and decoded once into an HDF5 cache (data.cache_dir). The
images are split into 4 folds (seed 100) stratified by lung area; --fold is held out.

Presets (--preset):
  demo  ResNet18 UNet-CBAM (k 1) at 128², symmetric Lovasz, Adam 1e-3 with cosine decay,
        batch 8, 40 epochs, "light" augmentation: minutes on 2 CPU cores (40 demo images).
  full  the 3rd place's lung model: ResNet34 UNet-CBAM (r 16, k 1) at 256², symmetric Lovasz,
        Adam 1e-4 constant, batch 16, 30 epochs, "aug9" augmentation, no class balancing.

Crop settings (stored in the checkpoint; the defaults are the 3rd place's rule at 1024²
stated as fractions, so they scale with the image): --threshold, --min-component-area,
--margin, --min-box, --keep-aspect; the input size is data.size.

Every training value can be changed, in this order of precedence: the flags below, then --set
SECTION.KEY=VALUE (repeatable; e.g. --set trainer.lr=3e-4 --set model.encoder_name=resnet34),
then --config FILE.yaml, then the preset. The resolved config is written to OUT/config.yaml.

Outputs in --out: config.yaml, last.pt (full state; --resume continues from it), metrics.csv,
curves.png, lung_segmenter.pt (the last epoch's weights, model config, crop settings and
held-out metrics), held_out.csv (per held-out image: lung Dice and IoU at native size, the box
and the share of the true lung inside it), lung_crops.png (held-out images: predicted lung in
red, box in green).

Examples:
  python recipes/train_lung_segmenter.py                          # demo data, demo preset
  python recipes/train_lung_segmenter.py --preset full --montgomery-dir /data/MontgomerySet \\
      --out runs/lung
  python recipes/train_supervised.py --set data.lung_crop=outputs/lung_demo/lung_segmenter.pt \\
      --set data.cache_size=256                      # pneumothorax model on lung crops
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from ssl_ptx.cli import (
    add_config_arguments,
    add_resume_argument,
    add_run_arguments,
    configure_logging,
    resolve_config,
    start_process,
)
from ssl_ptx.config import (
    LUNG_PRESETS,
    ConfigError,
    TrainConfig,
    config_to_dict,
    save_config,
)
from ssl_ptx.engine import (
    CheckpointError,
    Trainer,
)
from ssl_ptx.engine.distributed import destroy_distributed
from ssl_ptx.engine.loaders import build_fold_loaders
from ssl_ptx.engine.lung_data import LungEvaluation, build_lung_datasets, evaluate_lung_segmenter
from ssl_ptx.fileio import atomic_path
from ssl_ptx.losses import build_loss
from ssl_ptx.lung_crop import LungCropper
from ssl_ptx.models import create_model
from ssl_ptx.viz import write_png

#: command-line flag → dotted config key
FLAG_KEYS = {
    "montgomery_dir": "data.montgomery_dir",
    "demo_dir": "data.demo_dir",
    "fold": "data.fold",
    "epochs": "trainer.epochs",
    "device": "trainer.device",
    "out": "out_dir",
}
CHECKPOINT_NAME = "lung_segmenter.pt"
_DEFAULTS = LungCropper.__init__.__kwdefaults__


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser, LUNG_PRESETS)
    parser.add_argument(
        "--montgomery-dir", help="real Montgomery set (default: the demo root's montgomery/)"
    )
    parser.add_argument("--demo-dir", help="demo data root (default: demo_data)")
    add_run_arguments(parser, fold_help="held-out fold (data.fold; 4 folds)", lung_crop=False)
    add_resume_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    crop = parser.add_argument_group("crop settings, stored in the checkpoint")
    crop.add_argument(
        "--threshold",
        type=float,
        default=_DEFAULTS["threshold"],
        help="lung probability above which a pixel is lung (default %(default)s)",
    )
    crop.add_argument(
        "--min-component-area",
        type=float,
        default=_DEFAULTS["min_component_area"],
        help="drop lung components smaller than this fraction of the image area "
        "(default 2000/1024² = %(default).5f)",
    )
    crop.add_argument(
        "--margin",
        type=float,
        default=_DEFAULTS["margin"],
        help="pad the lung box by this fraction of the image side on every side "
        "(default 40/1024 = %(default).4f)",
    )
    crop.add_argument(
        "--min-box",
        type=float,
        default=_DEFAULTS["min_box"],
        help="use the full image when the box side is below this fraction of the image side "
        "(default 300/1024 = %(default).4f)",
    )
    crop.add_argument(
        "--keep-aspect",
        action="store_true",
        help="grow the box to a square instead of squashing the crop (default: squash)",
    )
    crop.add_argument(
        "--sheet-images",
        type=int,
        default=12,
        help="held-out images in lung_crops.png (default %(default)s)",
    )
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> tuple[TrainConfig, Path | None]:
    """The run's config and the checkpoint to resume from (None for a fresh run)."""
    return resolve_config(args, LUNG_PRESETS, FLAG_KEYS)


def _report(evaluation: LungEvaluation, out_dir: Path) -> dict[str, float]:
    """Print the held-out figures; write held_out.csv and lung_crops.png."""
    summary = evaluation.summary()
    with atomic_path(out_dir / "held_out.csv") as tmp:
        evaluation.table.to_csv(tmp, index=False)
    write_png(out_dir / "lung_crops.png", evaluation.sheet)
    print(
        f"held-out lungs ({summary['n_images']} images, native size): Dice "
        f"{summary['lung_dice']:.4f} (min {summary['lung_dice_min']:.4f}), IoU "
        f"{summary['lung_iou']:.4f} | true lung inside the box {summary['lung_in_box']:.2%}, "
        f"box {summary['box_area']:.1%} of the image, full-image fallbacks "
        f"{summary['fallbacks']}"
    )
    return summary


def main(argv: list[str] | None = None) -> Path | None:
    """Train, evaluate on the held-out fold and save; returns the lung checkpoint's path
    (None on other DDP ranks)."""
    args = parse_args(argv)
    configure_logging()
    try:
        config, resume = build_config(args)
        settings = {
            "threshold": args.threshold,
            "input_size": config.data.size,
            "in_channels": config.model.in_channels,
            "min_component_area": args.min_component_area,
            "margin": args.margin,
            "min_box": args.min_box,
            "keep_aspect": args.keep_aspect,
        }
        LungCropper(nn.Identity(), **settings)  # checks the settings before training
        if args.sheet_images < 1:
            raise ConfigError(f"--sheet-images must be >= 1, got {args.sheet_images}")
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    context, progress = start_process(config.trainer)
    train_set, val_set, manifest = build_lung_datasets(
        config.data, in_channels=config.model.in_channels, progress=progress
    )
    train_loader, val_loader = build_fold_loaders(train_set, val_set, config, context)
    model = create_model(config_to_dict(config.model))
    trainer = Trainer(
        model,
        build_loss(config.loss.build_argument()),
        config.trainer,
        out_dir=config.out_dir,
        run_config=config,
    )
    out_dir = Path(config.out_dir)
    if context.is_main:
        save_config(config, out_dir / "config.yaml")
        print(
            f"training the lung model ({config.model.encoder_name} UNet-CBAM at "
            f"{config.data.size}²) on {len(train_set)} images, holding out {len(val_set)} "
            f"(fold {config.data.fold}), {context.world_size} process(es) on {trainer.device}"
        )
    result = trainer.fit(train_loader, val_loader, resume=resume)
    checkpoint = None
    if context.is_main:
        print(
            f"validation Dice at {config.data.size}² (last epoch): {result.metrics['val_dice']:.4f}"
        )
        cropper = LungCropper(trainer.model, **settings, device=trainer.device)
        held_out = manifest[manifest["fold"] == config.data.fold]
        evaluation = evaluate_lung_segmenter(
            cropper, held_out, sheet_images=args.sheet_images, progress=progress
        )
        summary = _report(evaluation, out_dir)
        checkpoint = cropper.save(
            out_dir / CHECKPOINT_NAME,
            config=config_to_dict(config),
            epoch=result.epochs - 1,
            metrics={**result.metrics, **summary},
        )
        print(f"lung checkpoint: {checkpoint} (use --set data.lung_crop={checkpoint})")
        print(f"outputs: {out_dir} (held_out.csv, lung_crops.png, metrics.csv, curves.png)")
    destroy_distributed()
    return checkpoint


if __name__ == "__main__":
    main()
