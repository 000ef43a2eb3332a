"""An EMA of the weights inside the Trainer, and the validation of any second model.

:class:`ModelValidation` validates a model other than the trained one (an EMA, a Mean Teacher's
teacher) at every validation with the Trainer's own metrics, stores them under a prefix
(``ema_val_dice``, ``ema_val_dice_pos``, ``ema_val_fp_rate``, … beside the student's
``val_dice`` …, so they reach ``metrics.csv``, the curves and TensorBoard) and keeps the
``top_k`` best of its weights as ``checkpoints/<prefix>best-epochNNN.pt`` (NNN: the 1-based
epoch number the log prints).

:class:`EMACallback` is that for an :class:`~ssl_ptx.ema.ModelEMA` of ``trainer.model`` (the
plain module, never the DDP wrapper): built when ``fit`` starts, updated after every optimiser
step (not per micro-batch), its base decay set per epoch by a named schedule
(:func:`ema_decay_schedule`), and its whole state (averaged weights, update counter, decay,
top-k list) in ``last.pt``, so a resumed run reaches the same EMA weights.

The metrics are computed when validation starts, before the trained model's, so that every
``on_validation_epoch_end`` (e.g. the Trainer's top-k checkpoints with
``trainer.monitor=ema_val_dice``, the 3rd place's ranking) sees them.

:func:`export_best` copies the best weights of a run, the trained model's or a validated
model's, to one file.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ssl_ptx.config import EMAConfig
from ssl_ptx.ema import ModelEMA, fifth_place_decay_schedule, third_place_decay_schedule
from ssl_ptx.engine.callbacks import Callback, TopKCheckpoint
from ssl_ptx.engine.checkpoint import load_checkpoint, save_checkpoint
from ssl_ptx.engine.distributed import all_reduce_sum, is_distributed

if TYPE_CHECKING:
    from ssl_ptx.engine.trainer import Trainer

__all__ = [
    "EMA_SCHEDULES",
    "EMACallback",
    "ExportedModel",
    "ModelValidation",
    "build_ema_callback",
    "ema_decay_schedule",
    "export_best",
]

logger = logging.getLogger(__name__)

#: validation metrics that do not depend on the model (not repeated under a prefix)
_MODEL_FREE_METRICS = ("val_all_empty_dice", "val_images")
#: names of the per-epoch EMA decay schedules of :func:`ema_decay_schedule`
EMA_SCHEDULES = ("constant", "third_place", "fifth_place")


def ema_decay_schedule(
    name: str, decay: float, *, copy_epochs: int = 6
) -> Callable[[float], float] | None:
    """The epoch → decay schedule called ``name`` (epochs counted from 0).

    * ``"constant"``: None (the EMA keeps ``decay``);
    * ``"third_place"``: 0 (an exact copy) for the first ``copy_epochs`` epochs, then
      ``decay`` (3rd place: copy for epochs 1–6, then 0.99);
    * ``"fifth_place"``: 0.5 / 0.9 / 0.99 / 0.999 from epochs 0 / 5 / 10 / 20 (``decay``
      unused).

    Raises:
        ValueError: an unknown name.
    """
    if name == "constant":
        return None
    if name == "third_place":
        return third_place_decay_schedule(copy_epochs, decay)
    if name == "fifth_place":
        return fifth_place_decay_schedule()
    raise ValueError(f"unknown EMA schedule {name!r}; known: {list(EMA_SCHEDULES)}")


def _average_float_buffers(module: nn.Module, world_size: int) -> None:
    """Under DDP, set every floating buffer (BatchNorm statistics) of ``module`` to its mean
    over the processes (one all-reduce); a no-op in a single process."""
    if not is_distributed():
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
    mean = all_reduce_sum(flat) / world_size
    offset = 0
    for buffer in buffers:
        buffer.copy_(mean[offset : offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()


class ModelValidation(Callback, ABC):
    """Validate a second model each epoch and keep its best weights (see the module
    docstring). Subclasses say which model: :meth:`validated_model`.

    Args:
        prefix: prepended to the metric names (``"ema_"`` → ``ema_val_dice``) and to the
            file names of its top-k checkpoints.
        top_k: best weight files kept by ``<prefix>val_dice`` (0 = none), in ``dirpath``.
        dirpath: folder of those files; default ``<trainer.out_dir>/checkpoints``.
        sync_buffers: under DDP, average the model's floating buffers over the processes
            before validating it (a teacher whose BatchNorm statistics are its own differs
            per process).
        validate: compute the metrics (False: neither metrics nor top-k files).
    """

    def __init__(
        self,
        prefix: str,
        *,
        top_k: int = 0,
        dirpath: str | Path | None = None,
        sync_buffers: bool = False,
        validate: bool = True,
    ) -> None:
        if not prefix or prefix.startswith("val"):
            raise ValueError(f"prefix must be non-empty and not start with 'val', got {prefix!r}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.prefix = prefix
        self.k = top_k
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.sync_buffers = sync_buffers
        self.validate = validate
        self.top_k: TopKCheckpoint | None = None
        self._pending: Mapping[str, Any] | None = None

    @property
    def name(self) -> str:
        """The model's name in logs and checkpoints (the prefix without its underscore)."""
        return self.prefix.rstrip("_")

    @property
    def monitor(self) -> str:
        return f"{self.prefix}val_dice"

    @property
    def state_key(self) -> str:
        return f"{type(self).__qualname__}[{self.prefix}]"

    @abstractmethod
    def validated_model(self, trainer: Trainer) -> nn.Module:
        """The model to validate and save."""

    def weights_checkpoint(self, trainer: Trainer) -> dict[str, Any]:
        """A "weights" checkpoint of the validated model (``source`` = :attr:`name`)."""
        return trainer.weights_checkpoint(self.validated_model(trainer), source=self.name)

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.k and self.validate and self.top_k is None:
            self.top_k = TopKCheckpoint(
                self.dirpath or trainer.out_dir / "checkpoints",
                k=self.k,
                monitor=self.monitor,
                filename=f"{self.prefix}best-epoch{{epoch:03d}}.pt",
                weights=self.weights_checkpoint,
            )
        if self._pending is not None:
            self.restore(self._pending)
            self._pending = None

    def restore(self, state: Mapping[str, Any]) -> None:
        """Apply a state of :meth:`state_dict` once ``fit`` has started (subclasses extend)."""
        if self.top_k is not None and state.get("top_k") is not None:
            self.top_k.load_state_dict(state["top_k"])

    def on_validation_epoch_start(self, trainer: Trainer) -> None:
        if not self.validate or trainer.val_loader is None:
            return
        model = self.validated_model(trainer)
        if self.sync_buffers:
            _average_float_buffers(model, trainer.world_size)
        metrics = trainer.evaluate(trainer.val_loader, model)
        trainer.callback_metrics.update(
            {self.prefix + k: v for k, v in metrics.items() if k not in _MODEL_FREE_METRICS}
        )

    def on_validation_epoch_end(self, trainer: Trainer) -> None:
        if self.top_k is not None:
            self.top_k.on_validation_epoch_end(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"top_k": self.top_k.state_dict()} if self.top_k is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # called before fit starts: kept until on_fit_start has built what it restores
        self._pending = state


class EMACallback(ModelValidation):
    """Keep, validate and save an EMA of ``trainer.model`` (see the module docstring).

    Args:
        decay: base decay of :class:`~ssl_ptx.ema.ModelEMA`.
        schedule: a name of :data:`EMA_SCHEDULES`, an ``epoch -> decay`` function (epochs
            from 0, applied at each epoch start), or None (constant ``decay``).
        copy_epochs: epochs of exact copying of the "third_place" schedule.
        warmup: ModelEMA's warm-up (None, "mean_teacher", "power").
        buffers: "average" or "copy" (BatchNorm statistics; "own" would never be refreshed
            here, since nothing runs the EMA in train mode).
        device: keep the EMA on this device (e.g. "cpu"); default the model's.
        top_k, dirpath, validate: see :class:`ModelValidation` (prefix ``"ema_"``).

    Attributes:
        ema: the :class:`~ssl_ptx.ema.ModelEMA` (None until ``fit`` starts).
    """

    def __init__(
        self,
        decay: float = 0.999,
        *,
        schedule: str | Callable[[float], float] | None = None,
        copy_epochs: int = 6,
        warmup: str | None = None,
        buffers: str = "average",
        device: torch.device | str | None = None,
        top_k: int = 0,
        dirpath: str | Path | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__("ema_", top_k=top_k, dirpath=dirpath, validate=validate)
        if buffers not in ("average", "copy"):
            raise ValueError(
                f"EMACallback buffers must be 'average' or 'copy', got {buffers!r} (an EMA "
                "with its own statistics needs train-mode passes: use MeanTeacher)"
            )
        if isinstance(schedule, str):
            schedule = ema_decay_schedule(schedule, decay, copy_epochs=copy_epochs)
        self.decay = decay
        self.schedule = schedule
        self.warmup = warmup
        self.buffers = buffers
        self.device = device
        self.ema: ModelEMA | None = None

    def validated_model(self, trainer: Trainer) -> nn.Module:
        return self.ema.module

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.ema is None:
            self.ema = ModelEMA(
                trainer.model,
                self.decay,
                warmup=self.warmup,
                buffers=self.buffers,
                device=self.device,
            )
        super().on_fit_start(trainer)

    def restore(self, state: Mapping[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])
        super().restore(state)

    def on_train_epoch_start(self, trainer: Trainer) -> None:
        if self.schedule is not None:
            self.ema.set_decay(self.schedule(trainer.epoch))

    def on_train_batch_end(
        self, trainer: Trainer, outputs: Mapping[str, Any], batch: Any, batch_idx: int
    ) -> None:
        if outputs["optimizer_stepped"]:
            self.ema.update(trainer.model)

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        return {"ema": self.ema.state_dict(), **super().state_dict()}


def build_ema_callback(config: EMAConfig, *, default_top_k: int = 0) -> EMACallback | None:
    """The :class:`EMACallback` of a run's ``ema`` section (None when ``config.decay`` is
    None); ``config.top_k`` None keeps ``default_top_k`` files (the run's ``trainer.top_k``)."""
    if not config.enabled:
        return None
    return EMACallback(
        config.decay,
        schedule=config.schedule,
        copy_epochs=config.copy_epochs,
        warmup=config.warmup,
        buffers=config.buffers,
        top_k=default_top_k if config.top_k is None else config.top_k,
    )


@dataclass(frozen=True)
class ExportedModel:
    """What :func:`export_best` wrote.

    Attributes:
        source: "model" (the trained model) or a validated model's name ("ema", "teacher").
        score: its validation Dice (``val_dice`` of that model) at ``epoch``.
        epoch: 0-based epoch of the weights.
        path: the file written.
        scores: the best Dice of every candidate, by source.
    """

    source: str
    score: float
    epoch: int
    path: Path
    scores: dict[str, float]


def export_best(trainer: Trainer, path: str | Path, metric: str = "val_dice") -> ExportedModel:
    """Write the best weights of a finished run to ``path`` (a "weights" checkpoint).

    The candidates are the best file of the trainer's top-k checkpoints (the trained model)
    and of every :class:`ModelValidation` callback's; each is scored by its own model's
    ``metric`` at its epoch (``val_dice`` for the trained model, ``teacher_val_dice`` for the
    teacher, …) and the highest wins, the trained model on a tie. Without top-k files the
    models as they are now compete on the last epoch's metrics (their epoch: the last one
    finished, :attr:`~ssl_ptx.engine.trainer.Trainer.weights_epoch`).

    Raises:
        ValueError: no candidate has a finite score (no validation ran).
    """
    path = Path(path)
    validations = [cb for cb in trainer.callbacks if isinstance(cb, ModelValidation)]
    candidates: list[tuple[str, float, int, dict[str, Any]]] = []
    sources = [("model", "", trainer.top_k), *((v.name, v.prefix, v.top_k) for v in validations)]
    for (source, prefix, top_k), validation in zip(sources, [None, *validations], strict=True):
        if top_k is not None and top_k.best_path is not None:
            checkpoint = load_checkpoint(top_k.best_path)
        elif validation is None:
            checkpoint = trainer.weights_checkpoint()
        else:
            checkpoint = validation.weights_checkpoint(trainer)
        score = float(checkpoint["metrics"].get(prefix + metric, math.nan))
        candidates.append((source, score, int(checkpoint["epoch"]), checkpoint))
    scores = {source: score for source, score, _, _ in candidates}
    finite = [c for c in candidates if math.isfinite(c[1])]
    if not finite:
        raise ValueError(f"no model has a finite {metric!r} to choose by: {scores}")
    source, score, epoch, checkpoint = max(finite, key=lambda c: c[1])  # first max on a tie
    if trainer.is_main:
        save_checkpoint({**checkpoint, "source": source}, path)
    logger.info("exported the %s (epoch %d, %s %.4f) to %s", source, epoch + 1, metric, score, path)
    return ExportedModel(source, score, epoch, path, scores)
