"""Image reading (PNG / JPEG / DICOM → uint8 grey) and image / mask resizing."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ssl_ptx.data.images import ImageReadError, read_image, resize_image, resize_mask

RNG = np.random.default_rng(0)


def _png(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path, format="PNG")
    return path


def test_grey_png_is_read_unchanged(tmp_path):
    grey = RNG.integers(0, 256, (30, 20), dtype=np.uint8)
    image = read_image(_png(tmp_path / "g.png", grey))
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, grey)


def test_rgba_png_becomes_luma_and_ignores_alpha(tmp_path):
    rgb = RNG.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (30, 20, 1), dtype=np.uint8)
    image = read_image(_png(tmp_path / "rgba.png", np.concatenate([rgb, alpha], axis=2)))
    assert image.shape == (30, 20) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, read_image(_png(tmp_path / "rgb.png", rgb)))
    assert np.abs(image - rgb @ np.array([0.299, 0.587, 0.114])).max() <= 1.0


def test_grey_rgb_png_keeps_its_grey_levels(tmp_path):
    grey = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(read_image(_png(tmp_path / "grey_rgb.png", rgb)), grey)


def test_16bit_png_is_stretched_min_max(tmp_path):
    values = RNG.integers(1000, 5000, (25, 35)).astype(np.uint16)
    path = _png(tmp_path / "deep.png", values)
    assert Image.open(path).mode.startswith("I")
    image = read_image(path)
    expected = (values - values.min()) / (values.max() - values.min()) * 255
    assert image.dtype == np.uint8
    assert np.abs(image - expected).max() <= 0.5
    assert (image.min(), image.max()) == (0, 255)


def test_constant_16bit_png_is_black(tmp_path):
    image = read_image(_png(tmp_path / "flat.png", np.full((8, 8), 4000, np.uint16)))
    np.testing.assert_array_equal(image, np.zeros((8, 8), np.uint8))


def test_jpeg_is_read(tmp_path):
    yy, xx = np.mgrid[0:32, 0:32]
    smooth = (4 * yy + 3 * xx).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "x.jpg", quality=95)
    assert np.abs(read_image(tmp_path / "x.jpg").astype(int) - smooth).mean() < 2


def test_zero_byte_file_names_the_path(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(ImageReadError, match="empty") as info:
        read_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_names_the_path(tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    Image.fromarray(RNG.integers(0, 256, (64, 64), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_not_an_image_and_broken_dicom_raise_image_read_error(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ImageReadError, match="notes.png"):
        read_image(text)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x01" * 300)
    with pytest.raises(ImageReadError, match="broken.dcm"):
        read_image(broken)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "absent.png")


def test_resize_image_shrinks_by_area_average():
    blocks = np.kron(RNG.integers(0, 256, (4, 5), dtype=np.uint8), np.ones((2, 2), np.uint8))
    rough = blocks + RNG.integers(0, 2, blocks.shape, dtype=np.uint8)  # noise within blocks
    out = resize_image(rough, (4, 5))
    means = rough.reshape(4, 2, 5, 2).mean(axis=(1, 3))
    assert out.dtype == np.uint8
    assert np.abs(out - means).max() <= 0.5


def test_resize_image_sizes_and_enlarging():
    image = RNG.integers(0, 256, (10, 20), dtype=np.uint8)
    assert resize_image(image, 8).shape == (8, 8)
    assert resize_image(image, (30, 15)).shape == (30, 15)
    enlarged = resize_image(image.astype(np.float32), (20, 40))
    linear = cv2.resize(image.astype(np.float32), (40, 20), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(enlarged, linear)
    assert resize_image(image, (10, 20)) is image
    with pytest.raises(ValueError, match="positive"):
        resize_image(image, (0, 5))


def test_resize_mask_keeps_a_one_pixel_lesion_when_shrinking():
    mask = np.zeros((64, 64), np.uint8)
    mask[37, 10] = 255
    out = resize_mask(mask, 32)
    assert out.dtype == np.uint8
    assert out.sum() == 1 and out[18, 5] == 1


def test_resize_mask_does_not_dilate():
    mask = np.zeros((64, 64), np.uint8)
    mask[10:12, 20:22] = 1  # one 2×2 block on the ×2 grid → exactly one pixel
    mask[40:60, 30:50] = 1  # a large lesion keeps its area exactly
    out = resize_mask(mask, 32)
    assert out[5, 10] == 1 and out.sum() == 1 + 100
    np.testing.assert_array_equal(out[20:30, 15:25], 1)


def test_resize_mask_half_covered_pixels_are_foreground():
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 2] = 1  # a one-pixel-wide line: every output pixel it crosses is half covered
    out = resize_mask(mask, 4)
    np.testing.assert_array_equal(out[:, 1], 1)
    assert out.sum() == 4


def test_resize_mask_enlarging_and_empty():
    mask = np.zeros((16, 16), bool)
    mask[7, 7] = True
    out = resize_mask(mask, (32, 32))
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 1}
    assert out[14:16, 14:16].all() and out.sum() == 4  # the ×2 footprint, nothing more
    assert resize_mask(mask, (40, 24)).shape == (40, 24)
    np.testing.assert_array_equal(resize_mask(np.zeros((16, 16)), 5), np.zeros((5, 5)))


@settings(max_examples=60, deadline=None)
@given(
    pixels=st.lists(st.tuples(st.integers(0, 47), st.integers(0, 47)), min_size=0, max_size=6),
    size=st.tuples(st.integers(5, 47), st.integers(5, 47)),
)
def test_resize_mask_never_loses_or_invents_a_lesion(pixels, size):
    mask = np.zeros((48, 48), np.uint8)
    for y, x in pixels:
        mask[y, x] = 1
    out = resize_mask(mask, size)
    assert out.shape == size
    assert out.any() == mask.any()
    n_in = cv2.connectedComponents(mask, connectivity=8)[0] - 1
    n_out = cv2.connectedComponents(out, connectivity=8)[0] - 1
    assert n_out <= n_in
