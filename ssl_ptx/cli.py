"""Command-line pieces the recipes share: preset / YAML / ``--set`` options and how they resolve.

Every training recipe builds its config the same way, in this order of precedence: its own flags
(mapped to dotted keys by a ``FLAG_KEYS`` dict), then ``--set KEY=VALUE``, then ``--config
FILE.yaml``, then ``--preset`` — or, with ``--resume`` and no ``--preset``, the config stored in
the checkpoint.

Example:
    >>> from ssl_ptx.config import PRESETS
    >>> parser = argparse.ArgumentParser()
    >>> add_config_arguments(parser, PRESETS)
    >>> add_resume_argument(parser)
    >>> args = parser.parse_args(["--set", "trainer.lr=3e-4"])
    >>> config, resume = resolve_config(args, PRESETS, {})
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ssl_ptx.config import TrainerConfig, apply_overrides, config_from_dict, load_config
from ssl_ptx.engine.distributed import DistributedContext, init_distributed
from ssl_ptx.engine.rng import seed_everything

__all__ = [
    "add_config_arguments",
    "add_resume_argument",
    "add_run_arguments",
    "configure_logging",
    "flag_overrides",
    "resolve_config",
    "start_process",
]

ConfigT = TypeVar("ConfigT")

#: file name of the full-state checkpoint a Trainer writes in its output folder
LAST_NAME = "last.pt"


def add_config_arguments(
    parser: argparse.ArgumentParser,
    presets: Mapping[str, Callable[[], Any]],
    *,
    default: str = "demo",
    set_example: str = "trainer.lr=3e-4",
) -> None:
    """Add ``--preset`` (choices: ``presets``), ``--config FILE.yaml`` and ``--set KEY=VALUE``
    (``set_example`` shows one in the help)."""
    parser.add_argument(
        "--preset",
        choices=sorted(presets),
        help=f"starting configuration (default: {default}; with --resume: the checkpoint's)",
    )
    parser.add_argument("--config", type=Path, help="YAML file of overrides over the preset")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one value, e.g. --set {set_example} (repeatable)",
    )


def add_run_arguments(
    parser: argparse.ArgumentParser,
    *,
    fold_help: str = "validation fold (data.fold)",
    epochs_help: str = "training epochs (trainer.epochs)",
    lung_crop: bool = True,
) -> None:
    """Add ``--fold``, ``--lung-crop LUNG_PT`` (when ``lung_crop``), ``--epochs``, ``--device``
    and ``--out``; map them with ``data.fold``, ``data.lung_crop``, ``trainer.epochs``,
    ``trainer.device`` and ``out_dir`` in the recipe's ``FLAG_KEYS``."""
    parser.add_argument("--fold", type=int, help=fold_help)
    if lung_crop:
        parser.add_argument(
            "--lung-crop",
            metavar="LUNG_PT",
            help="train on lung crops: lung_segmenter.pt of recipes/train_lung_segmenter.py "
            "(data.lung_crop; set data.cache_size above data.size, e.g. 256, to keep detail)",
        )
    parser.add_argument("--epochs", type=int, help=epochs_help)
    parser.add_argument(
        "--device", help="auto (CUDA when available), cpu, cuda or cuda:N (trainer.device)"
    )
    parser.add_argument("--out", help="output folder (out_dir)")


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--resume [LAST_PT]`` (alone: ``OUT/last.pt``)."""
    parser.add_argument(
        "--resume",
        nargs="?",
        const="last",
        metavar="LAST_PT",
        help="continue from a last.pt (alone: OUT/last.pt); its stored config replaces the "
        "preset unless --preset is given",
    )


def flag_overrides(args: argparse.Namespace, flag_keys: Mapping[str, str]) -> list[str]:
    """``KEY=VALUE`` overrides of the flags that were given (``flag_keys``: attribute → dotted
    config key), plus ``trainer.progress=false`` for ``--no-progress``."""
    flags = [
        f"{key}={getattr(args, flag)}"
        for flag, key in flag_keys.items()
        if getattr(args, flag, None) is not None
    ]
    if getattr(args, "no_progress", False):
        flags.append("trainer.progress=false")
    return flags


def resolve_config(
    args: argparse.Namespace,
    presets: Mapping[str, Callable[[], ConfigT]],
    flag_keys: Mapping[str, str],
    *,
    default: str = "demo",
    extra_overrides: Sequence[str] = (),
) -> tuple[ConfigT, Path | None]:
    """The run's config and the ``last.pt`` to resume from (None for a fresh run).

    Args:
        args: parsed arguments with ``preset``, ``config``, ``overrides`` (see
            :func:`add_config_arguments`), optionally ``resume`` and ``out``.
        presets: preset name → function returning a fresh config dataclass.
        flag_keys: argument attribute → dotted config key.
        default: the preset used when ``--preset`` is not given.
        extra_overrides: ``KEY=VALUE`` applied after ``--set`` and before the flags
            (e.g. what a ``--loss`` shortcut stands for).

    Raises:
        ssl_ptx.config.ConfigError: an unknown key or a bad value (named in the message).
        ssl_ptx.engine.checkpoint.CheckpointError: ``--resume`` names a file that is not a
            readable checkpoint with a stored config.
    """
    from ssl_ptx.engine.checkpoint import load_checkpoint

    preset = presets[args.preset or default]
    resume = None
    if getattr(args, "resume", None) is not None:
        out_dir = getattr(args, "out", None) or preset().out_dir
        resume = Path(out_dir) / LAST_NAME if args.resume == "last" else Path(args.resume)
    if resume is not None and args.preset is None:
        stored = load_checkpoint(resume, required=("config",))["config"]
        config = config_from_dict(stored, preset(), source=str(resume))
    else:
        config = preset()
    if args.config is not None:
        config = load_config(args.config, base=config)
    overrides = [*args.overrides, *extra_overrides, *flag_overrides(args, flag_keys)]
    return apply_overrides(config, overrides), resume


def configure_logging() -> None:
    """Log INFO and above to stderr as ``time LEVEL message`` (every recipe's log lines)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


def start_process(trainer: TrainerConfig) -> tuple[DistributedContext, bool]:
    """Start this process's part of a run: join the ``torchrun`` process group (or run as
    one process) on ``trainer.device``, seed Python, NumPy and torch with ``trainer.seed``.

    Returns:
        ``(context, progress)``: where the process sits (rank, world size, device) and
        whether it shows progress bars (``trainer.progress``, on rank 0 only).
    """
    context = init_distributed(trainer.device)
    seed_everything(trainer.seed)
    return context, trainer.progress and context.is_main
