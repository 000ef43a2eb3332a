"""Ratio mixing of a labelled set with a pseudo-labelled set, drawn anew every epoch.

The 3rd place (bestfitting, ``SiimDataset.resample_pseudo``) trained on the whole SIIM fold
plus, each epoch, a fresh draw of CheXpert pseudo labels: with ratio ``r``

* pseudo positives ``= min(round(r · N_pos), available)``, where ``N_pos`` is the number of
  SIIM positives;
* pseudo negatives ``= min(round(N_neg / N_pos · pseudo positives), available)``: SIIM's
  negative:positive proportion;

both without replacement. ``ratio=0.5`` thus adds pseudo data worth half the SIIM fold, with
SIIM's class balance. The pooled epoch is then used once, shuffled, or (as the 3rd place did
with its balanced sampler) sampled to a positive fraction: every pooled positive once plus
pooled negatives drawn with replacement (the rule of
:class:`~ssl_ptx.data.samplers.PositiveRateSampler`).

The sampler's indices address ``ConcatDataset([labelled, pseudo])``: ``0 … n_labelled − 1``
the labelled images, ``n_labelled …`` the pseudo ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from ssl_ptx.data.samplers import ConstantSchedule, PositiveRateSampler

__all__ = ["RatioMixSampler", "pseudo_counts"]


def pseudo_counts(
    n_pos: int, n_neg: int, ratio: float, available_pos: int, available_neg: int
) -> tuple[int, int]:
    """Pseudo positives and negatives of one epoch (see the module docstring).

    Args:
        n_pos, n_neg: positives and negatives of the labelled set.
        ratio: pseudo positives per labelled positive (>= 0).
        available_pos, available_neg: pseudo images of each class.

    Returns:
        ``(pseudo positives, pseudo negatives)``.
    """
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    positives = min(round(ratio * n_pos), available_pos)
    negatives = round(n_neg / n_pos * positives) if n_pos else 0
    return positives, min(negatives, available_neg)


class RatioMixSampler(Sampler[int]):
    """Every labelled image plus a fresh, seeded draw of pseudo images each epoch.

    For epoch ``e`` the pseudo draw (:func:`pseudo_counts`) and the order are drawn from
    ``numpy.random.default_rng([seed, e])``, the same on every rank. With
    ``positive_rate`` the pooled epoch holds every pooled positive once and pooled negatives
    drawn with replacement to reach that fraction; otherwise every pooled image once.

    Under DDP the epoch is padded by wrapping to a multiple of ``num_replicas`` (or truncated
    with ``drop_last``) and rank ``r`` takes every ``num_replicas``-th index from ``r``:
    shards are disjoint and together cover the epoch. Call :meth:`set_epoch` before each
    epoch; :meth:`state_dict` goes into ``last.pt``.

    Args:
        labelled_labels: float [N_l] labels of the labelled set (1, 0; others never drawn).
        pseudo_labels: float [N_p] pseudo labels (1, 0).
        ratio: pseudo positives per labelled positive (3rd place: 0.5).
        positive_rate: epoch → positive fraction in (0, 1], a float for a constant one, or
            None for every pooled image once.
        seed: base seed, shared by all ranks.
        num_replicas, rank: the DDP layout (default: from ``torch.distributed``, else 1, 0).
        drop_last: drop the tail of the epoch instead of padding it.

    Raises:
        ValueError: the labelled set has no positive, bad ratio or DDP layout.
    """

    def __init__(
        self,
        labelled_labels: np.ndarray | list[float],
        pseudo_labels: np.ndarray | list[float],
        ratio: float = 0.5,
        *,
        positive_rate: Callable[[int], float] | float | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        labelled = np.asarray(labelled_labels, np.float64)
        pseudo = np.asarray(pseudo_labels, np.float64)
        if labelled.ndim != 1 or pseudo.ndim != 1:
            raise ValueError("labelled_labels and pseudo_labels must be one-dimensional")
        if ratio < 0:
            raise ValueError(f"ratio must be >= 0, got {ratio}")
        self.labelled_positives = np.flatnonzero(labelled == 1.0)
        self.labelled_negatives = np.flatnonzero(labelled == 0.0)
        if self.labelled_positives.size == 0:
            raise ValueError("the labelled set holds no positive (label 1) image")
        offset = labelled.size
        self.pseudo_positives = offset + np.flatnonzero(pseudo == 1.0)
        self.pseudo_negatives = offset + np.flatnonzero(pseudo == 0.0)
        self.n_labelled, self.n_pseudo = labelled.size, pseudo.size
        self.ratio = float(ratio)
        if isinstance(positive_rate, (int, float)):
            positive_rate = ConstantSchedule(positive_rate)
        self.positive_rate = positive_rate
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}"
            )
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.seed = int(seed)
        self.epoch = 0

    @property
    def counts(self) -> tuple[int, int]:
        """Pseudo ``(positives, negatives)`` drawn each epoch."""
        return pseudo_counts(
            self.labelled_positives.size,
            self.labelled_negatives.size,
            self.ratio,
            self.pseudo_positives.size,
            self.pseudo_negatives.size,
        )

    def pool(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(positives, negatives)`` of ``epoch``: the labelled ones and the pseudo draw."""
        rng = np.random.default_rng([self.seed, epoch, 0])
        n_pos, n_neg = self.counts
        positives = rng.choice(self.pseudo_positives, size=n_pos, replace=False)
        negatives = rng.choice(self.pseudo_negatives, size=n_neg, replace=False)
        return (
            np.concatenate([self.labelled_positives, np.sort(positives)]),
            np.concatenate([self.labelled_negatives, np.sort(negatives)]),
        )

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """All ranks' indices of ``epoch`` in order, before padding and sharding."""
        positives, negatives = self.pool(epoch)
        if self.positive_rate is None:
            rng = np.random.default_rng([self.seed, epoch, 1])
            return rng.permutation(np.concatenate([positives, negatives]))
        pooled = np.concatenate([positives, negatives])
        labels = np.r_[np.ones(positives.size), np.zeros(negatives.size)]
        rate = PositiveRateSampler(
            labels, self.positive_rate, seed=self.seed, num_replicas=1, rank=0
        )
        return pooled[rate.epoch_indices(epoch)]

    def _epoch_size(self, epoch: int) -> int:
        n_pos, n_neg = self.counts
        positives = self.labelled_positives.size + n_pos
        if self.positive_rate is None:
            return positives + self.labelled_negatives.size + n_neg
        p = self.positive_rate(epoch)
        return positives + round(positives * (1.0 - p) / p)

    def _per_rank(self, total: int) -> int:
        if self.drop_last:
            return total // self.num_replicas
        return math.ceil(total / self.num_replicas)

    def __len__(self) -> int:
        return self._per_rank(self._epoch_size(self.epoch))

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)
        total = self._per_rank(indices.size) * self.num_replicas
        if total > indices.size:
            indices = np.resize(indices, total)  # wraps around from the start
        return iter(indices[self.rank : total : self.num_replicas].tolist())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose indices the next iteration yields."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "ratio": self.ratio}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
        self.ratio = float(state.get("ratio", self.ratio))

    def __repr__(self) -> str:
        n_pos, n_neg = self.counts
        return (
            f"RatioMixSampler(ratio={self.ratio}, {self.n_labelled} labelled + {n_pos} pseudo "
            f"positives + {n_neg} pseudo negatives per epoch of {self.n_pseudo}, "
            f"positive_rate={self.positive_rate!r})"
        )
