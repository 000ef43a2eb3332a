"""Exponential moving average (EMA) of a model's weights: :class:`ModelEMA`.

The averaged copy θ̄ follows the trained model θ after every optimiser step::

    θ̄ ← d_t · θ̄ + (1 − d_t) · θ

It is what the 3rd place of SIIM-ACR validated and submitted, and the teacher of Mean Teacher
(:mod:`ssl_ptx.mean_teacher`). This module imports torch and the standard library only, so
other projects can ``import ssl_ptx.ema`` alone.

Rules of use:

* **Create it before wrapping the model** in ``DistributedDataParallel`` or ``torch.compile``
  (it deep-copies the plain module; a wrapper handed in is unwrapped first with
  :func:`unwrap_model`, so a wrapped model also works, but the copy is never wrapped).
* **Call** :meth:`ModelEMA.update` **once per optimiser step**, after ``optimizer.step()``
  (not per micro-batch under gradient accumulation). It unwraps DDP / DataParallel /
  ``torch.compile`` wrappers itself, so ``ema.update(ddp_model)`` is fine. Under DDP every
  rank updates its own copy from the same synchronised weights, so the copies stay equal;
  BatchNorm buffers are equal only if the student's are (DDP's ``broadcast_buffers=True``).
* Save :meth:`ModelEMA.state_dict` (averaged weights, update counter and decay) with the
  training state, and export ``ema.module.state_dict()`` as the model.

Buffer policies (``buffers=``), for BatchNorm running statistics and other buffers:

* ``"average"`` — float buffers are averaged like the parameters, integer buffers
  (``num_batches_tracked``) are copied. timm's ``ModelEmaV3`` and the 3rd place do this.
* ``"copy"`` — every buffer is copied from the model at each update (timm's
  ``exclude_buffers=True``, ``torch.optim.swa_utils.AveragedModel``'s default).
* ``"own"`` — buffers are left alone: the averaged copy keeps its own statistics, refreshed by
  its own forward passes in train mode (the original Mean Teacher, the 5th place).

Decay per update (``t`` = number of updates so far including this one, the first is ``t = 1``;
``s = t − update_after_step``):

* ``s ≤ 0``: ``d_t = 0``, a plain copy (3rd place: copy during epochs 1–6).
* ``warmup=None``: ``d_t = decay``.
* ``warmup="mean_teacher"``: ``d_t = min(1 − 1/(s + 1), decay)`` — the rule of the original
  Mean Teacher code, whose step counter is incremented before the update, so the first update
  uses 0.5 and the averaged copy keeps weight 1/(s + 1) of its initial (copied) state. The 5th
  place and SSL4MIS count from 0 instead (exact copy at the first update, then 0.5, 2/3, …);
  ``update_after_step=1`` reproduces that.
* ``warmup="power"``: ``d_t = min(1 − (1 + s/γ)^(−p), decay)`` (timm's warm-up with
  ``warmup_gamma`` γ and ``warmup_power`` p). timm's ``get_decay(step)`` subtracts one more
  (copy at its first step), so ``ModelEmaV3(update_after_step=k)`` fed ``step = t`` equals
  ``ModelEMA(update_after_step=k + 1)``.

The base ``decay`` can be changed at any time (:meth:`ModelEMA.set_decay` or the ``decay``
property) by an epoch schedule such as :func:`step_decay_schedule`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "BUFFER_POLICIES",
    "WARMUPS",
    "ModelEMA",
    "fifth_place_decay_schedule",
    "step_decay_schedule",
    "third_place_decay_schedule",
    "unwrap_model",
]

BUFFER_POLICIES = ("average", "copy", "own")
WARMUPS = (None, "mean_teacher", "power")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers, however nested; ``model`` itself when it is not wrapped."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _check_decay(decay: float) -> float:
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    return decay


class ModelEMA(nn.Module):
    """An exponential moving average of ``model``'s weights (see the module docstring).

    Args:
        model: the model to follow (a wrapper is unwrapped first). It is deep-copied.
        decay: base decay d in [0, 1]; the horizon is about 1/(1 − d) updates.
        warmup: None, ``"mean_teacher"`` or ``"power"`` (decay grows from small values).
        warmup_gamma: γ of the ``"power"`` warm-up (> 0).
        warmup_power: p of the ``"power"`` warm-up (> 0; 2/3 reaches 0.999 after ~31.6k
            updates, 3/4 after ~10k).
        buffers: ``"average"``, ``"copy"`` or ``"own"`` (see the module docstring).
        update_after_step: the first ``update_after_step`` updates copy the model exactly.
        device: keep the averaged copy on this device (e.g. ``"cpu"`` to save accelerator
            memory); default the model's device.

    Attributes:
        module: the averaged model, in eval mode, ``requires_grad=False``.
        num_updates: updates done so far (restored by :meth:`load_state_dict`).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        *,
        warmup: str | None = None,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        buffers: str = "average",
        update_after_step: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if warmup not in WARMUPS:
            raise ValueError(f"warmup must be one of {WARMUPS}, got {warmup!r}")
        if buffers not in BUFFER_POLICIES:
            raise ValueError(f"buffers must be one of {BUFFER_POLICIES}, got {buffers!r}")
        if warmup_gamma <= 0 or warmup_power <= 0:
            raise ValueError(
                f"warmup_gamma and warmup_power must be > 0, got {warmup_gamma}, {warmup_power}"
            )
        if update_after_step < 0:
            raise ValueError(f"update_after_step must be >= 0, got {update_after_step}")
        self._decay = _check_decay(decay)
        self.warmup = warmup
        self.warmup_gamma = float(warmup_gamma)
        self.warmup_power = float(warmup_power)
        self.buffer_policy = buffers
        self.update_after_step = int(update_after_step)
        self.num_updates = 0
        self.module = copy.deepcopy(unwrap_model(model))
        if device is not None:
            self.module.to(device)
        self.module.eval()
        self.module.requires_grad_(False)
        self._checked_source: int | None = None

    @property
    def decay(self) -> float:
        """The base decay (the warm-up and ``update_after_step`` act below it)."""
        return self._decay

    @decay.setter
    def decay(self, value: float) -> None:
        self._decay = _check_decay(value)

    def set_decay(self, decay: float) -> None:
        """Change the base decay (schedule hook, e.g. once per epoch)."""
        self.decay = decay

    def decay_at(self, num_updates: int) -> float:
        """The decay that update number ``num_updates`` (1-based) uses with the current base
        decay; 0.0 means an exact copy."""
        steps = num_updates - self.update_after_step
        if steps <= 0:
            return 0.0
        if self.warmup == "mean_teacher":
            return min(1.0 - 1.0 / (steps + 1), self._decay)
        if self.warmup == "power":
            return min(1.0 - (1.0 + steps / self.warmup_gamma) ** -self.warmup_power, self._decay)
        return self._decay

    def _check_source(self, source: nn.Module) -> None:
        """Refuse a model whose parameters and buffers do not match the averaged copy."""
        ema_names = [n for n, _ in self.module.named_parameters()]
        ema_names += [n for n, _ in self.module.named_buffers()]
        src_names = [n for n, _ in source.named_parameters()]
        src_names += [n for n, _ in source.named_buffers()]
        if ema_names != src_names:
            missing = sorted(set(ema_names) - set(src_names))[:5]
            extra = sorted(set(src_names) - set(ema_names))[:5]
            raise ValueError(
                f"ModelEMA.update: {type(source).__name__} does not match the averaged "
                f"{type(self.module).__name__} ({len(src_names)} vs {len(ema_names)} tensors; "
                f"missing {missing}, unexpected {extra})"
            )
        self._checked_source = id(source)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the averaged weights toward ``model``'s (call once per optimiser step).

        All floating tensors to average go through one fused ``torch._foreach_lerp_``;
        tensors to copy go through one ``torch._foreach_copy_``.
        """
        source = unwrap_model(model)
        if self._checked_source != id(source):
            self._check_source(source)
        self.num_updates += 1
        decay = self.decay_at(self.num_updates)

        ema_params, src_params = list(self.module.parameters()), list(source.parameters())
        if self.buffer_policy == "own":
            average, average_src, copied, copied_src = ema_params, src_params, [], []
        else:
            ema_buffers, src_buffers = list(self.module.buffers()), list(source.buffers())
            if self.buffer_policy == "copy":
                average, average_src = ema_params, src_params
                copied, copied_src = ema_buffers, src_buffers
            else:
                average, average_src, copied, copied_src = (
                    list(ema_params),
                    list(src_params),
                    [],
                    [],
                )
                for ema_b, src_b in zip(ema_buffers, src_buffers, strict=True):
                    if ema_b.is_floating_point():
                        average.append(ema_b)
                        average_src.append(src_b)
                    else:
                        copied.append(ema_b)
                        copied_src.append(src_b)

        if decay == 0.0:
            copied, copied_src = average + copied, average_src + copied_src
        elif average:
            if average[0].device != average_src[0].device:
                average_src = [t.to(average[0].device, non_blocking=True) for t in average_src]
            weight = 1.0 - decay
            if all(e.dtype == s.dtype for e, s in zip(average, average_src, strict=True)):
                torch._foreach_lerp_(average, average_src, weight)
            else:  # add_ promotes in the kernel; lerp_ needs equal dtypes
                torch._foreach_mul_(average, decay)
                torch._foreach_add_(average, average_src, alpha=weight)
        if copied:
            torch._foreach_copy_(copied, copied_src, non_blocking=True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The averaged model's forward."""
        return self.module(*args, **kwargs)

    def get_extra_state(self) -> dict[str, Any]:
        """Stored in :meth:`state_dict` beside the averaged weights."""
        return {"num_updates": self.num_updates, "decay": self._decay}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.decay = state["decay"]

    def extra_repr(self) -> str:
        return (
            f"decay={self._decay}, warmup={self.warmup!r}, buffers={self.buffer_policy!r}, "
            f"update_after_step={self.update_after_step}, num_updates={self.num_updates}"
        )


def step_decay_schedule(
    milestones: Mapping[float, float], final: float
) -> Callable[[float], float]:
    """An epoch → decay step schedule for :meth:`ModelEMA.set_decay`.

    Args:
        milestones: ``{m: d}``: decay ``d`` while ``epoch < m`` (the smallest such ``m`` wins).
        final: the decay from the last milestone on.

    Returns:
        ``schedule(epoch)``, where ``epoch`` counts epochs done (0 at the start of training;
        the Trainer's 0-based epoch index, or a fractional ``steps / steps_per_epoch``).

    Example: ``step_decay_schedule({5: 0.5, 10: 0.9, 20: 0.99}, final=0.999)`` is the 5th
    place's schedule: 0.5 for epochs [0, 5), 0.9 for [5, 10), 0.99 for [10, 20), then 0.999.
    """
    steps = sorted((float(m), _check_decay(d)) for m, d in milestones.items())
    final = _check_decay(final)

    def schedule(epoch: float) -> float:
        for milestone, decay in steps:
            if epoch < milestone:
                return decay
        return final

    return schedule


def fifth_place_decay_schedule() -> Callable[[float], float]:
    """The 5th place's teacher decay: 0.5 / 0.9 / 0.99 / 0.999 from epochs 0 / 5 / 10 / 20.

    Their rule is on the fractional epoch e (α = 0.5 while e ≤ 5, …); with epochs counted from
    0 this is the same up to the single step at which e equals a milestone exactly.
    """
    return step_decay_schedule({5: 0.5, 10: 0.9, 20: 0.99}, final=0.999)


def third_place_decay_schedule(
    copy_epochs: int = 6, decay: float = 0.99
) -> Callable[[float], float]:
    """The 3rd place's EMA: an exact copy (decay 0) for the first ``copy_epochs`` epochs
    (their 1-based epochs 1–6 = 0-based 0–5), then ``decay``."""
    return step_decay_schedule({copy_epochs: 0.0}, final=decay)
