"""Lung pre-segmenter: checkpoint round trip, lung boxes in the cache, crop datasets, recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from ssl_ptx.config import LUNG_PRESETS, ConfigError, DataConfig, apply_overrides, preset
from ssl_ptx.data import rle
from ssl_ptx.data.cache import CacheReader, build_cache, store_lung_boxes
from ssl_ptx.data.datasets import SegmentationDataset
from ssl_ptx.data.manifest import MANIFEST_COLUMNS
from ssl_ptx.engine.checkpoint import CheckpointError, save_checkpoint
from ssl_ptx.engine.data import build_siim_datasets
from ssl_ptx.engine.lung_data import (
    build_lung_datasets,
    cache_lung_boxes,
    lung_checkpoint_key,
    lung_contact_sheet,
)
from ssl_ptx.lung_crop import LUNG_CROP_KEY, Box, LungCropper, crop, crop_mask
from ssl_ptx.models import create_model

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"encoder_name": "resnet18", "in_channels": 1, "decoder_channels": [16] * 5}


def _tiny_cropper(**settings) -> LungCropper:
    torch.manual_seed(0)
    return LungCropper(create_model(TINY_MODEL), input_size=64, **settings)


def test_lung_presets_follow_the_third_place():
    full = LUNG_PRESETS["full"]()
    assert (full.model.encoder_name, full.loss.name, full.trainer.optimizer) == (
        "resnet34",
        "symmetric_lovasz",
        "adam",
    )
    assert (full.trainer.lr, full.data.size, full.data.batch_size, full.trainer.epochs) == (
        1e-4,
        256,
        16,
        30,
    )
    assert full.data.positive_rate is None and (full.data.n_folds, full.data.fold_seed) == (4, 100)
    demo = LUNG_PRESETS["demo"]()
    assert demo.data.size == 128 and demo.out_dir != full.out_dir


def test_lung_crop_config_needs_a_cache():
    with pytest.raises(ConfigError, match="data.lung_crop: needs data.cache_dir"):
        apply_overrides(preset("demo"), ["data.cache_dir=none", "data.lung_crop=lung.pt"])
    with pytest.raises(ConfigError, match="data.cache_size"):
        DataConfig(cache_size=0)


def test_checkpoint_round_trip_rebuilds_the_same_cropper(tmp_path: Path):
    cropper = _tiny_cropper(threshold=0.4, margin=0.05, keep_aspect=True)
    path = cropper.save(tmp_path / "lung.pt", metrics={"lung_dice": 0.9})
    rebuilt = LungCropper.from_checkpoint(path)
    assert rebuilt.settings() == cropper.settings()
    assert not rebuilt.model.training
    images = [np.random.default_rng(0).integers(0, 256, (90, 70), dtype=np.uint8)]
    np.testing.assert_array_equal(rebuilt.predict_lung(images)[0], cropper.predict_lung(images)[0])
    assert torch.load(path, weights_only=True)["metrics"] == {"lung_dice": 0.9}


def test_checkpoint_errors_are_clear(tmp_path: Path):
    with pytest.raises(ValueError, match="no model_config"):
        LungCropper(torch.nn.Conv2d(1, 1, 1), input_size=8).save(tmp_path / "x.pt")
    save_checkpoint({"model": {}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match=f"lacks \\['model_config', '{LUNG_CROP_KEY}'\\]"):
        LungCropper.from_checkpoint(tmp_path / "plain.pt")
    cropper = _tiny_cropper()
    state = torch.load(cropper.save(tmp_path / "lung.pt"), weights_only=True)
    state["model_config"]["decoder_channels"] = [32] * 5  # weights no longer fit
    save_checkpoint(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt: cannot rebuild the lung cropper"):
        LungCropper.from_checkpoint(tmp_path / "bad.pt")


def test_normalised_boxes_are_the_pixel_boxes_as_fractions():
    cropper = _tiny_cropper()
    images = [np.full((80, 60), 90, np.uint8), np.zeros((50, 100), np.uint8)]
    fractions, reasons = cropper.normalised_boxes(images)
    assert fractions.shape == (2, 4) and fractions.dtype == np.float64
    for (box, reason), row, fraction_reason, image in zip(
        cropper.boxes(images), fractions, reasons, images, strict=True
    ):
        assert reason == fraction_reason
        assert Box.from_fractions(row, image.shape) == box


def _lesion_manifest(folder: Path, n: int) -> pd.DataFrame:
    """``n`` 80×100 noise images, each with a 6×6 lesion whose corner moves along the row."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        image = rng.integers(0, 256, (80, 100), dtype=np.uint8)
        mask = np.zeros((80, 100), np.uint8)
        mask[10 + i : 16 + i, 5 + 8 * i : 11 + 8 * i] = 1
        path = folder / f"img{i}.png"
        cv2.imwrite(str(path), image)
        rows.append(
            {
                "image_id": f"id{i}",
                "path": str(path),
                "source": "test",
                "label": 1.0,
                "rle": rle.encode(mask),
                "mask_path": np.nan,
                "fold": 0,
                "view": "",
                "patient_id": "",
                "height": 80,
                "width": 100,
                "mask_area": 36,
            }
        )
    return pd.DataFrame(rows).astype(MANIFEST_COLUMNS)


class _RecordingPredictor:
    """Boxes that depend on the image (its mean), counting calls; can fail on a given call."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        shift = np.array([image.mean() / 2550 for image in images])
        boxes = np.stack([shift, shift, 0.5 + shift, 0.9 + shift / 2], axis=1)
        return boxes, ["lungs"] * len(images)


@pytest.fixture()
def cache_path(tmp_path: Path) -> Path:
    manifest = _lesion_manifest(tmp_path / "images", 7)
    return build_cache(manifest, tmp_path / "c.h5", size=40, chunk=4, progress=False).out_path


def test_cache_boxes_are_resumable_and_stored_beside_the_pixels(cache_path: Path):
    interrupted = _RecordingPredictor(fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        store_lung_boxes(cache_path, "k1", interrupted, chunk=3, progress=False)
    parts = cache_path.with_name("c.h5.lung-k1.parts")
    assert sorted(p.name for p in parts.glob("part-*")) == ["part-000000.npz"]
    resumed = _RecordingPredictor()
    stored = store_lung_boxes(cache_path, "k1", resumed, info={"m": 1}, chunk=3, progress=False)
    assert resumed.calls == 2 and not parts.exists()  # blocks 2 and 3 of 3
    fresh = _RecordingPredictor()
    with CacheReader(cache_path) as cache:
        images = [cache[i][0] for i in range(len(cache))]
        expected, _ = fresh(images)
        np.testing.assert_allclose(stored.boxes, expected)
        assert cache.lung_box_keys() == ["k1"]
        read = cache.lung_boxes("k1")
        np.testing.assert_array_equal(read.boxes, stored.boxes)
        assert read.info == {"m": 1} and read.reasons == ("lungs",) * 7
        with pytest.raises(KeyError, match="no lung boxes 'k2'; stored: \\['k1'\\]"):
            cache.lung_boxes("k2")
        image, mask = cache[0]  # the pixels are untouched
        assert image.shape == (40, 40) and mask.any()
    again = _RecordingPredictor()
    store_lung_boxes(cache_path, "k1", again, progress=False)
    assert again.calls == 0


def test_cache_boxes_refuse_bad_predictions(cache_path: Path):
    def outside(images):  # the last block (rows 4..6) ends past the image in its row 2
        boxes = np.tile([0.1, 0.1, 0.9, 0.9], (len(images), 1))
        if len(images) == 3:
            boxes[2, 2] = 1.5
        return boxes, ["lungs"] * len(images)

    with pytest.raises(ValueError, match="cache rows 4..6, row 2"):
        store_lung_boxes(cache_path, "bad", outside, chunk=4, progress=False)
    with pytest.raises(ValueError, match="lung box key"):
        store_lung_boxes(cache_path, "a/b", outside, progress=False)


def test_crop_dataset_returns_the_crop(cache_path: Path, tmp_path: Path):
    with CacheReader(cache_path) as cache:
        n = len(cache)
        boxes = np.tile([0.0, 0.0, 0.5, 0.5], (n, 1))  # top-left quarter
        dataset = SegmentationDataset(cache, size=24, boxes=boxes)
        for index in (0, 6):
            sample = dataset[index]
            image, mask = cache[index]
            box = Box(0, 0, 20, 20)
            assert sample["image"].shape == (1, 24, 24)
            expected = crop(image, box, 24).astype(np.float32) / 255
            np.testing.assert_allclose(sample["image"][0].numpy(), expected, atol=1e-6)
            np.testing.assert_array_equal(sample["mask"][0].numpy(), crop_mask(mask, box, 24))
        # image 6's lesion (columns 53..58 of 100) lies outside the left half: label 0
        assert dataset[0]["label"] == 1.0 and dataset[6]["label"] == 0.0
        flat = boxes.copy()
        flat[1] = [0.5, 0.0, 0.5, 1.0]
        with pytest.raises(ValueError, match="boxes, row 1"):
            SegmentationDataset(cache, boxes=flat)
        with pytest.raises(ValueError, match=f"expected shape \\({n}, 4\\)"):
            SegmentationDataset(cache, boxes=np.zeros((2, 4)))
    # a manifest source is cut at native size, then resized
    manifest = _lesion_manifest(tmp_path / "images", 7)
    native = SegmentationDataset(manifest, size=(16, 20), boxes=np.tile([0, 0, 0.5, 0.5], (7, 1)))
    sample = native[0]
    assert sample["image"].shape == (1, 16, 20) and sample["mask"].sum() > 0


def test_contact_sheet_draws_each_box(tmp_path: Path):
    images = [np.zeros((60, 40), np.uint8), np.zeros((30, 30), np.uint8)]
    boxes = [(0.25, 0.25, 0.75, 0.75), (0.0, 0.0, 1.0, 1.0)]
    sheet = lung_contact_sheet(images, [None, None], boxes, columns=2, tile=64)
    green = (sheet[..., 1] == 255) & (sheet[..., 0] == 0)
    rows, cols = np.nonzero(green[:, :64])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (16, 47, 16, 47)
    assert green[:, 64:].any() and not green[20:40, 20:40].any()


@pytest.fixture(scope="module")
def lung_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch run of the recipe on the demo root's 6 Montgomery images at 64²."""
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        from train_lung_segmenter import main
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    out = tmp_path_factory.mktemp("lung_run")
    checkpoint = main(
        [
            "--demo-dir",
            str(demo_root),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--set",
            "data.size=64",
            "--set",
            f"data.cache_dir={out / 'cache'}",
            "--set",
            "data.batch_size=2",
            "--set",
            "data.num_workers=0",
            "--set",
            "trainer.device=cpu",
            "--set",
            "model.decoder_channels=[16,16,16,16,16]",
            "--margin",
            "0.05",
            "--sheet-images",
            "2",
            "--no-progress",
        ]
    )
    return Path(checkpoint)


def test_recipe_help_explains_the_options():
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "train_lung_segmenter.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for text in ("--montgomery-dir", "--margin", "lung_segmenter.pt", "data.lung_crop", "full"):
        assert text in result.stdout


def test_recipe_tiny_run_writes_a_usable_checkpoint(lung_run: Path):
    out = lung_run.parent
    cropper = LungCropper.from_checkpoint(lung_run)
    assert cropper.input_size == 64 and cropper.margin == 0.05 and not cropper.keep_aspect
    held_out = pd.read_csv(out / "held_out.csv")
    assert len(held_out) >= 1 and held_out["dice"].between(0, 1).all()
    assert ((held_out["iou"] - held_out["dice"] / (2 - held_out["dice"])).abs() < 1e-9).all()
    sheet = cv2.imread(str(out / "lung_crops.png"))
    assert sheet is not None and sheet.shape[0] > 0
    metrics = torch.load(lung_run, weights_only=True)["metrics"]
    assert metrics["lung_dice"] == pytest.approx(held_out["dice"].mean())


def test_lung_datasets_hold_out_a_fold(demo_root: Path, tmp_path: Path):
    config = DataConfig(demo_dir=str(demo_root), size=32, n_folds=3, cache_dir=str(tmp_path))
    train, val, manifest = build_lung_datasets(config, progress=False)
    assert len(train) + len(val) == len(manifest) == 6
    assert sorted(manifest["fold"]) == [0, 0, 1, 1, 2, 2] and len(val) == 2
    sample = val[0]
    assert sample["image"].shape == (1, 32, 32) and sample["mask"].mean() > 0.1  # lungs
    siim_only = tmp_path / "siim_only"
    (siim_only / "siim").mkdir(parents=True)
    (siim_only / "siim" / "train-rle.csv").write_text("ImageId, EncodedPixels\n")
    with pytest.raises(ConfigError, match="has no montgomery/ folder"):
        build_lung_datasets(DataConfig(demo_dir=str(siim_only)))


def test_training_data_is_cut_to_stored_lung_boxes(lung_run: Path, demo_root: Path, tmp_path: Path):
    config = DataConfig(
        demo_dir=str(demo_root),
        cache_dir=str(tmp_path),
        size=48,
        cache_size=96,
        lung_crop=str(lung_run),
        augment="none",
    )
    train, val, _ = build_siim_datasets(config, progress=False)
    dataset = train.dataset
    assert dataset.boxes is not None and dataset.boxes.shape == (len(dataset), 4)
    cache = dataset._cache
    assert cache.size == 96 and cache.lung_box_keys() == [lung_checkpoint_key(lung_run)]
    stored = cache.lung_boxes(lung_checkpoint_key(lung_run))
    assert json.loads(json.dumps(stored.info))["settings"]["margin"] == 0.05
    row = train.indices[0]
    image, _ = cache[row]
    box = Box.from_fractions(stored.boxes[row], image.shape)
    expected = crop(image, box, 48).astype(np.float32) / 255
    np.testing.assert_allclose(train[0]["image"][0].numpy(), expected, atol=1e-6)
    assert val[0]["image"].shape == (1, 48, 48)
    # a second build reads the stored boxes instead of running the model again
    again = cache_lung_boxes(cache, lung_run, progress=False)
    np.testing.assert_array_equal(again.boxes, stored.boxes)
    # another checkpoint (other settings) gets its own boxes, even with the cache open here
    other = LungCropper.from_checkpoint(lung_run)
    other.keep_aspect = True
    other_path = other.save(tmp_path / "other.pt")
    square = cache_lung_boxes(cache, other_path, progress=False)
    assert square.info["settings"]["keep_aspect"] is True
    with h5py.File(cache.path, "r") as file:
        assert sorted(file["lung_boxes"]) == sorted(
            [lung_checkpoint_key(lung_run), lung_checkpoint_key(other_path)]
        )
