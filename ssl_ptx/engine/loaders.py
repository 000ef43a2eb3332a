"""DataLoaders for the Trainer: deterministic per epoch, sharded over DDP processes.

:func:`build_train_loader` draws batches with the positive-rate sampler (or every image once,
shuffled) and :func:`build_val_loader` walks the validation set once; both shard over DDP
processes. :func:`reseed_loader` makes an epoch's data a function of a seed alone — the
worker seeds and, without workers, the augmentation pipeline — which, with the samplers'
``set_epoch``, is what lets a resumed run see exactly the batches an uninterrupted one would.

Semi-supervised runs draw two streams per step: :class:`TwoStreamLoader` pairs each batch of
the labelled loader with a batch of an endless, seeded, sharded stream of unlabelled images
(:class:`UnlabelledStreamSampler`), built by :func:`build_two_stream_loader`. The Trainer
handles any training loader through :func:`set_loader_epoch`, :func:`reseed_loader`,
:func:`loader_state` and :func:`load_loader_state`: a ``DataLoader``, or an object with
``set_epoch``, ``reseed``, ``state_dict`` and ``load_state_dict`` like
:class:`TwoStreamLoader`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler

from ssl_ptx.config import ConfigError, DataConfig, TrainConfig
from ssl_ptx.data.samplers import ConstantSchedule, LinearSchedule, PositiveRateSampler
from ssl_ptx.engine.rng import derive_seed

__all__ = [
    "ShardSampler",
    "TwoStreamLoader",
    "UnlabelledStreamSampler",
    "build_fold_loaders",
    "build_train_loader",
    "build_two_stream_loader",
    "build_val_loader",
    "epochs_batches",
    "load_loader_state",
    "loader_sampler",
    "loader_state",
    "per_rank_batch",
    "positive_rate_schedule",
    "reseed_loader",
    "sampled_train_loader",
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


def per_rank_batch(batch_size: int, world_size: int, key: str = "data.batch_size") -> int:
    """Each process's share of the global batch ``batch_size`` (the config value ``key``).

    Raises:
        ssl_ptx.config.ConfigError: it does not divide evenly over ``world_size`` processes.
    """
    if batch_size % world_size:
        raise ConfigError(
            f"{key}={batch_size} is the global batch and must divide evenly over "
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
    last incomplete batch is dropped, and under DDP the epoch's last ``n mod world_size``
    images too (not padded with repeated images): step ``k`` of ``world_size`` processes
    then trains on exactly the images of step ``k`` of one process with the whole global
    batch, and the processes take as many steps as that process. Workers are not
    persistent, so that :func:`reseed_loader` reaches them every epoch.

    Args:
        dataset: a dataset with a ``labels`` array when ``positive_rate`` is set.
        config: the data section.
        epochs: length of the run (default length of the positive-rate schedule).
        seed: seed of the sampler and of the loader's generator.
        world_size, rank: the DDP layout.
        pin_memory: pin host memory (when training on CUDA).
    """
    schedule = positive_rate_schedule(config, epochs)
    if schedule is not None:
        sampler: Sampler[int] = PositiveRateSampler(
            dataset.labels,
            schedule,
            seed=seed,
            num_replicas=world_size,
            rank=rank,
            drop_last=True,
        )
    else:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
    return sampled_train_loader(
        dataset, sampler, config, world_size=world_size, seed=seed, pin_memory=pin_memory
    )


def positive_rate_schedule(
    config: DataConfig, epochs: int
) -> ConstantSchedule | LinearSchedule | None:
    """The share of positive images per epoch that ``config`` asks for: constant
    ``positive_rate``, or linear from it to ``positive_rate_end`` over
    ``positive_rate_epochs`` (default: ``epochs``, the whole run); None without a
    ``positive_rate`` (every image once)."""
    if config.positive_rate is None:
        return None
    if config.positive_rate_end is None:
        return ConstantSchedule(config.positive_rate)
    return LinearSchedule(
        config.positive_rate, config.positive_rate_end, config.positive_rate_epochs or epochs
    )


def sampled_train_loader(
    dataset: Dataset,
    sampler: Sampler[int],
    config: DataConfig,
    *,
    world_size: int,
    seed: int,
    pin_memory: bool,
) -> DataLoader:
    """A training DataLoader over ``dataset`` drawn by ``sampler`` (which shards by rank):
    per-process batch ``config.batch_size / world_size``, the last incomplete batch dropped,
    ``config.num_workers`` non-persistent workers (so that :func:`reseed_loader` reaches them
    every epoch), the loader's generator seeded by ``seed``."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=per_rank_batch(config.batch_size, world_size),
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
    batch = config.val_batch_size or per_rank_batch(config.batch_size, world_size)
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=ShardSampler(len(dataset), num_replicas=world_size, rank=rank),
        num_workers=config.num_workers,
        pin_memory=pin_memory,
        drop_last=False,
    )


def build_fold_loaders(
    train_set: Dataset, val_set: Dataset, config: TrainConfig, context: Any
) -> tuple[DataLoader, DataLoader]:
    """The training and validation loaders of one fold for this process.

    Args:
        train_set / val_set: the fold's datasets.
        config: the run config (any :class:`~ssl_ptx.config.TrainConfig`): its ``data``
            section and the ``trainer``'s ``epochs`` (for schedules over the run) and
            ``seed``.
        context: an :class:`~ssl_ptx.engine.distributed.DistributedContext` (rank, world
            size; memory is pinned on CUDA).

    See :func:`build_train_loader` and :func:`build_val_loader`.
    """
    options = context.loader_options()
    train_loader = build_train_loader(
        train_set, config.data, epochs=config.trainer.epochs, seed=config.trainer.seed, **options
    )
    return train_loader, build_val_loader(val_set, config.data, **options)


def loader_sampler(loader: DataLoader) -> Any:
    """The index sampler of ``loader`` (inside its batch sampler when there is one)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    return inner if inner is not None else loader.sampler


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on a loader that has it (:class:`TwoStreamLoader`), else on
    the DataLoader's sampler (and batch sampler) when they have it."""
    if not isinstance(loader, DataLoader):
        loader.set_epoch(epoch)
        return
    samplers = (loader_sampler(loader), getattr(loader, "batch_sampler", None))
    for sampler in {id(s): s for s in samplers}.values():
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


def _loader_epoch(loader: Any) -> int | None:
    """The epoch the loader's sampler is set to (None when it has no notion of one)."""
    if not isinstance(loader, DataLoader):
        return loader.epoch
    return getattr(loader_sampler(loader), "epoch", None)


def _find_transforms(dataset: Any) -> list[Any]:
    """The ``transform`` objects of ``dataset`` and of the datasets it wraps (``Subset``,
    ``ConcatDataset``), each once, in order."""
    if isinstance(dataset, ConcatDataset):
        found = [t for part in dataset.datasets for t in _find_transforms(part)]
        return list({id(t): t for t in found}.values())
    while dataset is not None:
        if hasattr(dataset, "transform"):
            return [dataset.transform] if dataset.transform is not None else []
        dataset = getattr(dataset, "dataset", None)
    return []


def reseed_loader(loader: Any, seed: int) -> None:
    """Make the next pass over ``loader`` a function of ``seed`` alone.

    Seeds the loader's generator (it draws the worker seeds, from which
    :class:`~ssl_ptx.data.datasets.SegmentationDataset` reseeds its augmentation in each
    worker) and, when data is loaded in the main process (``num_workers=0``), the
    augmentation pipelines themselves (albumentations keeps its own random state). A loader
    that is not a DataLoader reseeds itself (``loader.reseed(seed)``).
    """
    if not isinstance(loader, DataLoader):
        loader.reseed(seed)
        return
    if loader.generator is not None:
        loader.generator.manual_seed(seed)
    if loader.num_workers == 0:
        for transform in _find_transforms(loader.dataset):
            if hasattr(transform, "set_random_seed"):
                transform.set_random_seed(seed)


def loader_state(loader: Any) -> dict[str, Any] | None:
    """What a resumed run needs of the training loader: its sampler's ``state_dict()`` (or
    the loader's own, for a :class:`TwoStreamLoader`); None when there is none."""
    if not isinstance(loader, DataLoader):
        return loader.state_dict()
    sampler = loader_sampler(loader)
    return sampler.state_dict() if hasattr(sampler, "state_dict") else None


def load_loader_state(loader: Any, state: Mapping[str, Any] | None) -> None:
    """Restore what :func:`loader_state` returned (nothing to do for None)."""
    if state is None:
        return
    if not isinstance(loader, DataLoader):
        loader.load_state_dict(state)
        return
    sampler = loader_sampler(loader)
    if hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(state)


def epochs_batches(loader: Any, epochs: int) -> list[int]:
    """Number of batches of ``loader`` in each of ``epochs`` epochs (the positive-rate
    sampler's epochs change length with the schedule). The sampler's epoch is restored."""
    current = _loader_epoch(loader)
    counts = []
    for epoch in range(epochs):
        set_loader_epoch(loader, epoch)
        counts.append(len(loader))
    if current is not None:
        set_loader_epoch(loader, current)
    return counts


class UnlabelledStreamSampler(Sampler[int]):
    """An endless, seeded stream of indices of ``range(n)``, read one window at a time.

    The global stream is permutation 0 of ``range(n)``, then permutation 1, …, permutation
    ``c`` drawn from ``numpy.random.default_rng([seed, c])``; every index appears once per
    ``n`` positions. A step takes the next ``batch_size · num_replicas`` positions of the
    global stream and process ``rank`` takes every ``num_replicas``-th of them starting at
    ``rank``: the processes' batches of one step are disjoint, and together they are the batch
    one process with the whole global batch would draw.

    :meth:`set_window` chooses the positions the next iteration covers; the owner
    (:class:`TwoStreamLoader`) keeps the stream position, so what a step draws depends on the
    seed and the position only.

    Args:
        n: number of unlabelled images (>= 1).
        batch_size: images per step and process.
        seed: seed of the permutations (the same on every process).
        num_replicas, rank: the DDP layout.
    """

    def __init__(
        self, n: int, *, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch={batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.position = 0
        self.n_batches = 0

    @property
    def global_batch(self) -> int:
        """Stream positions one step consumes (all processes)."""
        return self.batch_size * self.num_replicas

    def set_window(self, position: int, n_batches: int) -> None:
        """The next iteration yields this process's indices of ``n_batches`` steps starting
        at global stream position ``position``."""
        if position < 0 or n_batches < 0:
            raise ValueError(f"need position, n_batches >= 0, got {position}, {n_batches}")
        self.position, self.n_batches = int(position), int(n_batches)

    def stream(self, start: int, count: int) -> np.ndarray:
        """Global stream positions ``[start, start + count)`` as int64 indices."""
        parts, cycle, offset = [], start // self.n, start % self.n
        while count > 0:
            permutation = np.random.default_rng([self.seed, cycle]).permutation(self.n)
            take = permutation[offset : offset + count]
            parts.append(take)
            count -= take.size
            cycle, offset = cycle + 1, 0
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def __iter__(self) -> Iterator[int]:
        window = self.stream(self.position, self.n_batches * self.global_batch)
        return iter(window[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.n_batches * self.batch_size


class TwoStreamLoader:
    """Labelled batches paired with unlabelled ones: ``{"labelled": …, "unlabelled": …}``.

    An epoch is one pass over ``labelled`` (its sampler decides the length); each of its
    batches comes with the next batch of the unlabelled stream. The stream position advances
    by a whole epoch's worth when an epoch's iteration is complete, so a run resumed from a
    mid-epoch checkpoint (which replays the epoch's first batches) reads the same unlabelled
    images as an uninterrupted run; ``state_dict`` stores it beside the labelled sampler's
    state.

    Args:
        labelled: the labelled DataLoader (e.g. :func:`build_train_loader`).
        unlabelled: a DataLoader whose sampler is an :class:`UnlabelledStreamSampler` and
            whose batch size is that sampler's, with ``drop_last=False``.
    """

    def __init__(self, labelled: DataLoader, unlabelled: DataLoader) -> None:
        if not isinstance(unlabelled.sampler, UnlabelledStreamSampler):
            raise TypeError("the unlabelled DataLoader must draw from an UnlabelledStreamSampler")
        if unlabelled.batch_size != unlabelled.sampler.batch_size:
            raise ValueError(
                f"unlabelled DataLoader batch {unlabelled.batch_size} differs from its "
                f"sampler's {unlabelled.sampler.batch_size}"
            )
        self.labelled, self.unlabelled = labelled, unlabelled
        self.stream: UnlabelledStreamSampler = unlabelled.sampler
        self.position = 0

    @property
    def epoch(self) -> int | None:
        """The labelled sampler's epoch."""
        return _loader_epoch(self.labelled)

    def __len__(self) -> int:
        return len(self.labelled)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n_batches = len(self.labelled)
        self.stream.set_window(self.position, n_batches)
        for labelled, unlabelled in zip(self.labelled, self.unlabelled, strict=True):
            yield {"labelled": labelled, "unlabelled": unlabelled}
        self.position += n_batches * self.stream.global_batch

    def set_epoch(self, epoch: int) -> None:
        set_loader_epoch(self.labelled, epoch)

    def reseed(self, seed: int) -> None:
        """Reseed both loaders, each from its own stream of ``seed``."""
        reseed_loader(self.labelled, derive_seed(seed, 0))
        reseed_loader(self.unlabelled, derive_seed(seed, 1))

    def state_dict(self) -> dict[str, Any]:
        return {
            "labelled": loader_state(self.labelled),
            "unlabelled_position": self.position,
            "unlabelled_seed": self.stream.seed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_loader_state(self.labelled, state["labelled"])
        self.position = int(state["unlabelled_position"])
        self.stream.seed = int(state["unlabelled_seed"])


def build_two_stream_loader(
    labelled: DataLoader,
    unlabelled: Dataset,
    *,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    world_size: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> TwoStreamLoader:
    """Pair ``labelled`` with an endless stream over ``unlabelled``.

    Args:
        labelled: the labelled training DataLoader.
        unlabelled: the unlabelled dataset (its masks, if any, are not used).
        batch_size: GLOBAL unlabelled images per step (divided over the processes).
        seed: seed of the stream and of the unlabelled loader's generator.
        num_workers: DataLoader workers of the unlabelled stream.
        world_size, rank: the DDP layout.
        pin_memory: pin host memory (when training on CUDA).
    """
    per_rank = per_rank_batch(batch_size, world_size, "unlabelled.batch_size")
    sampler = UnlabelledStreamSampler(
        len(unlabelled), batch_size=per_rank, seed=seed, num_replicas=world_size, rank=rank
    )
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(
        unlabelled,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        generator=generator,
        persistent_workers=False,
    )
    return TwoStreamLoader(labelled, loader)
