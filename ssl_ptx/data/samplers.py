"""Positive-rate sampling: the fraction of pneumothorax images per epoch follows a schedule.

The 1st and 4th place solutions trained on every positive image each epoch plus enough
negatives, drawn with replacement, for positives to make up a chosen fraction ``p`` of the
epoch; ``p`` starts high (0.8) and falls towards the natural rate (about 0.22):

* 1st place (sneddy): stages 0.8 → 0.6 → 0.4 — :class:`StepSchedule`;
* 4th place (amirassov): r(e) = 0.8 − (0.8 − 0.22)·e/60 over 60 epochs —
  ``LinearSchedule(0.8, 0.22, 60)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "ConstantSchedule",
    "LinearSchedule",
    "PositiveRateSampler",
    "StepSchedule",
]


def _check_fraction(p: float, what: str) -> float:
    if not 0.0 < p <= 1.0:
        raise ValueError(f"{what} must be a positive fraction in (0, 1], got {p}")
    return float(p)


class ConstantSchedule:
    """The same positive fraction ``p`` every epoch."""

    def __init__(self, p: float) -> None:
        self.p = _check_fraction(p, "p")

    def __call__(self, epoch: int) -> float:
        return self.p

    def __repr__(self) -> str:
        return f"ConstantSchedule({self.p})"


class LinearSchedule:
    """Linear from ``start`` at epoch 0 towards ``end``: r(e) = start + (end − start)·e/epochs.

    This is the 4th place rule exactly: over epochs 0 … epochs−1 the fraction reaches
    ``start + (end − start)·(epochs − 1)/epochs`` (0.23 for 0.8 → 0.22 over 60), and it is
    ``end`` from epoch ``epochs`` on.
    """

    def __init__(self, start: float, end: float, epochs: int) -> None:
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.start = _check_fraction(start, "start")
        self.end = _check_fraction(end, "end")
        self.epochs = int(epochs)

    def __call__(self, epoch: int) -> float:
        progress = min(max(epoch, 0), self.epochs) / self.epochs
        return self.start + (self.end - self.start) * progress

    def __repr__(self) -> str:
        return f"LinearSchedule({self.start}, {self.end}, epochs={self.epochs})"


class StepSchedule:
    """Piecewise constant: ``{first_epoch: fraction}``; must start at epoch 0.

    Example:
        >>> schedule = StepSchedule({0: 0.8, 10: 0.6, 20: 0.4})
        >>> schedule(9), schedule(10), schedule(99)
        (0.8, 0.6, 0.4)
    """

    def __init__(self, steps: Mapping[int, float]) -> None:
        if 0 not in steps or min(steps) < 0:
            raise ValueError(f"steps must start at epoch 0 with no negative epoch, got {steps}")
        self.epochs = sorted(int(e) for e in steps)
        self.fractions = [_check_fraction(steps[e], f"fraction at epoch {e}") for e in self.epochs]

    def __call__(self, epoch: int) -> float:
        stage = int(np.searchsorted(self.epochs, max(epoch, 0), side="right")) - 1
        return self.fractions[stage]

    def __repr__(self) -> str:
        return f"StepSchedule({dict(zip(self.epochs, self.fractions, strict=True))})"


class PositiveRateSampler(Sampler[int]):
    """Every positive once per epoch plus negatives drawn with replacement to reach ``p``.

    For epoch ``e`` with ``p = schedule(e)`` the epoch holds all ``n_pos`` positives and
    ``round(n_pos·(1 − p)/p)`` negatives drawn uniformly with replacement (so any ``p`` is
    reached, also below the natural positive rate), shuffled together. The draw and the shuffle
    are seeded by ``(seed, e)``: the same seed and epoch give the same indices on every rank.
    Labels other than 1 and 0 (NaN unknown, -1 uncertain) are never sampled.

    Under DDP each rank takes every ``num_replicas``-th index of the shared epoch, starting at
    ``rank``, after the epoch is padded by wrapping to a multiple of ``num_replicas`` (or
    truncated with ``drop_last``), as ``DistributedSampler`` does; ranks are disjoint and
    together cover the epoch. Call :meth:`set_epoch` before each epoch; ``len`` follows the
    current epoch's fraction.

    Args:
        labels: [N] per-sample labels (e.g. ``SegmentationDataset.labels``).
        schedule: epoch → positive fraction in (0, 1]; a float means a constant fraction.
        seed: base seed, shared by all ranks.
        num_replicas: number of DDP processes; default: the world size when
            ``torch.distributed`` is initialised, else 1.
        rank: this process's rank; default: the distributed rank, else 0.
        drop_last: drop the tail of the epoch instead of padding it.
    """

    def __init__(
        self,
        labels: np.ndarray | list[float],
        schedule: Callable[[int], float] | float,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        labels = np.asarray(labels, dtype=np.float64)
        if labels.ndim != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
        self.positives = np.flatnonzero(labels == 1.0)
        self.negatives = np.flatnonzero(labels == 0.0)
        if self.positives.size == 0:
            raise ValueError("labels hold no positive (label 1) sample to build epochs from")
        self.schedule = (
            ConstantSchedule(schedule) if isinstance(schedule, (int, float)) else schedule
        )
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                "need num_replicas >= 1 and 0 <= rank < num_replicas, got "
                f"num_replicas={num_replicas}, rank={rank}"
            )
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0

    def negatives_for(self, epoch: int) -> int:
        """Number of negatives in ``epoch``: round(n_pos·(1 − p)/p)."""
        p = _check_fraction(self.schedule(epoch), f"schedule({epoch})")
        n_neg = round(self.positives.size * (1.0 - p) / p)
        if n_neg and self.negatives.size == 0:
            raise ValueError(f"schedule({epoch}) = {p} needs negatives but labels hold none")
        return n_neg

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """All ranks' indices of ``epoch`` in order, before padding and sharding."""
        rng = np.random.default_rng([self.seed, epoch])
        drawn = rng.choice(self.negatives, size=self.negatives_for(epoch), replace=True)
        return rng.permutation(np.concatenate([self.positives, drawn]))

    def _per_rank(self, total: int) -> int:
        if self.drop_last:
            return total // self.num_replicas
        return math.ceil(total / self.num_replicas)

    def __len__(self) -> int:
        total = self.positives.size + self.negatives_for(self.epoch)
        return self._per_rank(total)

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)
        total_size = self._per_rank(indices.size) * self.num_replicas
        if total_size > indices.size:
            indices = np.resize(indices, total_size)  # wraps around from the start
        shard = indices[self.rank : total_size : self.num_replicas]
        return iter(shard.tolist())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose indices the next iteration yields."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
