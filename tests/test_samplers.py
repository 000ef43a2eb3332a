from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import DataLoader

from ssl_ptx.data.samplers import (
    ConstantSchedule,
    LinearSchedule,
    PositiveRateSampler,
    StepSchedule,
)


def _labels(n_pos: int = 220, n_neg: int = 780, n_unknown: int = 50) -> np.ndarray:
    labels = np.concatenate([np.ones(n_pos), np.zeros(n_neg), np.full(n_unknown, np.nan)])
    labels[-10:] = -1.0  # CheXpert "uncertain"
    return np.random.default_rng(0).permutation(labels)


def test_schedules_follow_the_published_rules() -> None:
    linear = LinearSchedule(0.8, 0.22, 60)
    for epoch in (0, 1, 30, 59):
        assert linear(epoch) == pytest.approx(0.8 - (0.8 - 0.22) * epoch / 60)
    assert linear(60) == linear(500) == pytest.approx(0.22)
    step = StepSchedule({0: 0.8, 10: 0.6, 20: 0.4})
    assert [step(e) for e in (0, 9, 10, 19, 20, 100)] == [0.8, 0.8, 0.6, 0.6, 0.4, 0.4]
    assert ConstantSchedule(0.5)(7) == 0.5
    with pytest.raises(ValueError, match="epoch 0"):
        StepSchedule({5: 0.5})
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ConstantSchedule(0.0)


@pytest.mark.parametrize(
    "schedule",
    [ConstantSchedule(0.5), LinearSchedule(0.8, 0.22, 10), StepSchedule({0: 0.8, 3: 0.1})],
    ids=["constant", "linear", "step-below-natural-rate"],
)
def test_epoch_positive_fraction_follows_schedule(schedule) -> None:
    labels = _labels()
    sampler = PositiveRateSampler(labels, schedule, seed=3)
    positives = set(np.flatnonzero(labels == 1))
    for epoch in range(6):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        assert len(drawn) == len(sampler)
        assert positives <= set(drawn)  # every positive, each exactly once
        assert sum(labels[i] == 1 for i in drawn) == len(positives)
        assert all(labels[i] in (0.0, 1.0) for i in drawn)  # never NaN or -1
        fraction = np.mean(labels[drawn] == 1)
        assert fraction == pytest.approx(schedule(epoch), abs=2 / len(drawn))


def test_fraction_below_the_natural_rate_reuses_negatives() -> None:
    labels = _labels(n_pos=300, n_neg=100, n_unknown=0)
    sampler = PositiveRateSampler(labels, 0.2)
    drawn = np.array(list(sampler))
    assert np.mean(labels[drawn] == 1) == pytest.approx(0.2, abs=1e-3)
    assert len(drawn) == 1500  # 300 positives + 1200 negatives drawn from only 100


def test_same_seed_and_epoch_give_same_indices_others_differ() -> None:
    labels = _labels()
    a = PositiveRateSampler(labels, 0.5, seed=1)
    b = PositiveRateSampler(labels, 0.5, seed=1)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    b.set_epoch(5)
    assert list(a) != list(b)
    c = PositiveRateSampler(labels, 0.5, seed=2)
    c.set_epoch(4)
    assert list(a) != list(c)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_ddp_shards_are_disjoint_equal_and_cover_the_epoch(world: int, drop_last: bool) -> None:
    labels = _labels(n_pos=221)
    schedule = LinearSchedule(0.8, 0.3, 5)
    for epoch in (0, 3):
        shards = []
        for rank in range(world):
            sampler = PositiveRateSampler(
                labels, schedule, seed=7, num_replicas=world, rank=rank, drop_last=drop_last
            )
            sampler.set_epoch(epoch)
            shard = list(sampler)
            assert len(shard) == len(sampler)
            shards.append(shard)
        assert len({len(s) for s in shards}) == 1
        epoch_indices = sampler.epoch_indices(epoch).tolist()
        total = len(epoch_indices)
        # Interleave the shards back into global positions: rank r holds positions r, r+W, ...
        merged = [shards[pos % world][pos // world] for pos in range(world * len(shards[0]))]
        if drop_last:
            assert merged == epoch_indices[: world * (total // world)]
        else:
            assert merged[:total] == epoch_indices  # disjoint positions covering the epoch
            assert merged[total:] == epoch_indices[: len(merged) - total]  # wrapped padding
            assert len(merged) - total < world


def test_state_dict_round_trip_resumes_the_same_epoch() -> None:
    labels = _labels()
    sampler = PositiveRateSampler(labels, LinearSchedule(0.8, 0.22, 60), seed=11)
    sampler.set_epoch(17)
    expected = list(sampler)
    restored = PositiveRateSampler(labels, LinearSchedule(0.8, 0.22, 60))
    restored.load_state_dict(sampler.state_dict())
    assert restored.state_dict() == {"epoch": 17, "seed": 11}
    assert list(restored) == expected


def test_works_as_dataloader_sampler() -> None:
    labels = _labels()
    sampler = PositiveRateSampler(labels, 0.6, seed=0)
    loader = DataLoader(range(len(labels)), batch_size=32, sampler=sampler)
    seen = np.concatenate([batch.numpy() for batch in loader])
    assert seen.tolist() == list(sampler)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="no positive"):
        PositiveRateSampler(np.zeros(10), 0.5)
    with pytest.raises(ValueError, match="needs negatives"):
        len(PositiveRateSampler(np.ones(10), 0.5))
    with pytest.raises(ValueError, match="rank"):
        PositiveRateSampler(np.ones(10), 0.5, num_replicas=2, rank=2)
