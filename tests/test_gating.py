"""Gating in the Predictor on hand-made maps: classifier, max-pixel and presence scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ssl_ptx.inference import Predictor, ProbabilityStore
from ssl_ptx.postprocess import GATE_GRID, PresenceGate, Threshold, tune_rule

# four flat 8×8 images: image k is k/10 everywhere, so the models can tell which one they see
# (also after resizing)
N, SIDE = 4, 8


def indexed_images() -> torch.Tensor:
    return (torch.arange(N) / 10.0).reshape(N, 1, 1, 1).expand(N, 1, SIDE, SIDE).clone()


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p / (1 - p))


class HandMade(nn.Module):
    """Image k gets the map ``maps[k]`` (probabilities) and presence ``presence[k]``."""

    def __init__(self, maps: torch.Tensor, presence: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("maps", maps)
        self.presence = presence

    def forward(self, images: torch.Tensor):
        index = (images[:, 0, 0, 0] * 10).round().long()
        logits = _logit(self.maps[index])[:, None]
        if self.presence is None:
            return logits
        return logits, _logit(self.presence[index])[:, None]


class HandMadeClassifier(nn.Module):
    """Image k gets the probability ``scores[k]`` (logits ``[B, 1]``)."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scores", scores)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        index = (images[:, 0, 0, 0] * 10).round().long()
        return _logit(self.scores[index])[:, None]


def peaked_maps(peaks: list[float]) -> torch.Tensor:
    """Maps at 0.1 with one pixel at ``peaks[k]`` (the max-pixel score of image k)."""
    maps = torch.full((N, SIDE, SIDE), 0.1)
    maps[:, 3, 4] = torch.tensor(peaks)
    return maps


def predictor(**kwargs) -> Predictor:
    return Predictor(kwargs.pop("models"), tta=(), device="cpu", **kwargs)


def test_classifier_gate_empties_images_below_the_threshold() -> None:
    maps = peaked_maps([0.9, 0.9, 0.9, 0.9])
    classifier = HandMadeClassifier(torch.tensor([0.2, 0.49, 0.5, 0.8]))
    common = {"models": HandMade(maps), "classifiers": [classifier], "gate": "classifier"}
    gated = predictor(**common, gate_threshold=0.5).predict_batch(indexed_images())
    torch.testing.assert_close(gated.presence, torch.tensor([0.2, 0.49, 0.5, 0.8]))
    assert torch.equal(gated.masks[:2], torch.zeros(2, SIDE, SIDE))  # below: emptied
    torch.testing.assert_close(gated.masks[2:], maps[2:])  # at or above: untouched
    scored = predictor(**common).predict_batch(indexed_images())  # no threshold: score only
    torch.testing.assert_close(scored.masks, maps)
    torch.testing.assert_close(scored.presence, gated.presence)


def test_classifiers_are_averaged_and_see_the_whole_image_at_their_size() -> None:
    seen = []

    class Recorder(HandMadeClassifier):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(images.shape[-2:]))
            return torch.zeros(len(images), 1)  # probability 0.5

    judges = [HandMadeClassifier(torch.tensor([0.1, 0.3, 0.9, 0.7])), Recorder(torch.zeros(N))]
    result = Predictor(
        HandMade(peaked_maps([0.9] * N)),
        tta=(),
        device="cpu",
        classifiers=judges,
        classifier_size=16,
        gate="classifier",
    ).predict_batch(indexed_images())
    torch.testing.assert_close(result.presence, torch.tensor([0.3, 0.4, 0.7, 0.6]))
    assert seen == [(16, 16)]


def test_max_pixel_gate_averages_each_members_maximum() -> None:
    first = HandMade(peaked_maps([0.3, 0.6, 0.9, 0.95]))
    second = HandMade(peaked_maps([0.5, 0.2, 0.9, 0.15]))
    result = predictor(
        models=[first, second], weights=[3, 1], gate="max_pixel", gate_threshold=0.55
    ).predict_batch(indexed_images())
    # weighted mean of the maxima (not the maximum of the mean map)
    expected = torch.tensor([0.35, 0.5, 0.9, 0.75])
    torch.testing.assert_close(result.presence, expected)
    kept = expected >= 0.55
    assert torch.equal(result.masks[~kept], torch.zeros(int((~kept).sum()), SIDE, SIDE))
    mean_map = 0.75 * first.maps + 0.25 * second.maps
    torch.testing.assert_close(result.masks[kept], mean_map[kept])


def test_presence_gate_uses_the_head_and_needs_one() -> None:
    model = HandMade(peaked_maps([0.9] * N), presence=torch.tensor([0.1, 0.6, 0.3, 0.9]))
    result = predictor(models=model, gate="presence", gate_threshold=0.5).predict_batch(
        indexed_images()
    )
    assert [bool(m.any()) for m in result.masks > 0] == [False, True, False, True]
    headless = predictor(models=HandMade(peaked_maps([0.9] * N)), gate="presence")
    with pytest.raises(ValueError, match="presence head"):
        headless.predict_batch(indexed_images())


def test_gate_arguments_are_checked() -> None:
    model = HandMade(peaked_maps([0.9] * N))
    with pytest.raises(ValueError, match="unknown gate"):
        predictor(models=model, gate="area")
    with pytest.raises(ValueError, match="needs classifiers"):
        predictor(models=model, gate="classifier")
    with pytest.raises(ValueError, match="needs a gate"):
        predictor(models=model, gate_threshold=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        predictor(models=model, gate="max_pixel", gate_threshold=1.5)


def test_gate_scores_go_to_the_store_and_the_tuner_finds_the_threshold() -> None:
    # images 0 and 1 are empty (the truth) but have a faint spot; 2 and 3 have the lesion
    maps = peaked_maps([0.62, 0.68, 0.81, 0.93])
    truths = np.zeros((N, SIDE, SIDE), bool)
    truths[2:, 3, 4] = True
    result = predictor(models=HandMade(maps), gate="max_pixel").predict_batch(indexed_images())
    store = ProbabilityStore()
    for k in range(N):
        store.add(f"img{k}", result.masks[k].numpy(), float(result.presence[k]))
    ids = store.image_ids
    tuned = tune_rule(
        PresenceGate(Threshold(0.5)),
        {"threshold": GATE_GRID},
        (store.stored(i) for i in ids),
        list(truths),
        store.presences(ids),
        progress=False,
    )
    assert 0.68 < tuned.rule.threshold <= 0.81  # the first grid value separating them: 0.7
    assert tuned.rule.threshold == pytest.approx(0.7)
    assert tuned.score == 1.0
    masks = np.stack([tuned.rule(store.stored(i), store.presence(i)) for i in ids])
    np.testing.assert_array_equal(masks, truths)
