"""The Trainer: supervised segmentation training that resumes exactly and runs under torchrun.

One :class:`Trainer` owns the model, the optimiser, the learning-rate schedule and the loop:

* device picked automatically (``cuda:LOCAL_RANK`` when CUDA is available, else CPU);
* mixed precision with ``torch.autocast`` (bf16, or fp16 with a ``GradScaler``); losses are
  computed in float32;
* gradient accumulation (``accumulate`` micro-batches per step, DDP gradient sync only on the
  last; an epoch's last ``n mod accumulate`` micro-batches, an incomplete window, are left
  out, as the loaders leave out an incomplete batch) and clipping of the global gradient norm;
* Adam / AdamW / SGD; constant or cosine schedules per optimiser step with linear warm-up, or
  reduce-on-plateau per epoch;
* validation every epoch (or every ``val_every`` epochs and after the last) with the
  competition Dice at a probability threshold, the Dice of positive images and the
  false-positive rate on negative images, gathered over processes
  (or other per-image metrics: ``metrics=``, see :mod:`ssl_ptx.engine.validation`);
* ``last.pt`` with the complete state, written atomically at every epoch end (and every
  ``save_every_n_steps`` optimiser steps); ``fit(resume="…/last.pt")`` continues to the same
  weights an uninterrupted run reaches (on CPU with the same seed);
* a non-finite loss skips its optimiser step; ``max_nonfinite`` in a row write ``last.pt``
  and stop with :class:`NonFiniteLossError`;
* callbacks (:mod:`ssl_ptx.engine.callbacks`) for everything else: metrics CSV, training
  curves, TensorBoard, top-k checkpoints by default.

Determinism: at the start of epoch ``e`` the sampler gets ``set_epoch(e)``, the loader's
generator and (without workers) the augmentation pipeline are seeded from
``(seed, e, rank)``, and so are Python's, NumPy's and torch's global generators. An epoch's
batches and random ops therefore depend on the seed and the epoch only, not on what ran
before; mid-epoch checkpoints also store every process's global RNG states, and resuming
skips the batches already done (they are loaded, not computed).

Extending: override :meth:`Trainer.training_step` (``batch -> (loss, logs)``, as USB's
``train_step``), :meth:`Trainer.compute_loss`, :meth:`Trainer.validation_step`,
:meth:`Trainer.batch_size` (batches that are not ``{"image": …}`` dicts) or
:meth:`Trainer.after_optimizer_step` (e.g. a teacher update; see
:mod:`ssl_ptx.engine.semi`); add callbacks (e.g. :mod:`ssl_ptx.engine.ema_callback`). The
model is wrapped in ``DistributedDataParallel`` for training only (``trainer.train_model``);
``trainer.model`` is always the plain module, which validation uses. :meth:`Trainer.evaluate`
also validates another model (an EMA, a teacher) with the same metrics.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau
from tqdm.auto import tqdm

from ssl_ptx.config import TrainerConfig, config_to_dict
from ssl_ptx.engine.callbacks import Callback, TopKCheckpoint, monitor_mode
from ssl_ptx.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ssl_ptx.engine.distributed import (
    all_gather_arrays,
    all_gather_objects,
    all_ranks_true,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    init_distributed,
    unwrap_model,
)
from ssl_ptx.engine.loaders import (
    epochs_batches,
    load_loader_state,
    loader_state,
    reseed_loader,
    set_loader_epoch,
)
from ssl_ptx.engine.logging import (
    CSVLogger,
    TensorBoardLogger,
    TrainingCurves,
    tensorboard_available,
    validated_prefixes,
)
from ssl_ptx.engine.rng import capture_rng_state, derive_seed, restore_rng_state, seed_everything
from ssl_ptx.engine.validation import SegmentationMetrics, ValidationMetrics
from ssl_ptx.losses import IGNORE_TARGET

__all__ = [
    "FitResult",
    "NonFiniteLossError",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "resolve_amp_dtype",
    "split_outputs",
]

logger = logging.getLogger(__name__)

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
Scheduler = LRScheduler | ReduceLROnPlateau
_FULL, _WEIGHTS = "full", "weights"
_RNG_STREAM, _DATA_STREAM = 0, 1  # distinct derived seeds for global RNGs and for the data


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; ``last.pt`` holds a resumable state."""


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        metrics: the last epoch's ``callback_metrics`` (``val_dice``, ``val_dice_pos``,
            ``val_fp_rate``, ``val_all_empty_dice``, ``train_loss``, ``lr``, …).
        best_score: best value of the monitored metric (NaN without validation).
        best_checkpoint: its weights file (None without top-k checkpoints).
        last_checkpoint: ``last.pt``.
        epochs: epochs completed.
        global_step: optimiser steps taken.
    """

    metrics: dict[str, float]
    best_score: float
    best_checkpoint: Path | None
    last_checkpoint: Path
    epochs: int
    global_step: int


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` ("auto", "none", "bf16", "fp16") on ``device``.

    "auto" is bf16 on a CUDA device that supports it and no autocast otherwise (CPU autocast
    is rarely faster).
    """
    if amp == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    choices = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in choices:
        raise ValueError(f"amp must be one of auto, none, bf16, fp16; got {amp!r}")
    return choices[amp]


def build_optimizer(
    parameters: Iterable[nn.Parameter], config: TrainerConfig
) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (Nesterov momentum) from ``config``; only trainable parameters."""
    trainable = [p for p in parameters if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            trainable,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    raise ValueError(f"trainer.optimizer must be adam, adamw or sgd; got {config.optimizer!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainerConfig, steps_per_epoch: Sequence[int]
) -> Scheduler:
    """The learning-rate schedule of ``config.scheduler``.

    "constant" and "cosine" are ``LambdaLR`` schedules stepped after every optimiser step:
    a linear warm-up over ``warmup_epochs`` (counted in steps), then constant, or a half
    cosine from ``lr`` down to ``min_lr`` at the last step. "plateau" is
    ``ReduceLROnPlateau`` on ``config.monitor``, stepped once per epoch.

    Args:
        optimizer: the optimiser whose learning rate is scheduled.
        config: the trainer section.
        steps_per_epoch: optimiser steps of every epoch of the run (epochs may differ in
            length under the positive-rate sampler).
    """
    if config.scheduler == "plateau":
        return ReduceLROnPlateau(
            optimizer,
            mode=monitor_mode(config.monitor),
            factor=config.plateau_factor,
            patience=config.plateau_patience,
            min_lr=config.min_lr,
        )
    if config.scheduler not in ("constant", "cosine"):
        raise ValueError(
            f"trainer.scheduler must be constant, cosine or plateau; got {config.scheduler!r}"
        )
    total = max(1, sum(steps_per_epoch))
    warmup = min(total, round(config.warmup_epochs * total / max(1, len(steps_per_epoch))))
    floor = config.min_lr / config.lr
    cosine = config.scheduler == "cosine"

    # a plain function, so LambdaLR does not store it: on resume the shape comes from the
    # current config and only the position (the step count) from the checkpoint
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def split_outputs(outputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(mask_logits [B,1,H,W], presence_logits [B,1] or None)`` from a model's output:
    a tensor, or a ``(mask_logits, presence_logits)`` tuple."""
    if isinstance(outputs, torch.Tensor):
        return outputs, None
    if isinstance(outputs, (tuple, list)) and len(outputs) == 2:
        return outputs[0], outputs[1]
    raise TypeError(
        "the model must return mask logits or (mask_logits, presence_logits); got "
        f"{type(outputs).__name__}"
    )


class Trainer:
    """Train a segmentation model; see the module docstring for what it does.

    Args:
        model: returns mask logits ``[B,1,H,W]`` or ``(mask_logits, presence_logits [B,1])``
            for images ``[B,C,H,W]``. Moved to the trainer's device.
        loss_fn: ``loss_fn(outputs, masks [B,1,H,W] 0/1) -> scalar``, where ``outputs`` is
            the model's output cast to float32 (mask logits, or the tuple with presence
            logits), as the modules of ``ssl_ptx.losses.build_loss`` take it.
        config: the trainer section of the run's config.
        out_dir: folder of ``last.pt``, ``checkpoints/``, ``metrics.csv``, ``curves.png``.
        callbacks: extra callbacks, called after the default ones in this order.
        run_config: the whole run's config (a dataclass or dict) stored in checkpoints;
            default: ``config``.
        default_callbacks: add the metrics CSV, the curve PNG, top-k checkpoints (when
            ``config.top_k`` > 0) and TensorBoard (per ``config.tensorboard``).
        metrics: what validation measures; default :class:`SegmentationMetrics` at
            ``config.threshold`` (e.g. :class:`ssl_ptx.classifier.ClassificationMetrics` for
            an image classifier).

    Attributes:
        model: the plain module (validation, checkpoints, EMA updates use it).
        train_model: what the training step calls: ``model`` or its DDP wrapper.
        optimizer, scheduler, scaler: the optimisation state (scheduler built by ``fit``).
        epoch: 0-based index of the current (or next) epoch.
        global_step: optimiser steps taken.
        batches_done: micro-batches done in the current epoch.
        epoch_batches: micro-batches the current epoch trains on: the loader's batches less
            the last ``n mod accumulate`` (an incomplete accumulation window).
        callback_metrics: this epoch's metrics so far (what the CSV row will hold).
        should_stop: set by a callback to stop after the current epoch.
        val_loader: the validation loader of the running ``fit`` (None without one), for
            callbacks that validate another model.
    """

    last_name = "last.pt"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        config: TrainerConfig,
        *,
        out_dir: str | Path,
        callbacks: Sequence[Callback] = (),
        run_config: Any = None,
        default_callbacks: bool = True,
        metrics: ValidationMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else SegmentationMetrics(config.threshold)
        self.context = init_distributed(config.device)
        self.device = self.context.device
        self.out_dir = Path(out_dir)
        self.loss_fn = loss_fn.to(self.device) if isinstance(loss_fn, nn.Module) else loss_fn
        self.run_config = config_to_dict(run_config if run_config is not None else config)

        model = model.to(self.device)
        if config.sync_bn and self.context.is_distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.train_model: nn.Module = model
        if self.context.is_distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(model, device_ids=device_ids)

        self.amp_dtype = resolve_amp_dtype(config.amp, self.device)
        self.scaler = (
            torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        )
        self.optimizer = build_optimizer(self.model.parameters(), config)
        self.scheduler: Scheduler | None = None

        self.callbacks: list[Callback] = []
        if default_callbacks:
            self.callbacks.extend(self._default_callbacks())
        self.callbacks.extend(callbacks)
        keys = [cb.state_key for cb in self.callbacks]
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        if duplicated:
            raise ValueError(
                f"callbacks share the state_key(s) {duplicated}; give them distinct keys"
            )

        self.epoch = 0
        self.global_step = 0
        self.batches_done = 0
        self.epoch_batches = 0
        self.nonfinite_streak = 0
        self.callback_metrics: dict[str, float] = {}
        self.should_stop = False
        self._epoch_sums: dict[str, float] = {}
        self._resume_rng: Mapping[str, Any] | None = None
        self._train_loader: Any = None
        self.val_loader: Iterable | None = None

    # ------------------------------------------------------------------ properties / helpers

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.context.is_main

    @property
    def rank(self) -> int:
        return self.context.rank

    @property
    def world_size(self) -> int:
        return self.context.world_size

    @property
    def last_path(self) -> Path:
        return self.out_dir / self.last_name

    @property
    def weights_epoch(self) -> int:
        """0-based epoch the model's weights come from: the epoch in progress (training or
        validating), else the last one finished (between epochs and after ``fit``, when
        ``epoch`` already counts the next); -1 before any training."""
        return self.epoch if self.batches_done else self.epoch - 1

    @property
    def lr(self) -> float:
        """Current learning rate of the first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def top_k(self) -> TopKCheckpoint | None:
        """The first :class:`TopKCheckpoint` callback, if any."""
        return next((cb for cb in self.callbacks if isinstance(cb, TopKCheckpoint)), None)

    def _default_callbacks(self) -> list[Callback]:
        csv_logger = CSVLogger(self.out_dir / "metrics.csv")
        callbacks: list[Callback] = [
            csv_logger,
            TrainingCurves(csv_logger, self.out_dir / "curves.png"),
        ]
        if self.config.top_k > 0:
            callbacks.append(
                TopKCheckpoint(
                    self.out_dir / "checkpoints", k=self.config.top_k, monitor=self.config.monitor
                )
            )
        tensorboard = self.config.tensorboard
        if tensorboard or (tensorboard is None and tensorboard_available()):
            callbacks.append(TensorBoardLogger(self.out_dir / "tensorboard"))
        return callbacks

    def _call(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context of the forward pass (a no-op without AMP)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def batch_size(self, batch: Mapping[str, Any]) -> int:
        """Images of a training batch that the epoch's mean loss is weighted by."""
        return len(batch["image"])

    def to_device(self, batch: Any) -> Any:
        """``batch`` with every tensor (in dicts, lists, tuples) on the trainer's device."""
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, Mapping):
            return {key: self.to_device(value) for key, value in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(value) for value in batch)
        return batch

    # ------------------------------------------------------------------ overridable steps

    def training_step(
        self, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward one micro-batch through ``train_model`` and return ``(loss, logs)``.

        ``loss`` is a scalar tensor to back-propagate; ``logs`` maps names to scalar tensors
        averaged over the epoch into ``train_<name>``.
        """
        with self.autocast():
            outputs = self.train_model(batch["image"])
        return self.compute_loss(outputs, batch)

    def compute_loss(
        self, outputs: Any, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``loss_fn(outputs, masks)`` in float32 outside autocast, on the images whose
        ``has_mask`` is true (all of them in supervised training). ``outputs`` is what the
        model returned: mask logits or the ``(mask_logits, presence_logits)`` tuple. Mask
        pixels equal to :data:`~ssl_ptx.losses.IGNORE_TARGET` (a pseudo label's confidence
        band) are left out: ``loss_fn(outputs, masks, valid=...)`` with them set to 0."""
        with torch.autocast(device_type=self.device.type, enabled=False):
            parts = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
            parts = [part.float() for part in parts]
            targets = batch["mask"].float()
            has_mask = batch.get("has_mask")
            if has_mask is not None and not bool(has_mask.all()):
                parts = [part[has_mask] for part in parts]
                targets = targets[has_mask]
            if not len(targets):
                return parts[0].sum() * 0.0, {}
            outputs = parts[0] if len(parts) == 1 else tuple(parts)
            ignore = targets == IGNORE_TARGET
            if not bool(ignore.any()):
                return self.loss_fn(outputs, targets), {}
            if not getattr(self.loss_fn, "supports_ignore", False):
                raise ValueError(
                    f"the batch marks pixels to leave out of the loss (a pseudo label's "
                    f"confidence band) but {type(self.loss_fn).__name__} cannot leave pixels "
                    "out; use symmetric_lovasz, lovasz or bce"
                )
            loss = self.loss_fn(outputs, targets.masked_fill(ignore, 0.0), valid=~ignore)
        return loss, {}

    def validation_step(
        self, batch: Mapping[str, Any], model: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask_logits [B,1,H,W] float32, loss scalar)`` of ``model`` (default: the plain
        ``model``)."""
        with self.autocast():
            outputs = (self.model if model is None else model)(batch["image"])
        loss, _ = self.compute_loss(outputs, batch)
        return split_outputs(outputs)[0].float(), loss

    def after_optimizer_step(self) -> None:
        """Called after every optimiser step (the learning rate already scheduled); a no-op
        here. Subclasses update what follows the weights, e.g. a Mean Teacher's teacher."""

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        *,
        resume: str | Path | None = None,
    ) -> FitResult:
        """Train for ``config.epochs`` epochs (or until ``should_stop``), validating every
        ``config.val_every`` epochs and after the last.

        Args:
            train_loader: a DataLoader of dict batches (``image``, ``mask``, ``label``,
                ``has_mask``); see :func:`ssl_ptx.engine.loaders.build_train_loader`.
            val_loader: the validation DataLoader (sharded, not padded, under DDP), or None.
            resume: a ``last.pt`` to continue from.

        Returns:
            A :class:`FitResult`.

        Raises:
            NonFiniteLossError: ``max_nonfinite`` non-finite losses in a row.
            CheckpointError: ``resume`` is unreadable or not a full checkpoint.
        """
        config = self.config
        if config.scheduler == "plateau" and val_loader is None:
            raise ValueError("trainer.scheduler=plateau needs a validation loader")
        self._train_loader = train_loader
        self.val_loader = val_loader
        batches = epochs_batches(train_loader, config.epochs)
        if min(batches) == 0:
            raise ValueError(
                f"the training loader yields no batch in epoch {batches.index(0) + 1}: fewer "
                "samples per process than the batch size (incomplete batches are dropped); "
                "lower data.batch_size or use more images"
            )
        steps = [n // config.accumulate for n in batches]
        if min(steps) == 0:
            short = steps.index(0)
            raise ValueError(
                f"epoch {short + 1} has {batches[short]} micro-batch(es), fewer than "
                f"trainer.accumulate={config.accumulate}: no complete optimiser step; lower "
                "trainer.accumulate or data.batch_size, or use more images"
            )
        self._log_left_out(batches)
        if self.scheduler is None:
            self.scheduler = build_scheduler(self.optimizer, config, steps)
        if resume is not None:
            self.load_state(resume)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._call("on_fit_start")
        try:
            while self.epoch < config.epochs and not self.should_stop:
                started = time.perf_counter()
                self.callback_metrics = {"epoch": self.epoch}
                self.callback_metrics.update(self._train_epoch(train_loader))
                if val_loader is not None and self.validates(self.epoch):
                    self._validation_epoch(val_loader)
                if isinstance(self.scheduler, ReduceLROnPlateau):
                    self.scheduler.step(self._monitored())
                self.callback_metrics.update(
                    step=self.global_step, lr=self.lr, epoch_time_s=time.perf_counter() - started
                )
                self._call("on_train_epoch_end")
                self._log_epoch()
                self.epoch += 1
                self.batches_done = 0
                self._epoch_sums = {}
                self.save_last()
            self._call("on_fit_end")
        except BaseException as error:
            for callback in self.callbacks:
                try:
                    callback.on_exception(self, error)
                except Exception:  # the original error matters more
                    logger.exception("%s.on_exception failed", type(callback).__name__)
            raise
        barrier()
        top_k = self.top_k
        return FitResult(
            metrics=dict(self.callback_metrics),
            best_score=top_k.best_score if top_k else math.nan,
            best_checkpoint=top_k.best_path if top_k else None,
            last_checkpoint=self.last_path,
            epochs=self.epoch,
            global_step=self.global_step,
        )

    def _log_left_out(self, batches: Sequence[int]) -> None:
        """Say once per ``fit`` how many micro-batches incomplete accumulation windows leave
        out (``batches``: micro-batches of every epoch)."""
        accumulate = self.config.accumulate
        left_out = sum(n % accumulate for n in batches)
        if left_out and self.is_main:
            logger.info(
                "trainer.accumulate=%d: the last n mod %d micro-batches of an epoch of n are "
                "left out (no forward, no step; %d of %d in epoch 1, %d of %d in the run), as "
                "the loader leaves out an incomplete batch",
                accumulate,
                accumulate,
                batches[0] % accumulate,
                batches[0],
                left_out,
                sum(batches),
            )

    def _train_epoch(self, loader: Iterable) -> dict[str, float]:
        config = self.config
        set_loader_epoch(loader, self.epoch)
        reseed_loader(loader, derive_seed(config.seed, self.epoch, self.rank, _DATA_STREAM))
        skip = self.batches_done
        self.train_model.train()
        self._call("on_train_epoch_start")
        n_batches = len(loader)
        self.epoch_batches = n_batches - n_batches % config.accumulate
        iterator = iter(loader)
        for _ in range(skip):  # resumed mid-epoch: replay the data stream without computing
            next(iterator)
        if skip and self._resume_rng is not None:
            restore_rng_state(self._resume_rng)
        elif not skip:
            seed_everything(derive_seed(config.seed, self.epoch, self.rank, _RNG_STREAM))
        self._resume_rng = None
        sums = self._epoch_sums
        for key in ("loss", "images", "nonfinite"):  # the same keys on every process
            sums.setdefault(key, 0.0)
        bar = tqdm(
            total=self.epoch_batches,
            initial=skip,
            desc=f"epoch {self.epoch + 1}/{config.epochs}",
            unit="batch",
            leave=False,
            dynamic_ncols=True,
            disable=not (config.progress and self.is_main),
        )
        started = time.perf_counter()
        window_bad = False
        with bar:
            todo = itertools.islice(iterator, max(0, self.epoch_batches - skip))
            for batch_idx, batch in enumerate(todo, start=skip):
                batch = self.to_device(batch)
                closes_window = (batch_idx + 1) % config.accumulate == 0
                loss, logs, finite = self._forward_backward(batch, closes_window)
                images = self.batch_size(batch)
                stepped = False
                grad_norm = None
                if finite:
                    self.nonfinite_streak = 0
                    sums["loss"] += float(loss.detach()) * images
                    sums["images"] += images
                    for key, value in logs.items():
                        sums[f"log_{key}"] = sums.get(f"log_{key}", 0.0) + float(value) * images
                else:
                    window_bad = True
                    self.nonfinite_streak += 1
                    sums["nonfinite"] += 1
                    if self.is_main:
                        logger.warning(
                            "epoch %d batch %d: non-finite loss (%s); optimiser step skipped "
                            "(%d in a row, stop at %d)",
                            self.epoch + 1,
                            batch_idx,
                            float(loss.detach()),
                            self.nonfinite_streak,
                            config.max_nonfinite,
                        )
                if closes_window:
                    if window_bad:
                        self.optimizer.zero_grad(set_to_none=True)
                    else:
                        grad_norm = self._optimizer_step()
                        stepped = True
                    window_bad = False
                self.batches_done = batch_idx + 1
                outputs = {
                    "loss": loss.detach(),
                    "logs": logs,
                    "optimizer_stepped": stepped,
                    "skipped": not finite,
                    "grad_norm": grad_norm,
                }
                self._call("on_train_batch_end", outputs, batch, batch_idx)
                if closes_window and self.nonfinite_streak >= config.max_nonfinite:
                    self._stop_non_finite(float(loss.detach()), batch_idx)
                if (
                    stepped
                    and config.save_every_n_steps
                    and self.global_step % config.save_every_n_steps == 0
                    and self.batches_done < self.epoch_batches
                ):
                    self.save_last()
                bar.update()
                if sums.get("images"):
                    bar.set_postfix(
                        loss=f"{sums['loss'] / sums['images']:.4f}", lr=f"{self.lr:.2e}"
                    )
        for _ in iterator:  # the left-out tail is drawn, not computed: the loader's epoch
            pass  # then completes (a TwoStreamLoader advances its unlabelled stream)
        seconds = time.perf_counter() - started
        return self._train_metrics(sums, seconds)

    def _forward_backward(
        self, batch: Mapping[str, Any], closes_window: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
        """Forward and backward of one micro-batch; DDP gradient sync only if it closes the
        accumulation window. A non-finite loss (on any process) is not back-propagated —
        except under DDP, where a zero-weighted backward keeps the processes in step."""
        distributed = isinstance(self.train_model, DistributedDataParallel)
        sync = (
            contextlib.nullcontext()
            if closes_window or not distributed
            else self.train_model.no_sync()
        )
        with sync:
            loss, logs = self.training_step(batch)
            finite = all_ranks_true(bool(torch.isfinite(loss.detach()).item()))
            if finite:
                self._backward(loss / self.config.accumulate)
            elif distributed:
                self._backward(loss.nan_to_num(0.0, 0.0, 0.0) * 0.0)
        return loss, logs, finite

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _optimizer_step(self) -> torch.Tensor | None:
        """Unscale, hook, clip, step, schedule, zero; returns the pre-clip gradient norm when
        clipping (else None)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self._call("on_before_optimizer_step", self.optimizer)
        grad_norm = None
        if self.config.clip_grad_norm is not None:
            grad_norm = nn.utils.clip_grad_norm_(
                self.model.parameters(), self.config.clip_grad_norm
            )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if isinstance(self.scheduler, LRScheduler):
            self.scheduler.step()
        self.after_optimizer_step()
        return grad_norm

    def _stop_non_finite(self, value: float, batch_idx: int) -> None:
        self.save_last()
        raise NonFiniteLossError(
            f"{self.nonfinite_streak} non-finite losses in a row (last: {value}) at epoch "
            f"{self.epoch + 1}, batch {batch_idx}; training stopped. The state before these "
            f"batches' steps is in {self.last_path}. Lower trainer.lr, set "
            "trainer.clip_grad_norm, or use trainer.amp=none/bf16, then resume from it."
        )

    def _train_metrics(self, sums: Mapping[str, float], seconds: float) -> dict[str, float]:
        """Epoch means of the loss and logs over all processes, throughput, skipped steps."""
        keys = sorted(sums)
        totals = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        total = dict(zip(keys, totals.tolist(), strict=True))
        images = total["images"]
        metrics = {"train_loss": total["loss"] / images if images else math.nan}
        for key in keys:
            if key.startswith("log_"):
                metrics[f"train_{key[4:]}"] = total[key] / images if images else math.nan
        metrics["train_nonfinite"] = total["nonfinite"]
        metrics["train_images_per_s"] = images / seconds if seconds > 0 else math.nan
        return metrics

    # ------------------------------------------------------------------ validation

    def _validation_epoch(self, loader: Iterable) -> None:
        self.model.eval()
        self._call("on_validation_epoch_start")
        self.callback_metrics.update(self.evaluate(loader))
        self._call("on_validation_epoch_end")
        self.train_model.train()

    @torch.no_grad()
    def evaluate(self, loader: Iterable, model: nn.Module | None = None) -> dict[str, float]:
        """Validation metrics of ``model`` (default: the plain ``model``) on ``loader`` (no
        callbacks). ``model`` is in eval mode meanwhile and gets its mode back.

        Per-image values of ``self.metrics`` are gathered from every process before they
        are summarised.

        Returns:
            ``val_loss`` (mean per image), ``val_images`` and the metrics of
            ``self.metrics``; by default (:class:`SegmentationMetrics` at
            ``config.threshold``) ``val_dice`` (competition score), ``val_dice_pos`` (mean
            Dice of images with a pneumothorax), ``val_fp_rate`` (share of empty-truth images
            with any predicted pixel) and ``val_all_empty_dice`` (the score of predicting
            nothing: the share of empty-truth images).
        """
        model = self.model if model is None else model
        broadcast_buffers(model)  # every shard scored with the statistics rank 0 saves
        was_training = model.training
        model.eval()
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.metrics.columns}
        loss_sum = 0.0
        bar = tqdm(
            loader,
            desc="validation",
            unit="batch",
            leave=False,
            dynamic_ncols=True,
            disable=not (self.config.progress and self.is_main),
        )
        for batch in bar:
            batch = self.to_device(batch)
            outputs, loss = self.validation_step(batch, model)
            for name, values in self.metrics.per_image(outputs, batch).items():
                parts[name].append(values)
            loss_sum += float(loss) * len(outputs)
        model.train(was_training)
        columns = {
            name: all_gather_arrays(_concat(parts[name], dtype))
            for name, dtype in self.metrics.columns.items()
        }
        loss_total = float(all_reduce_sum(torch.tensor([loss_sum], dtype=torch.float64))[0])
        n = next(iter(columns.values())).size
        return {
            "val_loss": loss_total / n if n else math.nan,
            **self.metrics.summarise(columns),
            "val_images": float(n),
        }

    def validates(self, epoch: int) -> bool:
        """Whether 0-based ``epoch`` ends with a validation (``config.val_every``; always the
        last epoch)."""
        return (epoch + 1) % self.config.val_every == 0 or epoch + 1 == self.config.epochs

    def _monitored(self) -> float:
        """This epoch's value of ``config.monitor``."""
        if self.config.monitor not in self.callback_metrics:
            raise KeyError(
                f"trainer.monitor={self.config.monitor!r} is not among this epoch's metrics "
                f"{sorted(self.callback_metrics)}"
            )
        return float(self.callback_metrics[self.config.monitor])

    def _log_epoch(self) -> None:
        if not self.is_main:
            return
        m = self.callback_metrics
        text = f"epoch {self.epoch + 1}/{self.config.epochs}  train_loss {m['train_loss']:.4f}"
        if "val_dice" in m:
            text += (
                f"  val_loss {m['val_loss']:.4f}  val_dice {m['val_dice']:.4f} (positive "
                f"{m['val_dice_pos']:.4f}, FP rate {m['val_fp_rate']:.3f}; all-empty "
                f"{m['val_all_empty_dice']:.4f})"
            )
        elif "val_loss" in m:  # other validation metrics (e.g. a classifier's)
            text += "".join(
                f"  {key} {value:.4f}" for key, value in m.items() if key.startswith("val_")
            )
        for prefix in validated_prefixes(m):
            if prefix:
                text += (
                    f"  {prefix.rstrip('_')}: val_dice {m[prefix + 'val_dice']:.4f} (positive "
                    f"{m[prefix + 'val_dice_pos']:.4f}, FP rate {m[prefix + 'val_fp_rate']:.3f})"
                )
        text += (
            f"  lr {m['lr']:.2e}  {m['train_images_per_s']:.1f} img/s  {m['epoch_time_s']:.1f} s"
        )
        logger.info(text)

    # ------------------------------------------------------------------ state

    def weights_checkpoint(
        self, model: nn.Module | None = None, source: str = "model"
    ) -> dict[str, Any]:
        """A "weights" checkpoint dict: the state of ``model`` (default: the trained model),
        ``epoch`` (0-based: :attr:`weights_epoch`), metrics, config, and ``source`` naming
        which model it is ("model", "ema", "teacher")."""
        return {
            "kind": _WEIGHTS,
            "model": unwrap_model(self.model if model is None else model).state_dict(),
            "source": source,
            "epoch": self.weights_epoch,
            "metrics": dict(self.callback_metrics),
            "config": self.run_config,
        }

    def state_dict(self) -> dict[str, Any]:
        """The full state written to ``last.pt``. Collective under DDP (gathers every
        process's RNG states): call it on every process."""
        callbacks = {}
        for callback in self.callbacks:
            state = callback.state_dict()
            if state:
                callbacks[callback.state_key] = state
        return {
            "kind": _FULL,
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "global_step": self.global_step,
            "nonfinite_streak": self.nonfinite_streak,
            "epoch_sums": dict(self._epoch_sums),
            "sampler": loader_state(self._train_loader) if self._train_loader is not None else None,
            "rng": all_gather_objects(capture_rng_state()),
            "world_size": self.world_size,
            "callbacks": callbacks,
            "metrics": dict(self.callback_metrics),
            "config": self.run_config,
        }

    def save_last(self) -> Path:
        """Write ``last.pt`` (rank 0; every process must call it). Returns its path."""
        state = self.state_dict()
        self._call("on_save_checkpoint", state)
        if self.is_main:
            save_checkpoint(state, self.last_path)
        return self.last_path

    def load_state(self, path: str | Path) -> dict[str, Any]:
        """Restore everything :meth:`state_dict` saved (``fit(resume=path)`` calls this
        after building the scheduler).

        Raises:
            CheckpointError: unreadable, weights-only, or not fitting this model/optimiser.
        """
        path = Path(path)
        state = load_checkpoint(path, required=("kind",))
        if state["kind"] != _FULL:
            raise CheckpointError(
                f"{path}: a {state['kind']!r} checkpoint holds model weights only; resuming "
                f"needs a full-state {self.last_name}"
            )
        try:
            unwrap_model(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state["scheduler"] is not None:
                self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise CheckpointError(
                f"{path}: its state does not fit this run's model/optimiser/scheduler: {error}"
            ) from error
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self.global_step = int(state["global_step"])
        self.nonfinite_streak = int(state["nonfinite_streak"])
        self._epoch_sums = dict(state["epoch_sums"])
        self.callback_metrics = dict(state["metrics"])
        if self._train_loader is not None:
            load_loader_state(self._train_loader, state["sampler"])
        rng = state["rng"]
        if len(rng) == self.world_size:
            self._resume_rng = rng[self.rank]
        elif self.batches_done:
            logger.warning(
                "%s was written by %d process(es), this run has %d: the rest of epoch %d will "
                "not repeat the interrupted run's batches exactly",
                path,
                len(rng),
                self.world_size,
                self.epoch + 1,
            )
        self._load_callback_states(path, state["callbacks"])
        self._warn_config_changes(path, state["config"])
        self._call("on_load_checkpoint", state)
        if self.is_main:
            logger.info(
                "resumed from %s: epoch %d, batch %d, step %d",
                path,
                self.epoch + 1,
                self.batches_done,
                self.global_step,
            )
        return state

    def _load_callback_states(self, path: Path, states: Mapping[str, Any]) -> None:
        for callback in self.callbacks:
            if callback.state_key in states:
                callback.load_state_dict(states[callback.state_key])
            elif callback.state_dict():
                logger.warning(
                    "%s holds no state for callback %r; it starts fresh", path, callback.state_key
                )

    def _warn_config_changes(self, path: Path, stored: Mapping[str, Any]) -> None:
        changed = _changed_keys(stored, self.run_config)
        if changed and self.is_main:
            logger.warning("resuming %s with a changed config: %s", path, "; ".join(changed))


def _concat(parts: Sequence[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, as ``key: old -> new``."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        changed = []
        for key in sorted(set(old) | set(new), key=str):
            changed += _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return changed
    return [] if old == new else [f"{prefix.rstrip('.')}: {_short(old)} -> {_short(new)}"]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
