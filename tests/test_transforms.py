from __future__ import annotations

from collections import Counter

import albumentations as A
import cv2
import numpy as np
import pytest

from ssl_ptx.data.transforms import TRAIN_PRESETS, build_transforms, register_preset

PRESETS = ["sneddy", "amirassov", "bestfitting", "light"]


def _sample(height: int = 150, width: int = 130) -> tuple[np.ndarray, np.ndarray]:
    """A textured grey image and a 0/1 mask with a blob in it."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (height, width), dtype=np.uint8), (5, 5), 0)
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (width // 3, height // 2), (25, 40), 15, 0, 360, 1, -1)
    return image, mask


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("train", [True, False])
def test_presets_keep_shape_dtype_and_binary_masks(name: str, train: bool) -> None:
    image, mask = _sample()
    pipeline = build_transforms(name, 64, train=train, seed=0)
    for _ in range(40):
        out = pipeline(image=image, mask=mask)
        assert out["image"].shape == (64, 64) and out["image"].dtype == np.uint8
        assert out["mask"].shape == (64, 64) and out["mask"].dtype == np.uint8
        assert set(np.unique(out["mask"])) <= {0, 1}


@pytest.mark.parametrize("name", PRESETS)
def test_validation_is_a_plain_resize(name: str) -> None:
    image, mask = _sample()
    out = build_transforms(name, 48, train=False)(image=image, mask=mask)
    np.testing.assert_array_equal(out["image"], cv2.resize(image, (48, 48)))
    np.testing.assert_array_equal(
        out["mask"], cv2.resize(mask, (48, 48), interpolation=cv2.INTER_NEAREST)
    )


def test_training_augments_and_same_seed_repeats() -> None:
    image, mask = _sample()
    first = build_transforms("sneddy", 64, train=True, seed=5)
    second = build_transforms("sneddy", 64, train=True, seed=5)
    outs = [first(image=image, mask=mask) for _ in range(10)]
    again = [second(image=image, mask=mask) for _ in range(10)]
    for a, b in zip(outs, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    assert len({o["image"].tobytes() for o in outs}) > 3


def test_masks_follow_the_image_geometry() -> None:
    """A mask equal to the thresholded image must stay (almost) equal to it after augmentation."""
    image = np.zeros((128, 128), np.uint8)
    cv2.circle(image, (40, 64), 20, 255, -1)
    mask = (image > 0).astype(np.uint8)
    pipeline = build_transforms("sneddy", 128, train=True, seed=1)
    for _ in range(30):
        out = pipeline(image=image, mask=mask)
        moved = out["image"] > 127
        disagree = np.logical_xor(moved, out["mask"] > 0).sum()
        assert disagree <= 0.1 * max(moved.sum(), 1) + 40


def test_amirassov_trains_on_crops_of_a_1_5x_resize() -> None:
    image = np.tile(np.arange(256, dtype=np.uint8), (256, 1))  # column index as intensity
    mask = np.zeros_like(image)
    preset = [t for t in TRAIN_PRESETS["amirassov"](64) if isinstance(t, A.Resize | A.RandomCrop)]
    assert [(t.height, t.width) for t in preset] == [(96, 96), (64, 64)]
    pipeline = A.Compose(preset, seed=0)
    lefts = {int(pipeline(image=image, mask=mask)["image"][0, 0]) for _ in range(20)}
    assert len(lefts) > 3  # the crop position varies


def test_aug9_applies_exactly_one_of_eight_operations_uniformly() -> None:
    image, mask = _sample(64, 64)
    pipeline = A.Compose(TRAIN_PRESETS["bestfitting"](64), save_applied_params=True, seed=0)
    counts: Counter[str] = Counter()
    n = 1600
    for _ in range(n):
        applied = [name for name, _ in pipeline(image=image, mask=mask)["applied_transforms"]]
        assert len(applied) == 2 and applied[1] == "Resize"
        counts[applied[0]] += 1
    # brightness x(1-a) and brightness + a*max are both RandomBrightnessContrast
    expected = {
        "NoOp": 1,
        "HorizontalFlip": 1,
        "Rotate": 1,
        "CropAndPad": 1,
        "CoarseDropout": 1,
        "RandomBrightnessContrast": 2,
        "GaussianBlur": 1,
    }
    assert set(counts) == set(expected)
    for name, eighths in expected.items():
        assert counts[name] / n == pytest.approx(eighths / 8, abs=0.035), counts


def test_aug9_cover_blanks_the_same_square_in_image_and_mask() -> None:
    image = np.full((100, 100), 200, np.uint8)
    mask = np.ones((100, 100), np.uint8)
    cover = next(
        t for t in TRAIN_PRESETS["bestfitting"](100)[0].transforms if isinstance(t, A.CoarseDropout)
    )
    out = A.Compose([cover], seed=0)(image=image, mask=mask)
    np.testing.assert_array_equal(out["image"] == 0, out["mask"] == 0)
    assert (out["mask"] == 0).sum() == 20 * 20


def test_random_sized_crop_zooms_in() -> None:
    image = np.tile(np.arange(100, dtype=np.uint8), (100, 1))
    mask = np.zeros_like(image)
    plain = build_transforms("light", 100, train=False)
    cropped = build_transforms("light", 100, train=True, random_sized_crop=0.5, seed=0)
    spans = []
    for _ in range(20):
        out = cropped(image=image, mask=mask)["image"]
        spans.append(int(out[50, -1]) - int(out[50, 0]))
    assert plain(image=image, mask=mask)["image"].shape == (100, 100)
    assert min(spans) < 90  # a crop of at most ~full width shows fewer columns


def test_registry_accepts_new_presets_and_rejects_unknown_names() -> None:
    @register_preset("test_flip_only")
    def flip_only(size: int) -> list[A.BasicTransform]:
        return [A.HorizontalFlip(p=1.0), A.Resize(size, size)]

    try:
        image, mask = _sample(32, 32)
        out = build_transforms("test_flip_only", 32, train=True)(image=image, mask=mask)
        np.testing.assert_array_equal(out["image"], image[:, ::-1])
        with pytest.raises(ValueError, match="already registered"):
            register_preset("test_flip_only")(flip_only)
    finally:
        del TRAIN_PRESETS["test_flip_only"]
    with pytest.raises(KeyError, match="unknown transform preset 'nope'"):
        build_transforms("nope", 32, train=True)
