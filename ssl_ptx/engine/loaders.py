"""DataLoaders for the Trainer: deterministic per epoch, sharded over DDP processes.

:func:`build_train_loader` draws batches with the positive-rate sampler (or every image once,
shuffled) and :func:`build_val_loader` walks the validation set once; both shard over DDP
processes. :func:`reseed_loader` makes an epoch's data a function of a seed alone — the
worker seeds and, without workers, the augmentation pipeline — which, with the samplers'
``set_epoch``, is what lets a resumed run see exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ssl_ptx.config import ConfigError, DataConfig
from ssl_ptx.data.samplers import ConstantSchedule, LinearSchedule, PositiveRateSampler

__all__ = [
    "ShardSampler",
    "build_train_loader",
    "build_val_loader",
    "epochs_batches",
    "loader_sampler",
    "reseed_loader",
    "set_loader_epoch",
]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, …`` of ``range(n)``, in order, without padding.

    For validation under DDP: shards are disjoint, cover every index exactly once, and differ
    in length by at most one, so gathered per-image metrics count every image once.
    """

    def __init__(self, n: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}"
            )
        self.n, self.num_replicas, self.rank = n, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


def _per_rank_batch(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise ConfigError(
            f"data.batch_size={batch_size} is the global batch and must divide evenly over "
            f"{world_size} processes"
        )
    return batch_size // world_size


def build_train_loader(
    dataset: Dataset,
    config: DataConfig,
    *,
    epochs: int,
    seed: int,
    world_size: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """The training DataLoader: per-process batch = ``config.batch_size / world_size``.

    With ``config.positive_rate`` the epoch is every positive once plus negatives drawn to
    reach that share (:class:`~ssl_ptx.data.samplers.PositiveRateSampler`, constant or linear
    to ``positive_rate_end``); otherwise every image once, shuffled
    (``DistributedSampler``). Both shard by rank and are seeded by (``seed``, epoch). The
    last incomplete batch is dropped. Workers are not persistent, so that
    :func:`reseed_loader` reaches them every epoch.

    Args:
        dataset: a dataset with a ``labels`` array when ``positive_rate`` is set.
        config: the data section.
        epochs: length of the run (default length of the positive-rate schedule).
        seed: seed of the sampler and of the loader's generator.
        world_size, rank: the DDP layout.
        pin_memory: pin host memory (when training on CUDA).
    """
    per_rank = _per_rank_batch(config.batch_size, world_size)
    if config.positive_rate is not None:
        if config.positive_rate_end is None:
            schedule = ConstantSchedule(config.positive_rate)
        else:
            schedule = LinearSchedule(
                config.positive_rate,
                config.positive_rate_end,
                config.positive_rate_epochs or epochs,
            )
        sampler: Sampler[int] = PositiveRateSampler(
            dataset.labels, schedule, seed=seed, num_replicas=world_size, rank=rank
        )
    else:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        generator=generator,
        persistent_workers=False,
    )


def build_val_loader(
    dataset: Dataset,
    config: DataConfig,
    *,
    world_size: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """The validation DataLoader: every image once over all processes (:class:`ShardSampler`),
    batch ``config.val_batch_size`` (default: the per-process training batch)."""
    batch = config.val_batch_size or _per_rank_batch(config.batch_size, world_size)
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=ShardSampler(len(dataset), num_replicas=world_size, rank=rank),
        num_workers=config.num_workers,
        pin_memory=pin_memory,
        drop_last=False,
    )


def loader_sampler(loader: DataLoader) -> Any:
    """The index sampler of ``loader`` (inside its batch sampler when there is one)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    return inner if inner is not None else loader.sampler


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the loader's sampler (and batch sampler) when they have it."""
    samplers = (loader_sampler(loader), getattr(loader, "batch_sampler", None))
    for sampler in {id(s): s for s in samplers}.values():
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


def _find_transform(dataset: Any) -> Any:
    """The ``transform`` of ``dataset`` or of the dataset a Subset wraps (None if none)."""
    while dataset is not None:
        if hasattr(dataset, "transform"):
            return dataset.transform
        dataset = getattr(dataset, "dataset", None)
    return None


def reseed_loader(loader: DataLoader, seed: int) -> None:
    """Make the next pass over ``loader`` a function of ``seed`` alone.

    Seeds the loader's generator (it draws the worker seeds, from which
    :class:`~ssl_ptx.data.datasets.SegmentationDataset` reseeds its augmentation in each
    worker) and, when data is loaded in the main process (``num_workers=0``), the
    augmentation pipeline itself (albumentations keeps its own random state).
    """
    if loader.generator is not None:
        loader.generator.manual_seed(seed)
    if loader.num_workers == 0:
        transform = _find_transform(loader.dataset)
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed(seed)


def epochs_batches(loader: DataLoader, epochs: int) -> list[int]:
    """Number of batches of ``loader`` in each of ``epochs`` epochs (the positive-rate
    sampler's epochs change length with the schedule). The sampler's epoch is restored."""
    sampler = loader_sampler(loader)
    current = getattr(sampler, "epoch", None)
    counts = []
    for epoch in range(epochs):
        set_loader_epoch(loader, epoch)
        counts.append(len(loader))
    if current is not None:
        set_loader_epoch(loader, current)
    return counts
