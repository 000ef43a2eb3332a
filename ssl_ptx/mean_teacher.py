"""Mean Teacher (Tarvainen & Valpola, 2017): a student trained on labelled images plus a
consistency loss toward an EMA teacher (:class:`~ssl_ptx.ema.ModelEMA`) on unlabelled ones.

One training step::

    loss, parts = mt.training_loss(x_lab, y, x_unl_student, x_unl_teacher, supervised_loss)
    loss.backward(); optimizer.step(); optimizer.zero_grad()
    mt.update_teacher()

``loss = supervised + w(t) · consistency`` where ``consistency`` compares the student's
probabilities on its view of the unlabelled images with the teacher's on its view (teacher
outputs are targets: no gradient reaches the teacher). The views share geometry and differ in
noise or intensity (5th place); when the student's view is flipped relative to the teacher's,
pass ``inverse_transform`` (e.g. :func:`flip_back`) to undo it on the student's output.

Works for any model returning logits: classification ``[B, C]`` with ``activation="softmax"``,
segmentation ``[B, 1, H, W]`` with ``activation="sigmoid"``, and ``(mask_logits,
presence_logits)`` tuples (``UNetCBAM(presence_head=True)``), whose presence output adds
``presence_weight`` × its own sigmoid consistency (5th place: 0.001).

Teacher BatchNorm is explicit (``buffers`` × ``teacher_bn``):

* ``buffers="own", teacher_bn="refresh"`` (default, 5th place): targets come from the teacher
  in eval mode; after each update the teacher runs once in train mode (no gradient) on that
  step's labelled batch, which moves its running statistics toward the current weights.
* ``buffers="own", teacher_bn="train"`` (original Mean Teacher code, SSL4MIS): the teacher
  produces its targets in train mode (batch statistics of its unlabelled batch, dropout on),
  which also updates its running statistics.
* ``buffers="average"`` or ``"copy"``, ``teacher_bn="eval"``: statistics averaged or copied
  from the student by :meth:`ModelEMA.update`; targets in eval mode (timm-style EMA).

Ramp-up functions follow the original paper code exactly (:func:`sigmoid_rampup`,
:func:`linear_rampup`, :func:`cosine_rampdown`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_ptx.ema import ModelEMA

__all__ = [
    "CONSISTENCY_LOSSES",
    "MeanTeacher",
    "cosine_rampdown",
    "fifth_place_consistency_weight",
    "flip_back",
    "linear_rampup",
    "sigmoid_kl",
    "sigmoid_mse",
    "sigmoid_rampup",
    "softmax_kl",
    "softmax_mse",
]

ModelOutput = torch.Tensor | tuple[torch.Tensor, ...]


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """exp(−5·(1 − c/L)²) with c = ``current`` clipped to [0, L]; 1.0 when L is 0.

    exp(−5) ≈ 0.0067 at 0 (not 0), 1.0 from ``current >= rampup_length`` on (Laine & Aila).
    """
    if rampup_length < 0:
        raise ValueError(f"rampup_length must be >= 0, got {rampup_length}")
    if rampup_length == 0:
        return 1.0
    phase = 1.0 - min(max(float(current), 0.0), rampup_length) / rampup_length
    return math.exp(-5.0 * phase * phase)


def linear_rampup(current: float, rampup_length: float) -> float:
    """``current / rampup_length``, and 1.0 once ``current >= rampup_length`` (so also for
    length 0). Both must be >= 0."""
    if current < 0 or rampup_length < 0:
        raise ValueError(f"current and rampup_length must be >= 0, got {current}, {rampup_length}")
    return 1.0 if current >= rampup_length else current / rampup_length


def cosine_rampdown(current: float, rampdown_length: float) -> float:
    """½·(cos(π·current/length) + 1): 1.0 at 0, 0.0 at ``rampdown_length``; ``current`` must
    lie in [0, rampdown_length] and the length must be > 0."""
    if rampdown_length <= 0 or not 0 <= current <= rampdown_length:
        raise ValueError(
            f"cosine_rampdown needs 0 <= current <= rampdown_length and rampdown_length > 0, "
            f"got current={current}, rampdown_length={rampdown_length}"
        )
    return 0.5 * (math.cos(math.pi * current / rampdown_length) + 1.0)


def fifth_place_consistency_weight(epoch: float) -> float:
    """The 5th place's consistency weight: 0.001 for ``epoch < 5``, then
    2·exp(−5·(1 − min(epoch, 30)/30)²) (0.062 at 5, 1.15 at 20, 2.0 from 30)."""
    return 0.001 if epoch < 5 else 2.0 * sigmoid_rampup(epoch, 30)


def _float(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher outputs differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    return student_logits.to(dtype), teacher_logits.detach().to(dtype)


def sigmoid_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over all elements of (σ(student) − σ(teacher))²; the teacher is a target
    (detached). Any shape, both the same; half precision is computed in float32."""
    s, t = _float(student_logits, teacher_logits)
    return F.mse_loss(torch.sigmoid(s), torch.sigmoid(t))


def softmax_mse(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, dim: int = 1
) -> torch.Tensor:
    """Mean over all elements of (softmax(student) − softmax(teacher))², softmax over
    ``dim`` (the class axis of ``[B, C]`` or ``[B, C, H, W]``); the original code's
    Σ/C per image divided by the batch size is the same number."""
    s, t = _float(student_logits, teacher_logits)
    return F.mse_loss(torch.softmax(s, dim=dim), torch.softmax(t, dim=dim))


def softmax_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, dim: int = 1
) -> torch.Tensor:
    """KL(softmax(teacher) ‖ softmax(student)) summed over the class axis ``dim`` and
    averaged over the other elements (images, pixels)."""
    s, t = _float(student_logits, teacher_logits)
    log_t = torch.log_softmax(t, dim=dim)
    return (log_t.exp() * (log_t - torch.log_softmax(s, dim=dim))).sum(dim).mean()


def sigmoid_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Binary KL(σ(teacher) ‖ σ(student)) per element, averaged (computed from log-sigmoids,
    stable for large logits)."""
    s, t = _float(student_logits, teacher_logits)
    p_t = torch.sigmoid(t)
    kl = p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (
        F.logsigmoid(-t) - F.logsigmoid(-s)
    )
    return kl.mean()


CONSISTENCY_LOSSES: dict[tuple[str, str], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    ("mse", "sigmoid"): sigmoid_mse,
    ("mse", "softmax"): softmax_mse,
    ("kl", "sigmoid"): sigmoid_kl,
    ("kl", "softmax"): softmax_kl,
}

_TEACHER_BN = {"own": ("refresh", "train"), "average": ("eval",), "copy": ("eval",)}


def flip_back(flipped: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ``inverse_transform`` that flips back (last axis) the images whose student view was
    flipped horizontally: ``flipped`` is a bool ``[B]``."""

    def inverse(logits: torch.Tensor) -> torch.Tensor:
        mask = flipped.to(device=logits.device, dtype=torch.bool)
        if mask.shape != logits.shape[:1]:
            raise ValueError(
                f"flip_back: {mask.numel()} flags for a batch of {logits.shape[0]} outputs"
            )
        return torch.where(mask.view(-1, *[1] * (logits.dim() - 1)), logits.flip(-1), logits)

    return inverse


def _split(output: ModelOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(main logits, presence logits or None) of a model output."""
    if isinstance(output, torch.Tensor):
        return output, None
    if len(output) != 2:
        raise ValueError(f"expected logits or (mask, presence) logits, got {len(output)} outputs")
    return output[0], output[1]


def _rows(output: ModelOutput, rows: slice) -> ModelOutput:
    if isinstance(output, torch.Tensor):
        return output[rows]
    return tuple(o[rows] for o in output)


class MeanTeacher:
    """A student, its EMA teacher and the consistency loss between them.

    Args:
        student: the trained model (may already be wrapped in DDP; the teacher is built from
            the unwrapped module). Move it to its device before creating the MeanTeacher.
        ema_decay: the teacher's EMA decay (its base decay when ``decay_schedule`` is set).
        consistency_weight: maximum consistency weight (reached at the end of the ramp-up).
        rampup_length: sigmoid ramp-up length in ``rampup_unit`` (0 = none); required unless
            ``weight_schedule`` is given.
        rampup_unit: ``"updates"`` (teacher updates done, default) or ``"epochs"`` (the value
            last given to :meth:`set_epoch`).
        consistency: ``"mse"`` (on probabilities) or ``"kl"``.
        activation: ``"sigmoid"`` (per pixel / multi-label) or ``"softmax"`` (class axis 1).
        buffers: the teacher's buffer policy (see :class:`~ssl_ptx.ema.ModelEMA`).
        teacher_bn: ``"refresh"`` or ``"train"`` with ``buffers="own"``, ``"eval"`` otherwise
            (see the module docstring).
        decay_schedule: ``epoch -> decay`` applied by :meth:`set_epoch` (e.g.
            :func:`~ssl_ptx.ema.fifth_place_decay_schedule`).
        weight_schedule: ``t -> weight`` replacing ``consistency_weight · sigmoid_rampup``,
            ``t`` in ``rampup_unit`` (e.g. :func:`fifth_place_consistency_weight` per epoch).
        presence_weight: factor of the presence-head consistency for ``(mask, presence)``
            outputs.
        ema_warmup: the teacher's warm-up (``"mean_teacher"``: d_t = min(1 − 1/(t+1), decay)).
        joint_forward: run the student once on the labelled and unlabelled images
            concatenated (BatchNorm statistics over both; same image size needed) instead of
            twice.
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        ema_decay: float = 0.99,
        consistency_weight: float = 1.0,
        rampup_length: float | None = None,
        rampup_unit: str = "updates",
        consistency: str = "mse",
        activation: str = "sigmoid",
        buffers: str = "own",
        teacher_bn: str = "refresh",
        decay_schedule: Callable[[float], float] | None = None,
        weight_schedule: Callable[[float], float] | None = None,
        presence_weight: float = 0.001,
        ema_warmup: str | None = "mean_teacher",
        joint_forward: bool = True,
    ) -> None:
        if (consistency, activation) not in CONSISTENCY_LOSSES:
            raise ValueError(
                f"consistency must be 'mse' or 'kl' and activation 'sigmoid' or 'softmax', "
                f"got {consistency!r}, {activation!r}"
            )
        if rampup_unit not in ("updates", "epochs"):
            raise ValueError(f"rampup_unit must be 'updates' or 'epochs', got {rampup_unit!r}")
        if rampup_length is None and weight_schedule is None:
            raise ValueError("give rampup_length (0 = no ramp-up) or weight_schedule")
        if teacher_bn not in _TEACHER_BN.get(buffers, ()):
            raise ValueError(
                f"teacher_bn={teacher_bn!r} does not fit buffers={buffers!r}; allowed pairs: "
                f"{[(b, m) for b, modes in _TEACHER_BN.items() for m in modes]}"
            )
        self.student = student
        self.teacher = ModelEMA(student, ema_decay, warmup=ema_warmup, buffers=buffers)
        self.consistency_weight = float(consistency_weight)
        self.rampup_length = float(rampup_length or 0.0)
        self.rampup_unit = rampup_unit
        self.activation = activation
        self.consistency_loss = CONSISTENCY_LOSSES[consistency, activation]
        self.presence_loss = CONSISTENCY_LOSSES[consistency, "sigmoid"]
        self.teacher_bn = teacher_bn
        self.decay_schedule = decay_schedule
        self.weight_schedule = weight_schedule
        self.presence_weight = float(presence_weight)
        self.joint_forward = joint_forward
        self.epoch = 0.0
        self._refresh_batch: torch.Tensor | None = None
        self.set_epoch(0.0)

    def set_epoch(self, epoch: float) -> None:
        """Tell the epoch (0 at the start; may be fractional): drives ``decay_schedule`` and
        the ramp-up in ``"epochs"``."""
        self.epoch = float(epoch)
        if self.decay_schedule is not None:
            self.teacher.set_decay(self.decay_schedule(self.epoch))

    @property
    def consistency_weight_now(self) -> float:
        """The consistency weight of the next :meth:`training_loss`."""
        t = self.teacher.num_updates if self.rampup_unit == "updates" else self.epoch
        if self.weight_schedule is not None:
            return float(self.weight_schedule(t))
        return self.consistency_weight * sigmoid_rampup(t, self.rampup_length)

    def student_outputs(
        self, x_labelled: torch.Tensor, x_unlabelled: torch.Tensor
    ) -> tuple[ModelOutput, ModelOutput]:
        """The student's outputs on the labelled and the unlabelled images (with gradient)."""
        if not self.joint_forward:
            return self.student(x_labelled), self.student(x_unlabelled)
        if x_labelled.shape[1:] != x_unlabelled.shape[1:]:
            raise ValueError(
                f"joint_forward needs labelled and unlabelled images of one size, got "
                f"{tuple(x_labelled.shape)} and {tuple(x_unlabelled.shape)}; "
                f"use joint_forward=False"
            )
        n = x_labelled.shape[0]
        output = self.student(torch.cat([x_labelled, x_unlabelled]))
        return _rows(output, slice(None, n)), _rows(output, slice(n, None))

    @torch.no_grad()
    def teacher_outputs(self, x_unlabelled: torch.Tensor) -> ModelOutput:
        """The teacher's targets (no gradient), in train mode for ``teacher_bn="train"``,
        eval mode otherwise."""
        module = self.teacher.module
        module.train(self.teacher_bn == "train")
        try:
            return module(x_unlabelled)
        finally:
            module.eval()

    def consistency(
        self,
        student_output: ModelOutput,
        teacher_output: ModelOutput,
        inverse_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The unweighted consistency loss (scalar); ``inverse_transform`` is applied to the
        student's main (mask) logits only: presence is invariant to geometry."""
        student_main, student_presence = _split(student_output)
        teacher_main, teacher_presence = _split(teacher_output)
        if inverse_transform is not None:
            student_main = inverse_transform(student_main)
        loss = self.consistency_loss(student_main, teacher_main)
        if student_presence is not None and teacher_presence is not None:
            loss = loss + self.presence_weight * self.presence_loss(
                student_presence, teacher_presence
            )
        return loss

    def training_loss(
        self,
        x_labelled: torch.Tensor,
        y: Any,
        x_unlabelled_student: torch.Tensor,
        x_unlabelled_teacher: torch.Tensor,
        supervised_loss: Callable[[ModelOutput, Any], torch.Tensor],
        inverse_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The step's loss ``supervised + weight · consistency``.

        Args:
            x_labelled: ``[B_l, C, H, W]`` labelled images; ``y`` their targets.
            x_unlabelled_student / x_unlabelled_teacher: ``[B_u, C, H, W]`` the two views of
                the unlabelled images.
            supervised_loss: ``loss(student_output_on_labelled, y) -> scalar``; receives the
                model's output as it returns it (tensor or tuple).
            inverse_transform: maps the student's unlabelled main logits into the teacher
                view's geometry (e.g. :func:`flip_back`); None when the views share geometry.

        Returns:
            ``(loss, parts)``: ``parts`` holds ``supervised`` and ``consistency`` (detached
            scalars, consistency unweighted) and ``weight`` (float).
        """
        weight = self.consistency_weight_now
        out_labelled, out_unlabelled = self.student_outputs(x_labelled, x_unlabelled_student)
        supervised = supervised_loss(out_labelled, y)
        consistency = self.consistency(
            out_unlabelled, self.teacher_outputs(x_unlabelled_teacher), inverse_transform
        )
        if self.teacher_bn == "refresh":
            self._refresh_batch = x_labelled.detach()
        parts = {"supervised": supervised.detach(), "consistency": consistency.detach()}
        return supervised + weight * consistency, {**parts, "weight": weight}

    @torch.no_grad()
    def update_teacher(self) -> None:
        """Move the teacher toward the student; call once after each optimiser step. With
        ``teacher_bn="refresh"`` the teacher then runs in train mode on the labelled batch of
        the last :meth:`training_loss` to refresh its BatchNorm statistics."""
        self.teacher.update(self.student)
        if self._refresh_batch is not None:
            module = self.teacher.module
            module.train()
            try:
                module(self._refresh_batch)
            finally:
                module.eval()
                self._refresh_batch = None

    def state_dict(self) -> dict[str, Any]:
        """The teacher (weights, update counter, decay) and the epoch. The student's weights
        are not included: the owner of the optimiser saves them with the model."""
        return {"teacher": self.teacher.state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the decay is the saved one)."""
        self.teacher.load_state_dict(state["teacher"])
        self.epoch = float(state["epoch"])
