"""Trainer callbacks: Lightning's event names, Lightning's state convention.

A callback overrides the events it needs; every event receives the
:class:`~ssl_ptx.engine.trainer.Trainer` first. Order within one epoch::

    on_fit_start
      on_train_epoch_start
        on_before_optimizer_step      (per optimiser step: gradients unscaled, not yet clipped)
        on_train_batch_end            (per micro-batch)
      on_validation_epoch_start
      on_validation_epoch_end         (trainer.callback_metrics holds this epoch's val_* values)
      on_train_epoch_end              (callback_metrics complete: train_*, val_*, lr, timing)
      on_save_checkpoint              (last.pt is about to be written: add to the dict)
    on_fit_end
    on_exception                      (instead of on_fit_end when fit raises)

``on_load_checkpoint`` runs when ``fit(resume=...)`` has restored the trainer's state.

A stateful callback returns a non-empty ``state_dict()``; the trainer stores it in ``last.pt``
under ``checkpoint["callbacks"][callback.state_key]`` and hands it back to
``load_state_dict`` on resume. Give instances that can coexist distinct ``state_key`` values.
States must hold only what ``torch.load(weights_only=True)`` accepts (tensors, numbers,
strings, None, lists, tuples, dicts).

Only rank 0 should write files: check ``trainer.is_main``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ssl_ptx.engine.checkpoint import save_checkpoint

if TYPE_CHECKING:
    from ssl_ptx.engine.trainer import Trainer

__all__ = ["Callback", "TopKCheckpoint", "monitor_mode"]

logger = logging.getLogger(__name__)


class Callback:
    """Base class: every event is a no-op; override the ones you need."""

    @property
    def state_key(self) -> str:
        """Key of this callback's state in ``last.pt`` (the class name by default)."""
        return type(self).__qualname__

    def state_dict(self) -> dict[str, Any]:
        """State to store in ``last.pt``; empty (nothing stored) by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """``fit`` begins (after a resume has been loaded)."""

    def on_train_epoch_start(self, trainer: Trainer) -> None:
        """A training epoch begins (``trainer.epoch`` is its 0-based index)."""

    def on_train_batch_end(
        self, trainer: Trainer, outputs: Mapping[str, Any], batch: Any, batch_idx: int
    ) -> None:
        """A micro-batch is done. ``outputs``: ``loss`` (detached tensor), ``logs`` (dict),
        ``optimizer_stepped`` (an optimiser step ended with this batch), ``skipped`` (the
        loss was not finite and the step is skipped)."""

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        """Gradients are complete (and unscaled under fp16); clipping and the step follow."""

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        """The epoch (training and validation) is done; ``trainer.callback_metrics`` holds it."""

    def on_validation_epoch_start(self, trainer: Trainer) -> None:
        """Validation begins (the model is in eval mode)."""

    def on_validation_epoch_end(self, trainer: Trainer) -> None:
        """Validation is done; its metrics are in ``trainer.callback_metrics``."""

    def on_save_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        """``checkpoint`` (the full-state dict) is about to be written; add to it if needed."""

    def on_load_checkpoint(self, trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
        """The trainer's state was restored from ``checkpoint``."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """``fit`` finished normally."""

    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        """``fit`` is about to re-raise ``exception``."""


def monitor_mode(monitor: str) -> str:
    """ "min" for metric names ending in "loss", else "max"."""
    return "min" if monitor.endswith("loss") else "max"


class TopKCheckpoint(Callback):
    """Keep the ``k`` best model weights by a validation metric.

    After each validation, if ``monitor`` ranks among the best ``k`` so far, the model's
    weights are written to ``<dirpath>/best-epochNNN.pt`` (a "weights" checkpoint: model
    state, epoch, metrics, config) and the file that dropped out of the top ``k`` is deleted.
    NNN is the epoch number the log prints (1-based: ``best-epoch016.pt`` holds the weights
    after "epoch 16/16"); the ``epoch`` stored in the file and in :attr:`best` is 0-based.
    A tie does not displace an earlier epoch. NaN scores are never kept.

    Args:
        dirpath: folder of the files.
        k: number of files kept (>= 1).
        monitor: key of ``trainer.callback_metrics``.
        mode: "max" or "min"; default :func:`monitor_mode`.
        filename: file name pattern, formatted with ``epoch`` (1-based, as logged).
        weights: ``trainer -> checkpoint dict`` to write; default
            ``trainer.weights_checkpoint()`` (the trained model). An EMA or a teacher passes
            its own (:mod:`ssl_ptx.engine.ema_callback`).
    """

    def __init__(
        self,
        dirpath: str | Path,
        *,
        k: int = 3,
        monitor: str = "val_dice",
        mode: str | None = None,
        filename: str = "best-epoch{epoch:03d}.pt",
        weights: Callable[[Trainer], dict[str, Any]] | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        mode = mode or monitor_mode(monitor)
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.dirpath = Path(dirpath)
        self.k = k
        self.monitor = monitor
        self.mode = mode
        self.filename = filename
        self.weights = weights
        self.best: list[dict[str, Any]] = []  # {"score", "epoch", "path"}, best first

    @property
    def state_key(self) -> str:
        return f"TopKCheckpoint[{self.monitor}]"

    @property
    def best_path(self) -> Path | None:
        """The best file so far (None before the first validation)."""
        return Path(self.best[0]["path"]) if self.best else None

    @property
    def best_score(self) -> float:
        return self.best[0]["score"] if self.best else math.nan

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def on_validation_epoch_end(self, trainer: Trainer) -> None:
        if self.monitor not in trainer.callback_metrics:
            raise KeyError(
                f"TopKCheckpoint monitors {self.monitor!r}, which validation did not produce; "
                f"it produced {sorted(trainer.callback_metrics)}"
            )
        score = float(trainer.callback_metrics[self.monitor])
        if math.isnan(score):
            return
        rank = sum(1 for entry in self.best if not self._better(score, entry["score"]))
        if rank >= self.k:
            return
        epoch = trainer.weights_epoch
        path = self.dirpath / self.filename.format(epoch=epoch + 1)
        if trainer.is_main:
            weights = (
                trainer.weights_checkpoint() if self.weights is None else self.weights(trainer)
            )
            save_checkpoint(weights, path)
        self.best.insert(rank, {"score": score, "epoch": epoch, "path": str(path)})
        for dropped in self.best[self.k :]:
            if trainer.is_main and Path(dropped["path"]) != path:
                Path(dropped["path"]).unlink(missing_ok=True)
        del self.best[self.k :]
        logger.info(
            "top-%d %s: %s", self.k, self.monitor, [round(e["score"], 4) for e in self.best]
        )

    def state_dict(self) -> dict[str, Any]:
        return {"best": [dict(entry) for entry in self.best]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # a file removed since (e.g. displaced by an epoch that ran after this state was
        # saved and is now being repeated) is forgotten rather than reported as kept
        self.best = [dict(entry) for entry in state["best"] if Path(entry["path"]).is_file()]
