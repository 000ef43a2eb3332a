from __future__ import annotations

import math
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch

# The PNG manifest builder lives beside the cache tests (rows cycle: RLE positive, RLE empty,
# mask file, no mask with label 1, no mask and no label).
from test_cache import make_png_manifest
from torch.utils.data import DataLoader

from ssl_ptx.data import rle
from ssl_ptx.data.cache import CacheReader, SampleReadError, build_cache
from ssl_ptx.data.datasets import SegmentationDataset
from ssl_ptx.data.images import read_image, resize_image, resize_mask
from ssl_ptx.data.samplers import PositiveRateSampler
from ssl_ptx.data.transforms import build_transforms


def _erase(mask: np.ndarray, **_: object) -> np.ndarray:
    return np.zeros_like(mask)


@pytest.fixture()
def manifest(tmp_path: Path) -> pd.DataFrame:
    return make_png_manifest(tmp_path / "png", 10)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_sample_shapes_dtypes_and_channel_repeat(manifest: pd.DataFrame, in_channels: int) -> None:
    dataset = SegmentationDataset(manifest, size=32, in_channels=in_channels)
    assert len(dataset) == 10
    sample = dataset[4]
    assert sample["image"].shape == (in_channels, 32, 32) and sample["image"].dtype == torch.float32
    assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
    assert torch.equal(sample["image"], sample["image"][:1].expand(in_channels, -1, -1))
    assert sample["mask"].shape == (1, 32, 32) and sample["mask"].dtype == torch.float32
    assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0}
    assert sample["label"].shape == () and sample["label"].dtype == torch.float32
    assert sample["image_id"] == "id0004" and sample["index"] == 4


def test_image_and_mask_match_the_files_and_the_rle(manifest: pd.DataFrame) -> None:
    dataset = SegmentationDataset(manifest, size=32)
    row = manifest.iloc[0]  # an RLE positive
    native = read_image(row["path"])
    expected_mask = resize_mask(rle.decode(row["rle"], native.shape), 32)
    sample = dataset[0]
    assert expected_mask.any()
    np.testing.assert_array_equal(sample["mask"][0].numpy(), expected_mask)
    np.testing.assert_allclose(sample["image"][0].numpy(), resize_image(native, 32) / 255.0)
    native_sample = SegmentationDataset(manifest)[0]  # no size: native resolution
    np.testing.assert_array_equal(
        native_sample["mask"][0].numpy(), rle.decode(row["rle"], native.shape)
    )


def test_labels_follow_the_mask_when_known_else_the_manifest(manifest: pd.DataFrame) -> None:
    dataset = SegmentationDataset(manifest, size=32)
    # rows 0-4: RLE positive, RLE "-1", mask file, label 1 without mask, unlabelled
    labels = [dataset[i]["label"].item() for i in range(5)]
    assert labels[:4] == [1.0, 0.0, 1.0, 1.0] and math.isnan(labels[4])
    assert [bool(dataset[i]["has_mask"]) for i in range(5)] == [True, True, True, False, False]
    assert dataset[3]["mask"].sum() == 0
    np.testing.assert_array_equal(dataset.labels, manifest["label"].to_numpy())
    erase_mask = A.Lambda(mask=_erase, p=1.0)
    assert SegmentationDataset(manifest, erase_mask, size=32)[0]["label"].item() == 0.0


def test_cache_source_gives_the_same_samples(manifest: pd.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    build_cache(manifest, out, size=24, chunk=4, progress=False)
    from_files = SegmentationDataset(manifest, size=24, in_channels=3)
    from_cache = SegmentationDataset(CacheReader(out), in_channels=3)
    assert len(from_cache) == len(from_files)
    np.testing.assert_array_equal(from_cache.labels, from_files.labels)
    for i in range(len(from_files)):
        a, b = from_files[i], from_cache[i]
        for key in ("image", "mask"):
            assert torch.equal(a[key], b[key]), (i, key)
        assert torch.equal(a["label"], b["label"]) or (a["label"].isnan() and b["label"].isnan())
        assert a["has_mask"] == b["has_mask"] and a["image_id"] == b["image_id"]
    with pytest.raises(ValueError, match="holds 24×24 images but size=32"):
        SegmentationDataset(CacheReader(out), size=32)


def test_reading_errors_name_the_image_and_path(manifest: pd.DataFrame, tmp_path: Path) -> None:
    manifest.loc[2, "path"] = str(tmp_path / "missing.png")
    dataset = SegmentationDataset(manifest, size=16)
    with pytest.raises(SampleReadError, match=r"image 'id0002' \(.*missing.png\)"):
        dataset[2]
    with pytest.raises(IndexError):
        dataset[10]


def test_dataloader_workers_draw_different_augmentations(manifest: pd.DataFrame) -> None:
    same_image = manifest.assign(path=manifest["path"].iloc[1], rle="-1", height=0, width=0)
    transform = build_transforms("light", 32, train=True, seed=0)
    dataset = SegmentationDataset(same_image, transform, size=48)

    def run() -> list[torch.Tensor]:
        loader = DataLoader(
            dataset, batch_size=2, num_workers=2, generator=torch.Generator().manual_seed(1)
        )
        return [batch["image"] for batch in loader]

    first, second = run(), run()
    assert not torch.equal(first[0], first[1])  # batches from worker 0 and worker 1
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)  # a seeded DataLoader repeats itself


def test_demo_root_end_to_end(demo_root: Path, tmp_path: Path) -> None:
    from ssl_ptx.data.siim import load_siim

    manifest = load_siim(demo_root / "siim", progress=False)
    out = tmp_path / "demo.h5"
    report = build_cache(manifest, out, size=64, progress=False)
    assert report.n_written == len(manifest) == 48
    dataset = SegmentationDataset(
        CacheReader(out), build_transforms("bestfitting", 64, train=True, seed=0), in_channels=3
    )
    sampler = PositiveRateSampler(dataset.labels, 0.5, seed=0)
    batch = next(iter(DataLoader(dataset, batch_size=8, sampler=sampler)))
    assert batch["image"].shape == (8, 3, 64, 64) and batch["mask"].shape == (8, 1, 64, 64)
    positives = manifest["rle"].str.strip() != "-1"
    for image_id, label in zip(batch["image_id"], batch["label"].tolist(), strict=True):
        row = manifest.index[manifest["image_id"] == image_id][0]
        if label == 1.0:
            assert positives[row]  # aug9 may cover a lesion, never create one
    direct = SegmentationDataset(manifest, size=64)
    cached = SegmentationDataset(CacheReader(out))
    for i in (0, len(manifest) - 1):
        assert torch.equal(direct[i]["mask"], cached[i]["mask"])
        assert direct[i]["label"] == float(positives.iloc[i])


def test_a_transform_that_leaves_uint8_is_refused(manifest: pd.DataFrame) -> None:
    dataset = SegmentationDataset(manifest, A.Normalize(p=1.0), size=16)
    with pytest.raises(ValueError, match="'id0000': expected a uint8 grey"):
        dataset[0]
