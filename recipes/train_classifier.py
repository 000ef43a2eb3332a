"""An image-level "pneumothorax present" classifier for gating the segmentation.

Any timm model (--set model.encoder_name=efficientnet_b0; random initialisation unless --set
model.encoder_weights=imagenet) with one logit, BCE or focal loss (--set loss.name=focal
--set loss.gamma=2), trained on balanced batches (data.positive_rate 0.5, as the 9th place)
by the same Trainer as the segmentation models, on the same data: the demo root by default
(written to --demo-dir when missing), or a real SIIM download with --siim-dir. An image is
positive when its mask has any pixel.

--encoder-init SEG.pt starts the classifier's backbone from a trained segmentation model's
encoder (same encoder name and in_channels; its classifier layer starts at random), as several
top solutions' classifiers share the segmentation encoder: the segmentation model has learnt
the lesions from every pixel, a classifier from scratch gets one label per image (on the demo
root, fold 0: ROC AUC 0.96 after 6 epochs from the encoder; from scratch 0.55 after 6, 0.86
after 16). Use a segmentation model trained on the same folds, or its encoder has seen the
classifier's validation images.

Validation each epoch: ROC AUC (val_auc), and at the probability trainer.threshold (default
0.5) F0.5 (val_f05), precision, recall, accuracy and the false-positive rate on negative
images. Checkpoints are kept by --select: auc (default) or f05, F0.5 at the fixed threshold
(the 10th place's selection).

Outputs in --out: config.yaml, last.pt (--resume continues from it), checkpoints/best-*.pt,
metrics.csv, curves.png, and classifier.pt — the best weights, which
recipes/predict.py --classifier CLASSIFIER.pt --gate classifier (or
Predictor.from_checkpoints(..., classifier_checkpoints=[...], gate="classifier")) loads.

Presets (--preset):
  demo  ResNet18 at 128², BCE, balanced batches of 16, cosine Adam 1e-3, 16 epochs: about
        4 minutes on 2 CPU cores (from scratch it learns only after ~7 epochs; with
        --encoder-init, --epochs 6 is enough).
  full  SE-ResNeXt50 at 512², BCE, balanced batches of 16, cosine Adam 1e-4, 20 epochs,
        selection by F0.5.

Examples:
  python recipes/train_classifier.py                                  # demo data and preset
  python recipes/train_classifier.py --epochs 3 --set data.size=96 --select f05
  python recipes/train_classifier.py --encoder-init runs/seg0/checkpoints/best-epoch015.pt
  python recipes/train_classifier.py --preset full --siim-dir /data/siim --fold 0 --out runs/cls0
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_ptx.classifier import (
    CLASSIFIER_PRESETS,
    ClassificationMetrics,
    ClassifierTrainConfig,
    load_segmentation_encoder,
)
from ssl_ptx.cli import (
    add_config_arguments,
    add_resume_argument,
    add_run_arguments,
    configure_logging,
    resolve_config,
    start_process,
)
from ssl_ptx.config import ConfigError, config_to_dict, save_config
from ssl_ptx.engine import CheckpointError, Trainer
from ssl_ptx.engine.data import build_siim_datasets, ensure_demo_root
from ssl_ptx.engine.distributed import destroy_distributed
from ssl_ptx.engine.ema_callback import ExportedModel, export_best
from ssl_ptx.engine.loaders import build_fold_loaders
from ssl_ptx.models import create_model

EXPORT_NAME = "classifier.pt"
#: command-line flag → dotted config key
FLAG_KEYS = {
    "siim_dir": "data.siim_dir",
    "demo_dir": "data.demo_dir",
    "fold": "data.fold",
    "epochs": "trainer.epochs",
    "device": "trainer.device",
    "out": "out_dir",
    "encoder_init": "encoder_init",
}
SELECT_METRICS = {"auc": "val_auc", "f05": "val_f05"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser, CLASSIFIER_PRESETS, set_example="model.encoder_name=resnet34")
    parser.add_argument("--siim-dir", help="real SIIM root (default: the demo root)")
    parser.add_argument("--demo-dir", help="demo data root (default: demo_data)")
    parser.add_argument(
        "--select",
        choices=sorted(SELECT_METRICS),
        help="keep checkpoints by ROC AUC or by F0.5 at trainer.threshold (trainer.monitor)",
    )
    parser.add_argument(
        "--encoder-init",
        metavar="SEG.pt",
        help="segmentation checkpoint whose encoder initialises the classifier's backbone "
        "(encoder_init; same encoder and in_channels)",
    )
    add_run_arguments(parser, lung_crop=False)
    add_resume_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> tuple[ClassifierTrainConfig, Path | None]:
    """The run's :class:`ClassifierTrainConfig` and the checkpoint to resume from (or None)."""
    select = [f"trainer.monitor={SELECT_METRICS[args.select]}"] if args.select else []
    return resolve_config(args, CLASSIFIER_PRESETS, FLAG_KEYS, extra_overrides=select)


def main(argv: list[str] | None = None) -> ExportedModel:
    args = parse_args(argv)
    configure_logging()
    try:
        config, resume = build_config(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    context, progress = start_process(config.trainer)
    if config.data.siim_dir is None:
        ensure_demo_root(
            config.data.demo_dir,
            n_images=config.data.demo_images,
            size=config.data.demo_size,
            progress=progress,
        )
    train_set, val_set, _ = build_siim_datasets(
        config.data, in_channels=config.model.in_channels, progress=progress
    )
    train_loader, val_loader = build_fold_loaders(train_set, val_set, config, context)
    model = create_model(config_to_dict(config.model))
    if config.encoder_init is not None and resume is None:
        try:
            copied = load_segmentation_encoder(model, config.encoder_init)
        except (ValueError, CheckpointError, FileNotFoundError) as error:
            raise SystemExit(f"error: --encoder-init: {error}") from None
        if context.is_main:
            print(f"backbone initialised from {config.encoder_init} ({copied} tensors)")
    trainer = Trainer(
        model,
        config.loss.build(),
        config.trainer,
        out_dir=config.out_dir,
        run_config=config,
        metrics=ClassificationMetrics(config.trainer.threshold),
    )
    if context.is_main:
        save_config(config, Path(config.out_dir) / "config.yaml")
        print(
            f"training a {config.model.encoder_name} classifier ({config.loss.name}) at "
            f"{config.data.size}² on {len(train_set)} images, validating on {len(val_set)} "
            f"(fold {config.data.fold}), checkpoints by {config.trainer.monitor}"
        )
    trainer.fit(train_loader, val_loader, resume=resume)
    exported = export_best(trainer, Path(config.out_dir) / EXPORT_NAME, config.trainer.monitor)
    if context.is_main:
        print(
            f"best epoch {exported.epoch + 1}: {config.trainer.monitor} {exported.score:.4f} "
            f"→ {exported.path}"
        )
    destroy_distributed()
    return exported


if __name__ == "__main__":
    main()
