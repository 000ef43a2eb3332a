"""Lung crop: box rule, fallbacks, crop → paste round trip and the model wrapper."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ssl_ptx.lung_crop import (
    FALLBACK_REASONS,
    Box,
    LungCropper,
    box_from_mask,
    crop,
    crop_mask,
    paste,
    paste_average,
)


def _rectangles(shape, *boxes):
    mask = np.zeros(shape, np.uint8)
    for y0, x0, y1, x1 in boxes:
        mask[y0:y1, x0:x1] = 1
    return mask


def _ellipse(shape, box: Box):
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    cy, cx = (box.y0 + box.y1 - 1) / 2, (box.x0 + box.x1 - 1) / 2
    ry, rx = box.height * 0.4, box.width * 0.4
    return (((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1).astype(np.uint8)


def _iou(a, b):
    a, b = a != 0, b != 0
    return (a & b).sum() / (a | b).sum()


# Two "lungs" at 1024²: union rows 200..799, columns 150..899.
LUNGS_1024 = ((200, 150, 800, 480), (220, 560, 780, 900))


def test_box_properties_and_json_round_trip():
    box = Box(10, 20, 40, 100)
    assert (box.height, box.width, box.area) == (30, 80, 2400)
    assert box.as_tuple() == (10, 20, 40, 100)
    assert Box.from_json(json.loads(json.dumps(box.to_json()))) == box
    assert Box(np.int64(1), 2, 3, 4).y0.__class__ is int
    assert box.fits((40, 100)) and not box.fits((39, 100))
    with pytest.raises(ValueError, match="y0 < y1"):
        Box(5, 0, 5, 10)
    with pytest.raises(ValueError, match="lacks keys"):
        Box.from_json({"y0": 0, "x0": 0, "y1": 3})
    with pytest.raises(TypeError, match="integer"):
        Box(0.5, 0, 3, 3)


def test_box_is_union_of_lungs_plus_third_place_margin():
    box, reason = box_from_mask(_rectangles((1024, 1024), *LUNGS_1024))
    assert reason == "lungs"
    assert box == Box(200 - 40, 150 - 40, 800 + 40, 900 + 40)


def test_margin_is_clipped_to_the_image():
    box, reason = box_from_mask(_rectangles((1024, 1024), (10, 0, 1000, 1024)))
    assert reason == "lungs" and box == Box(0, 0, 1024, 1024)


def test_blank_mask_falls_back_to_full_image():
    assert box_from_mask(np.zeros((300, 200), np.uint8)) == (Box(0, 0, 300, 200), "no_lung")


def test_small_but_kept_blob_falls_back_as_box_too_small():
    # 60×60 = 3600 px ≥ 2000 px, but 140×140 with margin < 300×300.
    mask = _rectangles((1024, 1024), (500, 500, 560, 560))
    assert box_from_mask(mask) == (Box.full((1024, 1024)), "box_too_small")
    assert box_from_mask(mask, min_box=0.1)[1] == "lungs"


def test_small_components_are_dropped():
    speck = (950, 20, 990, 60)  # 1600 px < 2000 px
    box, reason = box_from_mask(_rectangles((1024, 1024), *LUNGS_1024, speck))
    assert reason == "lungs" and box == Box(160, 110, 840, 940)
    assert box_from_mask(_rectangles((1024, 1024), speck))[1] == "no_lung"
    assert box_from_mask(_rectangles((1024, 1024), speck), min_component_area=1e-3)[1] != "no_lung"


def test_components_are_eight_connected():
    # Two 1200 px blocks touching only at a corner form one 2400 px component (kept).
    mask = _rectangles((1024, 1024), (100, 100, 130, 140), (130, 140, 160, 180))
    box, reason = box_from_mask(mask, min_box=0.0)
    assert reason == "lungs" and box == Box(60, 60, 200, 220)


def test_margin_and_areas_scale_with_image_size():
    full = _rectangles((1024, 1024), *LUNGS_1024)
    half = full[::2, ::2]
    box_full, _ = box_from_mask(full)
    box_half, _ = box_from_mask(half)
    assert box_half == Box(*(v // 2 for v in box_full.as_tuple()))
    # Per axis on a non-square image: 40/1024 of 2048 rows = 80, of 512 columns = 20.
    tall = _rectangles((2048, 512), (400, 75, 1600, 450))
    assert box_from_mask(tall)[0] == Box(320, 55, 1680, 470)
    # The speck (1600 px at 1024²) is 6400 px at 2048² and still dropped.
    big = np.kron(_rectangles((1024, 1024), *LUNGS_1024, (950, 20, 990, 60)), np.ones((2, 2)))
    assert box_from_mask(big)[0] == Box(*(2 * v for v in box_full.as_tuple()))


def test_keep_aspect_grows_the_shorter_side_inside_the_image():
    box, reason = box_from_mask(_rectangles((1024, 1024), *LUNGS_1024), keep_aspect=True)
    assert reason == "lungs"
    assert box.height == box.width == 830
    assert (box.x0, box.x1) == (110, 940)  # the longer side is unchanged
    # Near the top edge the grown side shifts down to stay inside.
    box, _ = box_from_mask(_rectangles((1024, 1024), (0, 100, 200, 900)), keep_aspect=True)
    assert box.height == box.width and box.y0 == 0 and box.y1 <= 1024
    # A wide image cannot hold a square as tall as the box is wide: the full height is used.
    box, _ = box_from_mask(_rectangles((300, 1000), (100, 100, 200, 900)), keep_aspect=True)
    assert (box.y0, box.y1) == (0, 300)


def test_bad_inputs_raise_with_a_clear_message():
    with pytest.raises(ValueError, match="H×W"):
        box_from_mask(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="margin"):
        box_from_mask(np.zeros((4, 4)), margin=40)
    with pytest.raises(ValueError, match="does not fit"):
        crop(np.zeros((10, 10), np.uint8), Box(0, 0, 11, 5), 4)


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(8, 160),
    width=st.integers(8, 160),
    data=st.data(),
    keep_aspect=st.booleans(),
    margin=st.floats(0, 0.5),
    min_box=st.floats(0, 1),
    min_component_area=st.floats(0, 0.05),
)
def test_boxes_always_lie_inside_the_image(
    height, width, data, keep_aspect, margin, min_box, min_component_area
):
    seed = data.draw(st.integers(0, 2**32 - 1))
    mask = np.random.default_rng(seed).random((height, width)) < data.draw(st.floats(0, 0.2))
    box, reason = box_from_mask(
        mask,
        min_component_area=min_component_area,
        margin=margin,
        min_box=min_box,
        keep_aspect=keep_aspect,
    )
    assert box.fits((height, width)) and box.area > 0
    if reason in FALLBACK_REASONS:
        assert box == Box.full((height, width))
    else:
        assert reason == "lungs"
        assert box.area >= (min_box * height) * (min_box * width)
        if keep_aspect:
            assert box.height == box.width or height < box.width or width < box.height


@pytest.mark.parametrize(
    "box, size",
    [
        (Box(100, 150, 400, 450), 256),  # square
        (Box(20, 200, 500, 330), 256),  # tall and narrow, squashed 3.7:1
        (Box(300, 10, 420, 500), (96, 192)),  # wide, to a non-square size
        (Box(0, 0, 512, 512), 192),  # full image, shrunk
        (Box(200, 200, 260, 300), 256),  # small box, enlarged
    ],
)
def test_crop_then_paste_reproduces_the_mask(box, size):
    shape = (512, 512)
    mask = _ellipse(shape, box)
    cropped = crop_mask(mask, box, size)
    assert cropped.dtype == np.uint8 and cropped.shape == (
        (size, size) if isinstance(size, int) else size
    )
    restored = paste(cropped.astype(np.float32), box, shape) > 0.5
    assert _iou(restored, mask) > 0.95
    assert not restored[~np.pad(np.ones((box.height, box.width), bool), _outside(box, shape))].any()


def _outside(box, shape):
    return ((box.y0, shape[0] - box.y1), (box.x0, shape[1] - box.x1))


def test_crop_then_paste_with_keep_aspect_box():
    shape = (600, 400)
    lungs = _rectangles(shape, (100, 60, 500, 180), (110, 220, 480, 340))
    box, reason = box_from_mask(lungs, keep_aspect=True)
    assert reason == "lungs" and box.width == min(box.height, shape[1])
    lesion = _ellipse(shape, Box(150, 80, 300, 170))
    restored = paste(crop_mask(lesion, box, 256).astype(np.float32), box, shape) > 0.5
    assert _iou(restored, lesion) > 0.95


def test_crop_keeps_dtype_and_resamples_the_region():
    image = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    box = Box(8, 16, 40, 48)
    out = crop(image, box, 32)
    np.testing.assert_array_equal(out, image[8:40, 16:48])
    out[0, 0] = -1.0
    assert image[8, 16] != -1.0  # a copy, even when no resize is needed
    uint8 = crop(np.full((50, 70), 7, np.uint8), Box(0, 0, 25, 70), (10, 20))
    assert uint8.dtype == np.uint8 and uint8.shape == (10, 20) and (uint8 == 7).all()


def test_paste_fills_outside_the_box():
    out = paste(np.full((16, 16), 0.8, np.float32), Box(10, 20, 30, 60), (50, 80), fill=0.25)
    assert out.dtype == np.float32 and out.shape == (50, 80)
    np.testing.assert_allclose(out[10:30, 20:60], 0.8)
    assert (out[:10] == 0.25).all() and (out[:, 60:] == 0.25).all()


def test_paste_average_divides_by_the_count_map():
    boxes = [Box(0, 0, 20, 30), Box(10, 10, 40, 40)]
    predictions = [np.ones((8, 8), np.float32), np.zeros((16, 16), np.float32)]
    average, count = paste_average(predictions, boxes, (50, 50))
    assert (
        count.dtype == np.int32 and count[15, 15] == 2 and count[5, 5] == 1 and count[45, 45] == 0
    )
    assert average[15, 15] == pytest.approx(0.5)
    assert average[5, 5] == pytest.approx(1.0) and average[30, 30] == 0 and average[45, 45] == 0
    with pytest.raises(ValueError, match="2 predictions but 1 boxes"):
        paste_average(predictions, boxes[:1], (50, 50))


class _FixedLungModel(nn.Module):
    """Returns ±10 logits of a fixed S×S lung mask whatever the input; records the inputs."""

    def __init__(self, lung_mask: np.ndarray):
        super().__init__()
        self.register_buffer("logits", torch.from_numpy(lung_mask.astype(np.float32) * 20 - 10))
        self.inputs: list[torch.Tensor] = []
        self.modes: list[bool] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.inputs.append(images)
        self.modes.append(self.training)
        return self.logits.expand(len(images), 1, *self.logits.shape)


def test_lung_cropper_finds_the_box_of_the_model_mask(caplog):
    lung_256 = _rectangles((256, 256), (50, 40, 200, 120), (55, 140, 195, 220))
    model = _FixedLungModel(lung_256)
    model.train()
    cropper = LungCropper(model, input_size=256, batch_size=2)
    images = [np.full((512, 384), 100, np.uint8), np.zeros((1024, 1024), np.uint8)] * 2
    probabilities = cropper.predict_lung(images)
    assert [p.shape for p in probabilities] == [i.shape for i in images]
    assert all(p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1 for p in probabilities)
    with caplog.at_level(logging.WARNING):
        results = cropper.boxes(images)
    assert not caplog.records
    assert [reason for _, reason in results] == ["lungs"] * 4
    # Lungs at 256² rows 50..199, cols 40..219 → at 512×384 rows 100..399, cols 60..329
    # (±1 px of resize), margin 20 rows / 15 columns.
    box = results[0][0]
    expected = (80, 45, 420, 345)
    assert np.abs(np.subtract(box.as_tuple(), expected)).max() <= 1
    box = results[1][0]
    expected = (200 - 40, 160 - 40, 800 + 40, 880 + 40)
    assert np.abs(np.subtract(box.as_tuple(), expected)).max() <= 2
    assert model.training and not any(model.modes)  # eval while predicting, mode restored
    assert len(model.inputs) == 4  # two calls, batches of 2
    first = model.inputs[0]
    assert first.shape == (2, 1, 256, 256) and first.dtype == torch.float32
    assert first[0].max().item() == pytest.approx(100 / 255)


def test_lung_cropper_falls_back_and_logs_instead_of_raising(caplog):
    cropper = LungCropper(_FixedLungModel(np.zeros((64, 64))), input_size=64)
    with caplog.at_level(logging.WARNING, logger="ssl_ptx.lung_crop"):
        results = cropper.boxes([np.zeros((100, 80), np.uint8)] * 3)
    assert results == [(Box(0, 0, 100, 80), "no_lung")] * 3
    assert "3 of 3 images (no_lung: 3)" in caplog.text


def test_lung_cropper_settings_round_trip_and_validation():
    model = _FixedLungModel(np.zeros((8, 8)))
    cropper = LungCropper(model, threshold=0.4, input_size=128, margin=0.05, keep_aspect=True)
    saved = json.loads(json.dumps(cropper.settings()))
    assert LungCropper.from_settings(model, saved).settings() == cropper.settings()
    with pytest.raises(ValueError, match="image 1: expected a uint8"):
        cropper.predict_lung([np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.float32)])
    with pytest.raises(ValueError, match="min_box"):
        LungCropper(model, min_box=2.0)


@settings(max_examples=80, deadline=None)
@given(
    height=st.integers(1, 5000),
    width=st.integers(1, 5000),
    data=st.data(),
)
def test_box_fractions_round_trip_and_survive_a_resize(height, width, data):
    y0 = data.draw(st.integers(0, height - 1))
    y1 = data.draw(st.integers(y0 + 1, height))
    x0 = data.draw(st.integers(0, width - 1))
    x1 = data.draw(st.integers(x0 + 1, width))
    box = Box(y0, x0, y1, x1)
    fractions = box.to_fractions((height, width))
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert Box.from_fractions(fractions, (height, width)) == box
    # on a resized image the box is the smallest pixel box holding the scaled one
    new_shape = (data.draw(st.integers(1, 600)), data.draw(st.integers(1, 600)))
    scaled = Box.from_fractions(fractions, new_shape)
    assert scaled.fits(new_shape)
    assert (
        scaled.y0 <= y0 * new_shape[0] / height + 1e-6
        and scaled.y1 >= y1 * new_shape[0] / height - 1e-6
    )
    assert (
        scaled.x0 <= x0 * new_shape[1] / width + 1e-6
        and scaled.x1 >= x1 * new_shape[1] / width - 1e-6
    )


def test_box_fractions_refuse_bad_values():
    with pytest.raises(ValueError, match="four values in \\[0, 1\\]"):
        Box.from_fractions((0.1, 0.2, 1.2, 0.5), (10, 10))
    with pytest.raises(ValueError, match="y0 < y1"):
        Box.from_fractions((0.5, 0.2, 0.5, 0.5), (10, 10))
    with pytest.raises(ValueError, match="does not fit"):
        Box(0, 0, 11, 5).to_fractions((10, 10))


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(st.integers(200, 700), st.integers(200, 700)),
    data=st.data(),
    size=st.sampled_from([128, (96, 160), (192, 64)]),
)
def test_crop_then_paste_round_trips_any_box_and_aspect(shape, data, size):
    height, width = shape
    box_h = data.draw(st.integers(height // 4, height))
    box_w = data.draw(st.integers(width // 4, width))
    y0 = data.draw(st.integers(0, height - box_h))
    x0 = data.draw(st.integers(0, width - box_w))
    box = Box(y0, x0, y0 + box_h, x0 + box_w)
    lesion = _ellipse(shape, box)
    restored = paste(crop_mask(lesion, box, size).astype(np.float32), box, shape) > 0.5
    assert _iou(restored, lesion) > 0.9
    assert not restored[:y0].any() and not restored[:, : box.x0].any()


class _ThreeChannelModel(nn.Module):
    """Needs 3 input channels and returns (mask logits, presence logits) like UNetCBAM."""

    def forward(self, images: torch.Tensor):
        assert images.shape[1] == 3
        return images[:, :1] * 40 - 20, images.mean((1, 2, 3))


def test_lung_cropper_feeds_the_model_channels_and_takes_mask_logits():
    cropper = LungCropper(_ThreeChannelModel(), input_size=32, in_channels=3, min_box=0.1)
    image = np.zeros((64, 64), np.uint8)
    image[10:50, 8:30] = 255  # "lung" where the image is bright
    ((box, reason),) = cropper.boxes([image])
    assert reason == "lungs"
    assert np.abs(np.subtract(box.as_tuple(), (10 - 2, 8 - 2, 50 + 2, 30 + 2))).max() <= 1
    assert cropper.settings()["in_channels"] == 3
