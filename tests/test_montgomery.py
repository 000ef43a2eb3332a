"""The Montgomery reader: lung target = leftMask OR rightMask, sizes checked, bad files skipped."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from external_data import montgomery
from external_data.__main__ import main
from ssl_ptx.data import rle
from ssl_ptx.data.cache import CacheReader, build_cache

#: image name → (height, width)
IMAGES = {"MCUCXR_0001_0": (24, 20), "MCUCXR_0002_1": (20, 24), "MCUCXR_0003_0": (16, 16)}


def _lungs(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Left and right lung masks (0/255) that overlap in one column."""
    height, width = shape
    left, right = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    left[2 : height - 2, 1 : width // 2 + 1] = 255
    right[4 : height - 4, width // 2 : width - 1] = 255
    return left, right


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_set(base: Path) -> Path:
    """A tiny Montgomery set under ``base/MontgomerySet``; returns the dataset folder."""
    dataset = base / "MontgomerySet"
    for k, (name, shape) in enumerate(IMAGES.items()):
        image = np.add.outer(np.arange(shape[0]), np.arange(shape[1])).astype(np.uint8) + k
        _save(dataset / "CXR_png" / f"{name}.png", image)
        left, right = _lungs(shape)
        _save(dataset / "ManualMask/leftMask" / f"{name}.png", left)
        _save(dataset / "ManualMask/rightMask" / f"{name}.png", right)
    (dataset / "ClinicalReadings").mkdir()
    return dataset


@pytest.mark.parametrize("inner", [False, True], ids=["parent", "dataset-folder"])
def test_load_lung_union(tmp_path, inner):
    dataset = _write_set(tmp_path)
    manifest = montgomery.load(dataset if inner else tmp_path, progress=False)
    assert manifest["image_id"].tolist() == list(IMAGES)
    assert (manifest["source"] == "montgomery").all() and manifest["label"].isna().all()
    assert manifest["mask_path"].isna().all() and (manifest["fold"] == -1).all()
    np.testing.assert_array_equal(manifest["tuberculosis"], [0.0, 1.0, 0.0])
    assert manifest.attrs["skipped"] == {}
    for row in manifest.itertuples():
        shape = IMAGES[row.image_id]
        assert (row.height, row.width) == shape
        left, right = _lungs(shape)
        union = (left > 0) | (right > 0)
        np.testing.assert_array_equal(rle.decode(row.rle, shape), union)
        assert row.mask_area == union.sum() < (left > 0).sum() + (right > 0).sum()
        assert Path(row.path) == (dataset / "CXR_png" / f"{row.image_id}.png").absolute()


def test_cache_reads_the_lung_target(tmp_path):
    manifest = montgomery.load(_write_set(tmp_path), progress=False)
    build_cache(manifest, tmp_path / "lungs.h5", size=16, progress=False)
    with CacheReader(tmp_path / "lungs.h5") as cache:
        assert cache.has_mask.all()
        _, mask = cache[cache.index_of("MCUCXR_0003_0")]
    left, right = _lungs((16, 16))
    np.testing.assert_array_equal(mask, (left > 0) | (right > 0))


def test_bad_images_and_masks_are_skipped(tmp_path, caplog):
    dataset = _write_set(tmp_path)
    (dataset / "ManualMask/rightMask/MCUCXR_0001_0.png").unlink()
    for side in ("left", "right"):  # both masks agree, but not with their 20×24 image
        _save(dataset / f"ManualMask/{side}Mask/MCUCXR_0002_1.png", np.zeros((24, 20), np.uint8))
    broken = dataset / "CXR_png" / "MCUCXR_0003_0.png"
    broken.write_bytes(broken.read_bytes()[:25])
    _save(dataset / "CXR_png" / "MCUCXR_0004_1.png", np.zeros((10, 10), np.uint8))
    (dataset / "ManualMask/leftMask/MCUCXR_0004_1.png").write_bytes(b"not a png")
    _save(dataset / "ManualMask/rightMask/MCUCXR_0004_1.png", np.zeros((10, 10), np.uint8))
    _save(dataset / "CXR_png" / "MCUCXR_0005_0.png", np.zeros((10, 10), np.uint8))
    _save(dataset / "ManualMask/leftMask/MCUCXR_0005_0.png", np.zeros((10, 10), np.uint8))
    _save(dataset / "ManualMask/rightMask/MCUCXR_0005_0.png", np.zeros((10, 12), np.uint8))
    with caplog.at_level(logging.WARNING, logger="external_data.montgomery"):
        manifest = montgomery.load(tmp_path, progress=False)
    assert manifest.empty
    skipped = manifest.attrs["skipped"]
    assert list(skipped) == [
        "MCUCXR_0001_0",
        "MCUCXR_0002_1",
        "MCUCXR_0003_0",
        "MCUCXR_0004_1",
        "MCUCXR_0005_0",
    ]
    assert "no mask" in skipped["MCUCXR_0001_0"] and "rightMask" in skipped["MCUCXR_0001_0"]
    assert "masks are 24×20 but the image is 20×24" in skipped["MCUCXR_0002_1"]
    assert "cannot decode" in skipped["MCUCXR_0003_0"] and "CXR_png" in skipped["MCUCXR_0003_0"]
    assert "cannot decode" in skipped["MCUCXR_0004_1"] and "leftMask" in skipped["MCUCXR_0004_1"]
    assert "leftMask is 10×10 but ManualMask/rightMask is 10×12" in skipped["MCUCXR_0005_0"]
    assert "5 image(s) of" in caplog.text and "skipped" in caplog.text


@pytest.mark.parametrize("workers", [1, 3])
def test_one_bad_image_leaves_the_others(tmp_path, workers):
    dataset = _write_set(tmp_path)
    (dataset / "ManualMask/leftMask/MCUCXR_0002_1.png").unlink()
    manifest = montgomery.load(tmp_path, workers=workers, progress=False)
    assert manifest["image_id"].tolist() == ["MCUCXR_0001_0", "MCUCXR_0003_0"]
    assert list(manifest.attrs["skipped"]) == ["MCUCXR_0002_1"]


def test_hidden_files_and_other_folders_are_ignored(tmp_path):
    dataset = _write_set(tmp_path)
    (dataset / "CXR_png" / "._MCUCXR_0001_0.png").write_bytes(b"resource fork")
    (dataset / "CXR_png" / "notes.txt").write_text("x")
    _save(tmp_path / "_truth" / "MCUCXR_0009_0.png", np.zeros((8, 8), np.uint8))
    assert montgomery.load(tmp_path, progress=False)["image_id"].tolist() == list(IMAGES)


def test_no_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Montgomery set found"):
        montgomery.load(tmp_path)


def test_command_prints_counts(tmp_path, capsys):
    dataset = _write_set(tmp_path)
    (dataset / "ManualMask/rightMask/MCUCXR_0003_0.png").unlink()
    assert main(["--montgomery-dir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"dataset folder: {dataset}" in out
    assert "images listed 3 | read 2 | skipped 1" in out
    assert "tuberculosis 1 | normal 1 | lung area median" in out
    assert "skipped MCUCXR_0003_0: no mask" in out


def test_demo_root_reads_as_written(tmp_path):
    from ssl_ptx.data.demo import write_demo_root

    summary = write_demo_root(
        tmp_path, n_siim=1, n_chexpert=0, n_nih=0, n_montgomery=4, size=64, progress=False
    )
    manifest = montgomery.load(summary.montgomery.folder, progress=False)
    assert len(manifest) == summary.montgomery.images == 4
    assert manifest.attrs["skipped"] == {}
    assert manifest["tuberculosis"].sum() == summary.montgomery.published_positives
    assert (manifest["mask_area"] > 0).all()
    assert (manifest["mask_area"] < manifest["height"] * manifest["width"]).all()
