"""Ratio mixing of SIIM and pseudo labels: composition per epoch, fresh draws, DDP shards."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ssl_ptx.data.mixing import RatioMixSampler, pseudo_counts

# labelled: 10 positives, 30 negatives (1:3); pseudo: 20 positives, 100 negatives
LABELLED = np.r_[np.ones(10), np.zeros(30), [np.nan, -1.0]]
PSEUDO = np.r_[np.ones(20), np.zeros(100)]
N_LABELLED = LABELLED.size


def test_pseudo_counts_follow_ratio_and_labelled_proportion() -> None:
    assert pseudo_counts(10, 30, 0.5, 20, 100) == (5, 15)
    assert pseudo_counts(10, 30, 1.0, 20, 100) == (10, 30)
    assert pseudo_counts(10, 30, 3.0, 20, 100) == (20, 60)  # capped by available positives
    assert pseudo_counts(10, 30, 1.0, 20, 12) == (10, 12)  # capped by available negatives
    with pytest.raises(ValueError, match="ratio"):
        pseudo_counts(10, 30, -1.0, 20, 100)


def test_epoch_holds_every_labelled_image_plus_the_ratio() -> None:
    sampler = RatioMixSampler(LABELLED, PSEUDO, 0.5, seed=3)
    indices = list(sampler)
    counts = Counter(indices)
    labelled = [i for i in indices if i < N_LABELLED]
    pseudo = np.array([i - N_LABELLED for i in indices if i >= N_LABELLED])
    assert sorted(labelled) == list(range(40))  # every 1/0 labelled image once, no NaN / -1
    assert max(counts.values()) == 1
    assert (PSEUDO[pseudo] == 1).sum() == 5 and (PSEUDO[pseudo] == 0).sum() == 15
    assert len(sampler) == len(indices) == 60


def test_pseudo_draw_is_new_each_epoch_and_seeded() -> None:
    sampler = RatioMixSampler(LABELLED, PSEUDO, 0.5, seed=3)
    epoch0 = sorted(i for i in sampler if i >= N_LABELLED)
    sampler.set_epoch(1)
    epoch1 = sorted(i for i in sampler if i >= N_LABELLED)
    assert epoch0 != epoch1
    again = RatioMixSampler(LABELLED, PSEUDO, 0.5, seed=3)
    assert sorted(i for i in again if i >= N_LABELLED) == epoch0
    other = RatioMixSampler(LABELLED, PSEUDO, 0.5, seed=4)
    assert sorted(i for i in other if i >= N_LABELLED) != epoch0


def test_positive_rate_balances_the_pooled_epoch() -> None:
    sampler = RatioMixSampler(LABELLED, PSEUDO, 0.5, positive_rate=0.5, seed=0)
    indices = np.array(list(sampler))
    labels = np.r_[LABELLED, PSEUDO][indices]
    positives = indices[labels == 1]
    assert positives.size == 15 and np.unique(positives).size == 15  # every pooled positive once
    assert (labels == 0).sum() == 15  # negatives drawn to reach 50 %
    pooled_negatives = set(range(10, 40))
    sampler_pool = set(sampler.pool(0)[1].tolist())
    assert pooled_negatives <= sampler_pool
    assert set(indices[labels == 0].tolist()) <= sampler_pool
    assert len(sampler) == 30


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_shards_are_disjoint_and_cover_the_epoch(world_size: int) -> None:
    shards = []
    for rank in range(world_size):
        sampler = RatioMixSampler(LABELLED, PSEUDO, 0.5, seed=7, num_replicas=world_size, rank=rank)
        sampler.set_epoch(2)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler)
    whole = RatioMixSampler(LABELLED, PSEUDO, 0.5, seed=7)
    epoch = whole.epoch_indices(2)
    padded = np.resize(epoch, -(-epoch.size // world_size) * world_size)
    interleaved = np.stack([np.array(s) for s in shards], axis=1).ravel()
    np.testing.assert_array_equal(interleaved, padded)
    assert {len(s) for s in shards} == {-(-epoch.size // world_size)}


def test_state_dict_restores_epoch_and_seed() -> None:
    sampler = RatioMixSampler(LABELLED, PSEUDO, 0.5, seed=11)
    sampler.set_epoch(5)
    restored = RatioMixSampler(LABELLED, PSEUDO, 0.5, seed=0)
    restored.load_state_dict(sampler.state_dict())
    assert list(restored) == list(sampler)


def test_refuses_a_labelled_set_without_positives() -> None:
    with pytest.raises(ValueError, match="no positive"):
        RatioMixSampler(np.zeros(5), PSEUDO, 0.5)
