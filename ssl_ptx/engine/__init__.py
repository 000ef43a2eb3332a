"""Training engine: the :class:`Trainer`, its callbacks, checkpoints, DDP helpers and loaders.

Modules: ``trainer`` (the loop), ``callbacks`` (event vocabulary, top-k checkpoints),
``ema_callback`` (EMA of the weights, validation of a second model, export of the best),
``semi`` (:class:`MeanTeacherTrainer`), ``checkpoint`` (atomic save, ``weights_only`` load),
``distributed`` (torchrun context, gathers), ``logging`` (metrics CSV, TensorBoard, curves),
``loaders`` (deterministic, sharded DataLoaders, two-stream batches), ``data`` (SIIM and
unlabelled datasets from a config), ``rng`` (seeding and RNG state).
"""

from __future__ import annotations

from ssl_ptx.engine.callbacks import Callback, TopKCheckpoint
from ssl_ptx.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from ssl_ptx.engine.distributed import DistributedContext, init_distributed, unwrap_model
from ssl_ptx.engine.ema_callback import (
    EMACallback,
    ExportedModel,
    ModelValidation,
    build_ema_callback,
    export_best,
)
from ssl_ptx.engine.rng import seed_everything
from ssl_ptx.engine.semi import MeanTeacherTrainer
from ssl_ptx.engine.trainer import FitResult, NonFiniteLossError, Trainer

__all__ = [
    "Callback",
    "CheckpointError",
    "DistributedContext",
    "EMACallback",
    "ExportedModel",
    "FitResult",
    "MeanTeacherTrainer",
    "ModelValidation",
    "NonFiniteLossError",
    "TopKCheckpoint",
    "Trainer",
    "build_ema_callback",
    "export_best",
    "init_distributed",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
    "seed_everything",
    "unwrap_model",
]
