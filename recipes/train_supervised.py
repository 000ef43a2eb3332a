"""Supervised UNet-CBAM on SIIM-ACR: the base model every semi-supervised recipe starts from.

Data: the demo root by default (written to --demo-dir, default demo_data/, when missing; it has
SIIM's own layout), or a real SIIM download with --siim-dir (DICOM tree + train-rle.csv or
stage_2_train.csv). Images are decoded once into an HDF5 cache (data.cache_dir, default
outputs/cache/) that later runs reuse.

Presets (--preset):
  demo  ResNet18 UNet-CBAM at 128², symmetric Lovasz, Adam 1e-3 with cosine decay, 50 %
        positive sampling, global batch 16, 16 epochs: about 5 minutes on 2 CPU cores.
  full  the 3rd place's final model: SE-ResNeXt50 UNet-CBAM (r 16, k 1) with a hypercolumn
        head, symmetric Lovasz, Adam 1e-4 constant, 576², global batch 9, gradient clipping
        at 1, "aug9" augmentation, 50 % positive sampling, 10 folds, 20 epochs, and their EMA
        of the weights (an exact copy for epochs 1-6, then decay 0.99; checkpoints ranked by
        the EMA's validation Dice). (Their lung crops come with ssl_ptx.lung_crop.)

EMA of the weights (section ema, off in the demo preset): --ema [DECAY] or --set
ema.decay=0.99 switches it on; --set ema.schedule=third_place|fifth_place|constant, --set
ema.copy_epochs=6, --set ema.warmup=mean_teacher|power, --set ema.buffers=average|copy. The EMA
is validated every epoch (ema_val_dice, ema_val_dice_pos, ema_val_fp_rate in metrics.csv and
the curves) and its best weights are kept as checkpoints/ema_best-epochNNN.pt;
--set trainer.monitor=ema_val_dice ranks the trained model's checkpoints by the EMA's Dice.

Every value can be changed, in this order of precedence: the flags below, then --set
SECTION.KEY=VALUE (repeatable; sections model, loss, data, trainer, ema, pseudo; e.g. --set
trainer.lr=3e-4 --set model.encoder_name=resnet34), then --config FILE.yaml (the same
nesting), then the preset. The resolved config is written to OUT/config.yaml; a wrong key or
value stops with a message naming it.

Staged training: a --config file with a list "stages" (each a mapping of dotted keys to
values, applied over the stage before, e.g. {data.size: 1024, trainer.lr: 1.0e-5}) runs the
stages one after another in OUT/stage-<k>/, each from the best weights of the stage before
(fresh optimiser and schedule); OUT/last.pt records the finished stages, so --resume skips them
and continues an interrupted stage. A stage's own keys win over --set and flags such as
--epochs. Examples: recipes/configs/demo_stages.yaml, first_place_stages.yaml,
tenth_place_stages.yaml.

Pseudo labels: --set pseudo.dir=DIR (the folder of a finished pseudo-label filter, OUT/pseudo
of recipes/pseudo_chexpert.py, --filter-only to stop there) trains on the SIIM fold plus its
pseudo labels at pseudo.ratio (default 0.5), soft ones too (with loss.name=soft_bce): in a
stage, that is the 10th place's soft-pseudo stage. A stage whose folder does not exist yet
stops with a message; write it, then --resume.

Other architectures: --set model.arch=fpn|deeplabv3plus|unetplusplus|
unet; --set model.freeze_bn=all freezes BatchNorm (the 4th place).

Outputs in --out: config.yaml, last.pt (full state, with the EMA's; --resume continues from
it), checkpoints/best-epochNNN.pt (top-k model weights by validation Dice, NNN the epoch
number the log prints, from 001; with an EMA also checkpoints/ema_best-epochNNN.pt),
metrics.csv (one row per epoch), curves.png (loss, validation Dice split, learning rate),
tensorboard/ (when installed).

Examples:
  python recipes/train_supervised.py                               # demo data, demo preset
  python recipes/train_supervised.py --epochs 2 --set data.size=64
  python recipes/train_supervised.py --ema 0.99 --set ema.schedule=third_place
  python recipes/train_supervised.py --preset full --siim-dir /data/siim --fold 0 --out runs/f0
  torchrun --nproc_per_node=4 recipes/train_supervised.py --preset full --siim-dir /data/siim
  python recipes/train_supervised.py --resume outputs/demo_supervised/last.pt --epochs 20
  python recipes/train_supervised.py --config recipes/configs/demo_stages.yaml --out runs/staged
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_ptx.cli import (
    add_config_arguments,
    add_resume_argument,
    add_run_arguments,
    configure_logging,
    resolve_config,
    start_process,
)
from ssl_ptx.config import (
    PRESETS,
    ConfigError,
    TrainConfig,
    config_to_dict,
    save_config,
)
from ssl_ptx.engine import (
    CheckpointError,
    FitResult,
    Trainer,
    load_checkpoint,
    load_weights,
)
from ssl_ptx.engine.data import build_siim_datasets
from ssl_ptx.engine.distributed import destroy_distributed
from ssl_ptx.engine.ema_callback import build_ema_callback
from ssl_ptx.engine.loaders import build_val_loader
from ssl_ptx.engine.pseudo_data import build_training_stream
from ssl_ptx.engine.stages import run_stages, stage_configs
from ssl_ptx.losses import build_loss
from ssl_ptx.models import create_model

#: command-line flag → dotted config key
FLAG_KEYS = {
    "siim_dir": "data.siim_dir",
    "demo_dir": "data.demo_dir",
    "fold": "data.fold",
    "lung_crop": "data.lung_crop",
    "epochs": "trainer.epochs",
    "device": "trainer.device",
    "ema": "ema.decay",
    "out": "out_dir",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser, PRESETS)
    parser.add_argument("--siim-dir", help="real SIIM root (default: the demo root)")
    parser.add_argument("--demo-dir", help="demo data root (default: demo_data)")
    parser.add_argument(
        "--ema",
        type=float,
        nargs="?",
        const=0.99,
        metavar="DECAY",
        help="keep an EMA of the weights with this decay (alone: 0.99; ema.decay)",
    )
    add_run_arguments(parser)
    add_resume_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> tuple[TrainConfig, Path | None]:
    """The run's config and the checkpoint to resume from (None for a fresh run)."""
    return resolve_config(args, PRESETS, FLAG_KEYS)


def _print_split(title: str, metrics: dict) -> None:
    print(
        f"{title}: Dice {metrics['val_dice']:.4f} (all-empty prediction "
        f"{metrics['val_all_empty_dice']:.4f}) | positive images {metrics['val_dice_pos']:.4f} "
        f"| false positives on negative images {metrics['val_fp_rate']:.1%}"
    )


def _unprefixed(metrics: dict, prefix: str = "ema_") -> dict:
    """The ``prefix``ed metrics (the EMA's) under the plain names."""
    return {key[len(prefix) :]: value for key, value in metrics.items() if key.startswith(prefix)}


def fit_run(
    config: TrainConfig, init_weights: Path | None = None, resume: Path | None = None
) -> FitResult:
    """Train one run (or one stage) of ``config``: from ``init_weights`` (a checkpoint's model
    weights) when given, continuing ``resume`` (a ``last.pt``) when given."""
    context, progress = start_process(config.trainer)
    train_set, val_set, _ = build_siim_datasets(
        config.data, in_channels=config.model.in_channels, progress=progress
    )
    # with pseudo.dir: SIIM + pseudo labels (the 10th place's soft stage)
    options = context.loader_options()
    train_loader = build_training_stream(config, train_set, progress=progress, **options)
    val_loader = build_val_loader(val_set, config.data, **options)
    model = create_model(config_to_dict(config.model))
    if init_weights is not None:
        load_weights(model, init_weights)
    ema = build_ema_callback(config.ema, default_top_k=config.trainer.top_k)
    trainer = Trainer(
        model,
        build_loss(config.loss.build_argument()),
        config.trainer,
        out_dir=config.out_dir,
        callbacks=[ema] if ema is not None else [],
        run_config=config,
    )
    if context.is_main:
        save_config(config, Path(config.out_dir) / "config.yaml")
        print(
            f"training {config.model.encoder_name} {config.model.arch} at {config.data.size}² on "
            f"{len(train_set)} images, validating on {len(val_set)} (fold {config.data.fold}), "
            f"{context.world_size} process(es) on {trainer.device}"
        )
        if config.pseudo.dir is not None:
            print(f"with the pseudo labels of {config.pseudo.dir}: {train_loader.sampler!r}")
    result = trainer.fit(train_loader, val_loader, resume=resume)
    if context.is_main:
        _print_split(f"last epoch ({result.epochs})", result.metrics)
        if result.best_checkpoint is not None:
            best = load_checkpoint(result.best_checkpoint)
            _print_split(f"best epoch ({best['epoch'] + 1})", best["metrics"])
            print(f"best weights: {result.best_checkpoint}")
        if ema is not None:
            _print_split("EMA, last epoch", {**result.metrics, **_unprefixed(result.metrics)})
            if ema.top_k is not None and ema.top_k.best_path is not None:
                print(f"best EMA weights: {ema.top_k.best_path}")
        print(f"outputs: {config.out_dir} (config.yaml, last.pt, metrics.csv, curves.png)")
    return result


def main(argv: list[str] | None = None) -> FitResult:
    """Train as the command line says; a staged config returns its last stage's result."""
    args = parse_args(argv)
    configure_logging()
    try:
        config, resume = build_config(args)
        if config.stages:
            stage_configs(config)  # every stage's keys checked before training starts
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    try:
        if config.stages:
            result = run_stages(config, fit_run, resume=resume is not None)[-1]
        else:
            result = fit_run(config, resume=resume)
    except FileNotFoundError as error:  # e.g. a stage's pseudo.dir not written yet
        raise SystemExit(f"error: {error}") from None
    destroy_distributed()
    return result


if __name__ == "__main__":
    main()
