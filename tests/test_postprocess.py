"""Post-processing rules on hand-made maps, their JSON round trip, and the grid tuner."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ssl_ptx.metrics import mean_dice
from ssl_ptx.postprocess import (
    PresenceGate,
    RemoveSmallComponents,
    Threshold,
    TripletThreshold,
    load_rule,
    quantise,
    rule_from_dict,
    save_rule,
    threshold_code,
    tune_rule,
)

SIDE = 10  # hand-made maps are 10×10 = 100 pixels, so an area fraction of 0.05 is 5 pixels


def _map(background: float = 0.05) -> np.ndarray:
    return np.full((SIDE, SIDE), background, np.float32)


def test_threshold_is_strict_and_keeps_shape() -> None:
    prob = _map()
    prob[0, :3] = [0.5, 0.51, 0.9]
    mask = Threshold(0.5)(prob)
    assert mask.dtype == bool and mask.shape == (SIDE, SIDE)
    assert mask.sum() == 2 and not mask[0, 0] and mask[0, 1] and mask[0, 2]
    batch = Threshold(0.5)(torch.from_numpy(np.stack([prob, _map()])))
    assert batch.shape == (2, SIDE, SIDE) and batch.sum(axis=(1, 2)).tolist() == [2, 0]


def test_triplet_needs_min_area_above_top_then_uses_bottom() -> None:
    prob = _map()
    prob[0, :5] = 0.9  # 5 sure pixels
    prob[1, :10] = 0.4  # a halo the bottom threshold adds
    rule = TripletThreshold(top=0.8, min_area=0.05, bottom=0.3)  # 5 px
    mask = rule(prob)
    assert mask.sum() == 15 and mask[1].all()
    assert not TripletThreshold(top=0.8, min_area=0.06, bottom=0.3)(prob).any()  # 6 px needed
    assert not TripletThreshold(top=0.95, min_area=0.01, bottom=0.3)(prob).any()
    # the area is a fraction: the same rule on a 4× larger copy needs 4× the pixels
    big = cv2.resize(prob, (2 * SIDE, 2 * SIDE), interpolation=cv2.INTER_NEAREST)
    assert rule(big).sum() == 60
    big[0:2, 0:10] = 0.05
    big[0, :19] = 0.9  # 19 sure pixels of the 20 needed
    assert not rule(big).any()


def test_presence_gate_needs_and_uses_presence() -> None:
    prob = np.stack([_map(0.9), _map(0.9)])
    rule = PresenceGate(Threshold(0.5), threshold=0.4)
    masks = rule(prob, presence=[0.39, 0.4])
    assert not masks[0].any() and masks[1].all()
    with pytest.raises(ValueError, match="presence"):
        rule(prob)
    with pytest.raises(ValueError, match="presence of shape"):
        rule(prob, presence=[0.5])


def test_remove_small_components_is_eight_connected() -> None:
    prob = _map()
    prob[0, 0] = prob[1, 1] = prob[2, 2] = 0.9  # one diagonal component of 3 pixels
    prob[6:9, 6:9] = 0.9  # 9 pixels
    prob[0, 9] = 0.9  # 1 pixel
    rule = RemoveSmallComponents(Threshold(0.5), min_area=0.03)  # 3 px
    mask = rule(prob)
    assert mask.sum() == 12 and mask[2, 2] and not mask[0, 9]
    assert RemoveSmallComponents(Threshold(0.5), min_area=0.04)(prob).sum() == 9


def test_uint8_codes_give_the_same_masks_as_their_probabilities() -> None:
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for threshold in (0.0, 0.2, 0.3, 0.5, 0.7, 0.99):
        assert np.array_equal(Threshold(threshold)(codes), Threshold(threshold)(codes / 255.0))
    assert threshold_code(0.2) == 51  # p = 51/255 = 0.2 is not above 0.2
    assert np.abs(quantise(codes / 255.0).astype(int) - codes).max() == 0


def test_rules_round_trip_through_dict_and_json(tmp_path: Path) -> None:
    rule = RemoveSmallComponents(
        PresenceGate(TripletThreshold(0.8, 800 / 768**2, 0.4), threshold=0.4), min_area=1e-4
    )
    assert rule_from_dict(rule.to_dict()) == rule
    assert load_rule(save_rule(rule, tmp_path / "rule.json")) == rule
    assert rule.parameters()["rule.rule.top"] == 0.8
    changed = rule.with_parameters({"rule.rule.top": 0.6, "min_area": 0.0})
    assert changed.rule.rule.top == 0.6 and changed.min_area == 0.0 and rule.rule.rule.top == 0.8
    with pytest.raises(KeyError, match="rule.rule.top"):
        rule.with_parameters({"top": 0.5})
    with pytest.raises(ValueError, match="unknown rule 'median'"):
        rule_from_dict({"name": "median"})
    with pytest.raises(ValueError, match="missing"):
        rule_from_dict({"name": "triplet", "top": 0.5})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_rule(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="fraction"):
        TripletThreshold(0.7, 800, 0.3)


def _disk(radius: float, center: tuple[int, int] = (16, 16), side: int = 32) -> np.ndarray:
    rows, cols = np.ogrid[:side, :side]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2


def _constructed_case() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Maps whose best triplet in the grid below is unique: top 0.9, min area 15 px, bottom 0.3.

    Positive images: the lesion's core (29 px) at 0.95, its rim at 0.35. Negative images: a
    10-pixel spot at 0.95 (only min area 15 px removes it) or a 20-pixel spot at 0.6 (only
    top 0.9 removes it).
    """
    maps, truths = [], []
    for shift in range(6):
        truth = _disk(5, (10 + shift, 12))
        prob = np.full((32, 32), 0.05, np.float32)
        prob[truth] = 0.35
        prob[_disk(3, (10 + shift, 12))] = 0.95
        maps.append(prob)
        truths.append(truth)
    for shift in range(6):
        prob = np.full((32, 32), 0.05, np.float32)
        if shift % 2:
            prob[5 + shift, 5:15] = 0.95
        else:
            prob[20:24, 5 + shift : 10 + shift] = 0.6
        maps.append(prob)
        truths.append(np.zeros((32, 32), bool))
    return maps, truths


def test_tuner_finds_the_known_optimum() -> None:
    maps, truths = _constructed_case()
    grid = {
        "top": [0.5, 0.9, 0.97],
        "min_area": [0.0, 15 / 1024, 40 / 1024],
        "bottom": [0.3, 0.4, 0.5],
    }
    result = tune_rule(TripletThreshold(), grid, maps, truths, progress=False)
    assert result.rule == TripletThreshold(0.9, 15 / 1024, 0.3)
    assert result.score == 1.0 and result.n_images == 12
    assert (result.table["dice"].iloc[1:] < 1.0).all()  # the optimum is the only perfect point
    assert len(result.table) == 27


def test_tuner_scores_equal_applying_each_rule() -> None:
    """Every grid point's Dice equals the rule applied to the quantised maps (a wrapper chain
    with presence gate and component removal included)."""
    rng = np.random.default_rng(0)
    maps, truths = [], []
    for index in range(24):
        noise = cv2.GaussianBlur(rng.random((48, 48)).astype(np.float32), (0, 0), 2.5)
        prob = (noise - noise.min()) / (noise.max() - noise.min())
        maps.append(prob)
        truths.append(prob > 0.8 if index % 3 else np.zeros_like(prob, bool))
    presence = rng.random(len(maps))
    rule = RemoveSmallComponents(PresenceGate(TripletThreshold()))
    grid = {
        "rule.rule.top": [0.6, 0.8],
        "rule.rule.min_area": [0.0, 0.01],
        "rule.rule.bottom": [0.3, 0.6],
        "rule.threshold": [0.0, 0.5],
        "min_area": [0.0, 0.005, 0.02],
    }
    result = tune_rule(rule, grid, maps, truths, presence, progress=False)
    codes, target = np.stack([quantise(m) for m in maps]), np.stack(truths)
    for row in result.table.itertuples(index=False):
        values = dict(zip(grid, row[: len(grid)], strict=True))
        candidate = rule.with_parameters(values)
        assert row.dice == pytest.approx(mean_dice(candidate(codes, presence), target), abs=1e-12)
    assert result.score == result.table["dice"].max()


def test_tuner_refuses_bad_inputs() -> None:
    maps, truths = _constructed_case()
    with pytest.raises(KeyError, match="no parameter"):
        tune_rule(Threshold(), {"top": [0.5]}, maps, truths, progress=False)
    with pytest.raises(ValueError, match="differ in length"):
        tune_rule(Threshold(), {"threshold": [0.5]}, maps, truths[:-1], progress=False)
    with pytest.raises(ValueError, match="image 0"):
        tune_rule(Threshold(), {"threshold": [0.5]}, maps, [t[:16] for t in truths], progress=False)
    with pytest.raises(ValueError, match="presence="):
        tune_rule(PresenceGate(Threshold()), {"threshold": [0.5]}, maps, truths, progress=False)
    with pytest.raises(ValueError, match="no values"):
        tune_rule(Threshold(), {"threshold": []}, maps, truths, progress=False)
