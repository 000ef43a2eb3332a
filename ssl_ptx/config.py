"""Typed experiment configuration: dataclasses, YAML files and ``key=value`` overrides.

A run is described by one :class:`TrainConfig` with four sections::

    model    ModelConfig    the network (the keys of ``ssl_ptx.models.create_model``)
    loss     LossConfig     the segmentation loss (``ssl_ptx.losses.build_loss``) and head weight
    data     DataConfig     where the images are, folds, size, augmentation, sampling, batches
    trainer  TrainerConfig  optimiser, schedule, precision, devices, checkpoints, validation

Values come, in order of precedence, from the command line (``--set trainer.lr=3e-4``), a YAML
file (the same nesting: ``trainer: {lr: 3e-4}``), a preset (:data:`PRESETS`) and the dataclass
defaults. Every value is checked against its annotation: an unknown key or a value of the wrong
type raises :class:`ConfigError` naming where it came from (the file or the ``--set`` option),
the dotted key, and what was expected.

Example:
    >>> config = preset("demo")
    >>> config = apply_overrides(config, ["trainer.lr=3e-4", "data.fold=2"])
    >>> config.trainer.lr, config.data.fold
    (0.0003, 2)
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from ssl_ptx.fileio import atomic_path

__all__ = [
    "PRESETS",
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "TrainConfig",
    "TrainerConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "preset",
    "save_config",
]

ConfigT = TypeVar("ConfigT")
_NONE_WORDS = frozenset({"none", "null", "~"})


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message says where it came from."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ModelConfig:
    """The network; ``create_model(config_to_dict(model_config))`` builds it.

    Attributes:
        arch: registered architecture name.
        encoder_name: smp encoder name or a timm encoder as ``"tu-<name>"``.
        encoder_weights: pretrained encoder weights (e.g. ``"imagenet"``), None = random init.
        in_channels: image channels fed to the network (the grey image is repeated).
        cbam_reduction: channel-gate MLP reduction ratio r.
        cbam_kernel: spatial-gate convolution kernel k (7 as in the paper, 1 as in the 3rd place).
        presence_head: add an image-level "pneumothorax present" logit.
        hypercolumn: concatenate upsampled decoder outputs before the segmentation head.
        decoder_channels: output channels of the five decoder blocks, deepest first.
        decoder_interpolation: upsampling mode of the decoder blocks.
    """

    arch: str = "unet_cbam"
    encoder_name: str = "resnet34"
    encoder_weights: str | None = None
    in_channels: int = 1
    cbam_reduction: int = 16
    cbam_kernel: int = 7
    presence_head: bool = False
    hypercolumn: bool = False
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16])
    decoder_interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        _require(
            self.in_channels >= 1, "model.in_channels", f"must be >= 1, got {self.in_channels}"
        )


@dataclass
class LossConfig:
    """The training loss, built by ``ssl_ptx.losses.build_loss``.

    Attributes:
        name: a loss name ("symmetric_lovasz", "lovasz", "bce", "dice", "focal",
            "bce_dice", ...), used when ``terms`` is None.
        terms: a weighted sum instead, loss name → weight (or → ``{weight: w, option: …}``),
            e.g. ``{symmetric_lovasz: 1, presence_bce: 0.1}`` for a model with a presence head.
    """

    name: str = "symmetric_lovasz"
    terms: dict[str, Any] | None = None

    def build_argument(self) -> str | dict[str, Any]:
        """What to pass to ``build_loss``: ``terms`` when given, else ``name``."""
        return self.name if self.terms is None else dict(self.terms)


@dataclass
class DataConfig:
    """Where the images come from and how batches are drawn.

    Attributes:
        siim_dir: a SIIM root in its published layout; None = the demo root ``demo_dir``.
        demo_dir: the demo data root, written with ``demo_images`` images at ``demo_size``²
            when it does not exist yet.
        demo_images: number of SIIM images of a demo root written by the recipe.
        demo_size: side in pixels of a demo root written by the recipe.
        cache_dir: folder of the manifest and HDF5 caches (reused across runs); None = read
            and resize the DICOMs at every access.
        size: training and validation side in pixels.
        n_folds: cross-validation folds of the manifest.
        fold: the validation fold; the others train.
        fold_seed: seed of the fold assignment.
        augment: training augmentation preset (``ssl_ptx.data.transforms``) or "none".
        random_sized_crop: smallest side fraction of an extra random crop (None = none).
        positive_rate: share of positive images per epoch at epoch 0 (every positive once,
            negatives drawn with replacement); None = every image once per epoch, shuffled.
        positive_rate_end: if set, the share moves linearly from ``positive_rate`` to this
            value over ``positive_rate_epochs`` epochs (default: the run's epochs).
        positive_rate_epochs: length of that linear schedule in epochs.
        batch_size: GLOBAL training batch (split evenly over DDP processes).
        val_batch_size: validation batch per process (None = the per-process training batch).
        num_workers: DataLoader worker processes per DDP process.
    """

    siim_dir: str | None = None
    demo_dir: str = "demo_data"
    demo_images: int = 500
    demo_size: int = 256
    cache_dir: str | None = "outputs/cache"
    size: int = 128
    n_folds: int = 5
    fold: int = 0
    fold_seed: int = 0
    augment: str = "light"
    random_sized_crop: float | None = None
    positive_rate: float | None = None
    positive_rate_end: float | None = None
    positive_rate_epochs: int | None = None
    batch_size: int = 8
    val_batch_size: int | None = None
    num_workers: int = 2

    def __post_init__(self) -> None:
        _require(self.size > 0, "data.size", f"must be positive, got {self.size}")
        _require(self.n_folds >= 2, "data.n_folds", f"must be >= 2, got {self.n_folds}")
        _require(
            0 <= self.fold < self.n_folds,
            "data.fold",
            f"must be in [0, {self.n_folds}) with n_folds={self.n_folds}, got {self.fold}",
        )
        _require(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        for key in ("positive_rate", "positive_rate_end"):
            value = getattr(self, key)
            _require(
                value is None or 0.0 < value <= 1.0,
                f"data.{key}",
                f"must be a fraction in (0, 1], got {value}",
            )
        _require(
            self.positive_rate_end is None or self.positive_rate is not None,
            "data.positive_rate_end",
            "needs data.positive_rate (the share at epoch 0)",
        )


@dataclass
class TrainerConfig:
    """How the Trainer optimises, validates and saves.

    Attributes:
        epochs: training epochs.
        device: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N".
        amp: mixed precision: "auto" (bf16 on a CUDA device that supports it, none on CPU),
            "none", "bf16" or "fp16" (fp16 adds a GradScaler).
        optimizer: "adam", "adamw" or "sgd" (momentum ``momentum``, Nesterov).
        lr: peak learning rate.
        weight_decay: weight decay (decoupled for AdamW, L2 otherwise).
        momentum: SGD momentum.
        scheduler: "constant", "cosine" (per optimiser step, down to ``min_lr``) or "plateau"
            (multiply by ``plateau_factor`` when ``monitor`` has not improved for
            ``plateau_patience`` epochs).
        warmup_epochs: linear warm-up from 0 over this many epochs (may be fractional;
            constant and cosine schedules).
        min_lr: cosine floor and plateau minimum.
        plateau_patience: epochs without improvement before a plateau reduction.
        plateau_factor: plateau multiplier.
        accumulate: micro-batches per optimiser step (gradient accumulation).
        clip_grad_norm: clip the global gradient 2-norm to this value (None = no clipping).
        seed: seed of the initial weights' RNG, the data order and augmentation.
        threshold: validation probability threshold of a foreground pixel.
        monitor: validation metric that ranks checkpoints ("val_dice", ...; higher is better,
            except names ending in "loss").
        top_k: best checkpoints kept (0 = none).
        save_every_n_steps: also write ``last.pt`` every N optimiser steps (0 = per epoch only).
        max_nonfinite: consecutive non-finite losses that stop the run (after a checkpoint).
        sync_bn: convert BatchNorm to SyncBatchNorm under DDP.
        progress: tqdm progress bars (rank 0 only).
        tensorboard: write TensorBoard events (None = when ``tensorboard`` is installed).
    """

    epochs: int = 10
    device: str = "auto"
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: Literal["constant", "cosine", "plateau"] = "constant"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    accumulate: int = 1
    clip_grad_norm: float | None = None
    seed: int = 0
    threshold: float = 0.5
    monitor: str = "val_dice"
    top_k: int = 3
    save_every_n_steps: int = 0
    max_nonfinite: int = 5
    sync_bn: bool = False
    progress: bool = True
    tensorboard: bool | None = None

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "trainer.epochs", f"must be >= 1, got {self.epochs}")
        _require(self.lr > 0, "trainer.lr", f"must be positive, got {self.lr}")
        _require(self.accumulate >= 1, "trainer.accumulate", f"must be >= 1, got {self.accumulate}")
        _require(
            self.clip_grad_norm is None or self.clip_grad_norm > 0,
            "trainer.clip_grad_norm",
            f"must be positive or none, got {self.clip_grad_norm}",
        )
        _require(
            0.0 < self.threshold < 1.0,
            "trainer.threshold",
            f"must be a probability in (0, 1), got {self.threshold}",
        )
        _require(self.warmup_epochs >= 0, "trainer.warmup_epochs", "must be >= 0")
        _require(self.top_k >= 0, "trainer.top_k", f"must be >= 0, got {self.top_k}")
        _require(self.save_every_n_steps >= 0, "trainer.save_every_n_steps", "must be >= 0")
        _require(self.max_nonfinite >= 1, "trainer.max_nonfinite", "must be >= 1")
        _require(
            0.0 < self.plateau_factor < 1.0,
            "trainer.plateau_factor",
            f"must be in (0, 1), got {self.plateau_factor}",
        )


@dataclass
class TrainConfig:
    """A whole supervised run: the four sections and the output folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    out_dir: str = "outputs/supervised"


def _demo_preset() -> TrainConfig:
    """Minutes on 2 CPU cores: ResNet18 UNet-CBAM at 128², balanced sampling, cosine Adam."""
    return TrainConfig(
        model=ModelConfig(encoder_name="resnet18", decoder_channels=[128, 64, 32, 16, 16]),
        loss=LossConfig(name="symmetric_lovasz"),
        data=DataConfig(size=128, augment="light", positive_rate=0.5, batch_size=16),
        trainer=TrainerConfig(
            epochs=16, lr=1e-3, scheduler="cosine", warmup_epochs=0.5, clip_grad_norm=1.0
        ),
        out_dir="outputs/demo_supervised",
    )


def _full_preset() -> TrainConfig:
    """The 3rd place's final model (bestfitting): SE-ResNeXt50 UNet with CBAM (r 16, k 1) in
    the decoder and a hypercolumn head, symmetric Lovasz, Adam 1e-4 constant, 576², global
    batch 9, gradient clipping at 1, "aug9", 50/50 positive sampling, 10 folds, 20 epochs.
    The EMA (0.99 from epoch 7) arrives with ``ssl_ptx.ema``."""
    return TrainConfig(
        model=ModelConfig(
            encoder_name="se_resnext50_32x4d",
            in_channels=3,
            cbam_reduction=16,
            cbam_kernel=1,
            hypercolumn=True,
            decoder_channels=[32, 32, 32, 32, 32],
        ),
        loss=LossConfig(name="symmetric_lovasz"),
        data=DataConfig(
            size=576,
            n_folds=10,
            augment="bestfitting",
            positive_rate=0.5,
            batch_size=9,
            num_workers=4,
        ),
        trainer=TrainerConfig(epochs=20, lr=1e-4, scheduler="constant", clip_grad_norm=1.0),
        out_dir="outputs/supervised_full",
    )


#: name → function returning a fresh :class:`TrainConfig`
PRESETS: dict[str, typing.Callable[[], TrainConfig]] = {
    "demo": _demo_preset,
    "full": _full_preset,
}


def preset(name: str) -> TrainConfig:
    """A fresh copy of the preset ``name`` (a key of :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()


# ---------------------------------------------------------------------------------------------
# conversion with type checks


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _coerce_scalar(value: Any, annotation: type, where: str) -> Any:
    """``value`` as ``annotation`` (bool, int, float or str); strings holding numbers convert."""
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{where}: unsupported annotation {annotation!r}")
    raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation and convert what is unambiguous."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if _is_union(annotation):
        options = typing.get_args(annotation)
        if type(None) in options and (
            value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS)
        ):
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(annotation)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(annotation)
        return {
            _coerce(k, key_type, f"{where} key"): _coerce(v, value_type, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    return _coerce_scalar(value, annotation, where)


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _merge(base: Any, data: Mapping[str, Any], source: str, prefix: str) -> Any:
    """``base`` (a dataclass instance) with the values of ``data`` checked and applied."""
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{source}: {where}: expected a mapping of keys, got {data!r}")
    fields = _fields(type(base))
    changes: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key {dotted!r}; known keys here: "
                + ", ".join(f"{prefix}{name}" for name in fields)
            )
        current = getattr(base, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _merge(current, value, source, f"{dotted}.")
        else:
            changes[key] = _coerce(value, fields[key], f"{source}: {dotted}")
    try:
        return dataclasses.replace(base, **changes)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def config_from_dict(data: Mapping[str, Any], base: ConfigT, *, source: str = "config") -> ConfigT:
    """A copy of ``base`` (a config dataclass) updated with the nested mapping ``data``.

    Raises:
        ConfigError: an unknown key, a value of the wrong type or out of range; the message
            starts with ``source`` and names the dotted key.
    """
    return _merge(base, data, source, "")


def config_to_dict(config: Any) -> dict[str, Any]:
    """The nested plain-Python dict of a config dataclass (YAML- and ``torch.save``-safe)."""
    return dataclasses.asdict(config)


def load_config(path: str | os.PathLike, base: ConfigT | None = None) -> ConfigT:
    """Read a YAML file over ``base`` (default: a default :class:`TrainConfig`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: invalid YAML, an unknown key or a wrong value, naming ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    base = TrainConfig() if base is None else base
    return config_from_dict(data or {}, base, source=str(path))


def apply_overrides(config: ConfigT, overrides: Sequence[str]) -> ConfigT:
    """Apply ``key=value`` strings, the key dotted (``trainer.lr=3e-4``, ``data.fold=1``).

    Values are parsed as YAML (``[1, 2]``, ``{0: 0.8}``, ``true``); ``none`` or ``null`` set an
    optional value to None; a value for a text field is taken verbatim.

    Raises:
        ConfigError: a malformed option, an unknown key or a wrong value, naming the option.
    """
    for option in overrides:
        key, sep, raw = option.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {option!r}: expected KEY=VALUE, e.g. trainer.lr=3e-4")
        *parents, leaf = key.split(".")
        section: Any = config
        for depth, name in enumerate(parents):
            section = getattr(section, name, None)
            if not dataclasses.is_dataclass(section):
                where = ".".join(parents[: depth + 1])
                raise ConfigError(f"--set {option!r}: {where!r} is not a config section")
        annotation = _fields(type(section)).get(leaf)
        value: Any = raw
        if annotation is not None and annotation is not str and not _text_field(annotation):
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as error:
                raise ConfigError(f"--set {option!r}: cannot parse {raw!r}: {error}") from None
        nested: dict[str, Any] = {leaf: value}
        for name in reversed(parents):
            nested = {name: nested}
        config = config_from_dict(nested, config, source=f"--set {option}")
    return config


def _text_field(annotation: Any) -> bool:
    """True for ``str`` and ``str | None``: keep command-line text as typed."""
    if annotation is str:
        return True
    return _is_union(annotation) and set(typing.get_args(annotation)) == {str, type(None)}


def save_config(config: Any, path: str | os.PathLike) -> Path:
    """Write ``config`` as YAML (atomically); :func:`load_config` reads it back."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path
