"""The training-loader pieces that the SIIM loader and the pseudo-label loader share
(ssl_ptx.engine.loaders): the positive-rate schedule a data config asks for, the per-process
batch, and the loader over a sharding sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from ssl_ptx.config import ConfigError, DataConfig, TrainConfig
from ssl_ptx.data.samplers import ConstantSchedule, LinearSchedule, PositiveRateSampler
from ssl_ptx.engine.distributed import DistributedContext
from ssl_ptx.engine.loaders import (
    build_fold_loaders,
    build_train_loader,
    per_rank_batch,
    positive_rate_schedule,
    sampled_train_loader,
)


class _Indexed(Dataset):
    """``n`` samples whose value is their index; the first ``n_pos`` are positive."""

    def __init__(self, n: int, n_pos: int) -> None:
        self.labels = np.r_[np.ones(n_pos), np.zeros(n - n_pos)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(index)


def test_positive_rate_schedule_is_none_constant_or_linear() -> None:
    assert positive_rate_schedule(DataConfig(positive_rate=None), epochs=10) is None

    constant = positive_rate_schedule(DataConfig(positive_rate=0.8), epochs=10)
    assert isinstance(constant, ConstantSchedule)
    assert [constant(e) for e in (0, 5, 10)] == [0.8, 0.8, 0.8]

    over_run = positive_rate_schedule(
        DataConfig(positive_rate=0.8, positive_rate_end=0.4), epochs=10
    )
    assert isinstance(over_run, LinearSchedule)
    assert over_run(0) == pytest.approx(0.8)
    assert over_run(5) == pytest.approx(0.6)  # halfway through the run's 10 epochs
    assert over_run(10) == pytest.approx(0.4)

    own_length = positive_rate_schedule(
        DataConfig(positive_rate=0.8, positive_rate_end=0.4, positive_rate_epochs=4), epochs=10
    )
    assert own_length(2) == pytest.approx(0.6)
    assert own_length(4) == own_length(9) == pytest.approx(0.4)  # flat after its 4 epochs


def test_per_rank_batch_splits_the_global_batch_or_names_the_key() -> None:
    assert per_rank_batch(16, 4) == 4
    assert per_rank_batch(6, 1) == 6
    with pytest.raises(ConfigError, match=r"unlabelled\.batch_size=6 .* 4 processes"):
        per_rank_batch(6, 4, "unlabelled.batch_size")


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampled_loader_draws_the_samplers_images_in_full_per_rank_batches(
    world_size: int,
) -> None:
    dataset = _Indexed(50, 10)
    config = DataConfig(batch_size=8, num_workers=0)
    for rank in range(world_size):
        sampler = PositiveRateSampler(
            dataset.labels, 0.5, seed=3, num_replicas=world_size, rank=rank, drop_last=True
        )
        loader = sampled_train_loader(
            dataset, sampler, config, world_size=world_size, seed=3, pin_memory=False
        )
        batches = [batch.tolist() for batch in loader]
        per_rank = 8 // world_size
        assert all(len(batch) == per_rank for batch in batches)
        drawn = list(sampler)
        assert len(batches) == len(drawn) // per_rank  # the incomplete last batch is left out
        assert sum(batches, []) == drawn[: len(batches) * per_rank]


def test_siim_training_loader_follows_the_configs_linear_positive_rate() -> None:
    """build_train_loader takes its schedule from positive_rate_schedule: the share of
    positives per epoch moves from positive_rate to positive_rate_end over the run."""
    dataset = _Indexed(400, 40)
    config = DataConfig(batch_size=4, num_workers=0, positive_rate=0.5, positive_rate_end=0.25)
    loader = build_train_loader(dataset, config, epochs=4, seed=0)
    shares = []
    for epoch in (0, 4):
        loader.sampler.set_epoch(epoch)
        drawn = np.array(list(loader.sampler))
        shares.append(dataset.labels[drawn].mean())
    assert shares[0] == pytest.approx(0.5, abs=0.03)
    assert shares[1] == pytest.approx(0.25, abs=0.03)


def test_fold_loaders_shard_by_the_process_context() -> None:
    """Each process's loaders take its rank's share: per-process batch = global / world size,
    the validation shards are disjoint and cover the fold; memory is pinned on CUDA only."""
    cuda = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cuda:0"))
    assert cuda.loader_options() == {"world_size": 1, "rank": 0, "pin_memory": True}
    config = TrainConfig()
    config.data.batch_size, config.data.num_workers, config.data.positive_rate = 8, 0, None
    train_set, val_set = _Indexed(40, 10), _Indexed(11, 3)
    seen_val, seen_train = [], []
    for rank in range(2):
        context = DistributedContext(rank, rank, 2, torch.device("cpu"))
        assert context.loader_options() == {"world_size": 2, "rank": rank, "pin_memory": False}
        train_loader, val_loader = build_fold_loaders(train_set, val_set, config, context)
        assert train_loader.batch_size == 4 and not train_loader.pin_memory
        seen_train.append({i for batch in train_loader for i in batch.tolist()})
        seen_val.append([i for batch in val_loader for i in batch.tolist()])
    assert not seen_train[0] & seen_train[1]
    assert sorted(seen_val[0] + seen_val[1]) == list(range(11))
