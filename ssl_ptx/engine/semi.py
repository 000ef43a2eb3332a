"""Mean Teacher inside the Trainer: :class:`MeanTeacherTrainer`.

Every optimiser step draws a labelled batch and an unlabelled batch from separate samplers
(a :class:`~ssl_ptx.engine.loaders.TwoStreamLoader`: 5th place 16 + 4 images; each DDP
process its shard of both), and computes ::

    loss = supervised(student(x_lab), masks) + w(e) · consistency(student(x_u'), teacher(x_u''))

with :meth:`ssl_ptx.mean_teacher.MeanTeacher.training_loss`. ``x_u'`` and ``x_u''`` are two
views of the same augmented unlabelled images (:class:`ConsistencyViews`): the same geometry,
different intensity and noise, so the targets are pixel-aligned. After each optimiser step the
teacher follows the student (:meth:`~ssl_ptx.mean_teacher.MeanTeacher.update_teacher`). The
epoch ``e`` that drives the consistency weight and the teacher's decay schedule advances by a
fraction of an epoch per batch.

Each validation scores the student (``val_dice`` …) and the teacher (``teacher_val_dice`` …;
under DDP its own BatchNorm statistics are first averaged over the processes), and the best
weights of both are kept (``checkpoints/best-epochNNN.pt``, ``checkpoints/teacher_best-…``,
NNN the 1-based epoch as logged);
:func:`~ssl_ptx.engine.ema_callback.export_best` exports the better one. ``last.pt`` holds the
whole state: student, optimiser, teacher (weights, update counter, decay), the Mean Teacher's
epoch, the labelled sampler and the unlabelled stream's position, RNG states; a resumed run
reaches the same weights as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_ptx.config import ConfigError, MeanTeacherConfig, TrainerConfig
from ssl_ptx.ema import fifth_place_decay_schedule
from ssl_ptx.engine.callbacks import Callback
from ssl_ptx.engine.checkpoint import CheckpointError
from ssl_ptx.engine.ema_callback import ModelValidation
from ssl_ptx.engine.trainer import LossFn, Trainer
from ssl_ptx.mean_teacher import MeanTeacher, fifth_place_consistency_weight

__all__ = [
    "ConsistencyViews",
    "MeanTeacherTrainer",
    "TeacherValidation",
    "build_mean_teacher",
]


class ConsistencyViews:
    """The student's and the teacher's views of a batch of unlabelled images.

    Both views keep the images' geometry (the augmentation before them is shared). The
    student's view is multiplied per image by a brightness factor drawn from
    U(1 − ``student_brightness``, 1 + ``student_brightness``) (5th place: 0.1, teacher view
    unchanged); with ``noise_std`` > 0 each view also gets its own Gaussian noise (the
    original Mean Teacher). Random numbers come from torch's generator of the images' device,
    which the Trainer seeds per epoch and saves in mid-epoch checkpoints.

    Args:
        student_brightness: b in [0, 1).
        noise_std: standard deviation of the noise (images in [0, 1]).
    """

    def __init__(self, student_brightness: float = 0.1, noise_std: float = 0.0) -> None:
        if not 0.0 <= student_brightness < 1.0 or noise_std < 0:
            raise ValueError(
                "need 0 <= student_brightness < 1 and noise_std >= 0, got "
                f"{student_brightness}, {noise_std}"
            )
        self.student_brightness = student_brightness
        self.noise_std = noise_std

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(student_view, teacher_view)``, each like ``images`` ``[B, C, H, W]`` float."""
        student, teacher = images, images
        if self.student_brightness:
            shape = (images.shape[0],) + (1,) * (images.dim() - 1)
            factor = torch.rand(shape, device=images.device, dtype=images.dtype)
            student = student * (1.0 + (2.0 * factor - 1.0) * self.student_brightness)
        if self.noise_std:
            student = student + self.noise_std * torch.randn_like(student)
            teacher = teacher + self.noise_std * torch.randn_like(teacher)
        return student, teacher


def build_mean_teacher(student: nn.Module, config: MeanTeacherConfig) -> MeanTeacher:
    """A :class:`~ssl_ptx.mean_teacher.MeanTeacher` of ``student`` from a ``mean_teacher``
    config section (ramp-up and schedules counted in epochs).

    Raises:
        ConfigError: ``teacher_bn`` does not fit ``buffers``.
    """
    fifth_decay = config.decay_schedule == "fifth_place"
    fifth_weight = config.weight_schedule == "fifth_place"
    try:
        return MeanTeacher(
            student,
            ema_decay=config.ema_decay,
            consistency_weight=config.consistency_weight,
            rampup_length=config.rampup_epochs,
            rampup_unit="epochs",
            consistency=config.consistency,
            activation="sigmoid",
            buffers=config.buffers,
            teacher_bn=config.teacher_bn,
            decay_schedule=fifth_place_decay_schedule() if fifth_decay else None,
            weight_schedule=fifth_place_consistency_weight if fifth_weight else None,
            presence_weight=config.presence_weight,
            ema_warmup=config.ema_warmup,
            joint_forward=config.joint_forward,
        )
    except ValueError as error:
        raise ConfigError(f"mean_teacher: {error}") from None


class TeacherValidation(ModelValidation):
    """Validate and keep the best weights of a :class:`MeanTeacherTrainer`'s teacher
    (prefix ``"teacher_"``; BatchNorm statistics averaged over DDP processes first)."""

    def __init__(self, *, top_k: int = 0, dirpath: str | Path | None = None) -> None:
        super().__init__("teacher_", top_k=top_k, dirpath=dirpath, sync_buffers=True)

    def validated_model(self, trainer: Trainer) -> nn.Module:
        return trainer.mean_teacher.teacher.module


class MeanTeacherTrainer(Trainer):
    """The :class:`~ssl_ptx.engine.trainer.Trainer` with a Mean Teacher (module docstring).

    Args:
        model: the student (as for the Trainer).
        loss_fn: the supervised loss, as for the Trainer.
        config: the trainer section.
        mean_teacher: the ``mean_teacher`` section (:func:`build_mean_teacher`).
        out_dir, callbacks, run_config, default_callbacks: as for the Trainer.
        teacher_top_k: best teacher weight files kept (None = ``config.top_k``).

    Attributes:
        mean_teacher: the :class:`~ssl_ptx.mean_teacher.MeanTeacher` (its ``student`` is
            ``train_model``, so DDP synchronises the gradients; its teacher is a copy of the
            plain module, never wrapped).
        views: the :class:`ConsistencyViews` of the unlabelled images.

    ``fit`` takes a :class:`~ssl_ptx.engine.loaders.TwoStreamLoader` (batches
    ``{"labelled": …, "unlabelled": …}``) and the usual validation loader.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        config: TrainerConfig,
        mean_teacher: MeanTeacherConfig,
        *,
        out_dir: str | Path,
        callbacks: Sequence[Callback] = (),
        run_config: Any = None,
        default_callbacks: bool = True,
        teacher_top_k: int | None = None,
    ) -> None:
        teacher_top_k = config.top_k if teacher_top_k is None else teacher_top_k
        teacher = TeacherValidation(top_k=teacher_top_k if default_callbacks else 0)
        super().__init__(
            model,
            loss_fn,
            config,
            out_dir=out_dir,
            callbacks=[teacher, *callbacks],
            run_config=run_config,
            default_callbacks=default_callbacks,
        )
        self.mean_teacher = build_mean_teacher(self.train_model, mean_teacher)
        self.views = ConsistencyViews(mean_teacher.student_brightness, mean_teacher.view_noise)

    def batch_size(self, batch: Mapping[str, Any]) -> int:
        """Labelled images of the batch (the supervised loss is averaged over them)."""
        return len(batch["labelled"]["image"])

    def training_step(
        self, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The Mean Teacher loss of one two-stream batch; logs ``supervised``,
        ``consistency`` (unweighted) and ``consistency_weight``."""
        labelled, unlabelled = batch["labelled"], batch["unlabelled"]
        self.mean_teacher.set_epoch(self.epoch + self.batches_done / self.epoch_batches)
        student_view, teacher_view = self.views(unlabelled["image"])
        with self.autocast():
            loss, parts = self.mean_teacher.training_loss(
                labelled["image"],
                labelled,
                student_view,
                teacher_view,
                self._supervised_loss,
            )
        logs = {
            "supervised": parts["supervised"],
            "consistency": parts["consistency"],
            "consistency_weight": torch.tensor(parts["weight"]),
        }
        return loss, logs

    def _supervised_loss(self, outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.compute_loss(outputs, batch)[0]

    def after_optimizer_step(self) -> None:
        """Move the teacher toward the student (and refresh its statistics)."""
        self.mean_teacher.update_teacher()

    def state_dict(self) -> dict[str, Any]:
        """The Trainer's state plus ``mean_teacher`` (teacher and Mean Teacher epoch)."""
        return {**super().state_dict(), "mean_teacher": self.mean_teacher.state_dict()}

    def load_state(self, path: str | Path) -> dict[str, Any]:
        state = super().load_state(path)
        if "mean_teacher" not in state:
            raise CheckpointError(
                f"{path}: no Mean Teacher state (a supervised run's last.pt?); a Mean Teacher "
                "run resumes only from its own last.pt"
            )
        try:
            self.mean_teacher.load_state_dict(state["mean_teacher"])
        except (RuntimeError, KeyError) as error:
            raise CheckpointError(
                f"{path}: its teacher does not fit this run's model: {error}"
            ) from error
        return state
