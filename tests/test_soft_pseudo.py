"""Soft pseudo labels: the soft-target BCE, and probability maps from the filter to the batch."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ssl_ptx.data.images import resize_image
from ssl_ptx.data.manifest import MANIFEST_COLUMNS
from ssl_ptx.engine.pseudo_data import SoftTargetDataset, soft_maps_of
from ssl_ptx.inference import Predictor
from ssl_ptx.losses import bce, build_loss, soft_bce
from ssl_ptx.pseudo import PseudoLabelFilter, published_rules


def test_soft_bce_against_a_direct_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 5, 6, generator=generator, dtype=torch.float64)
    targets = torch.rand(3, 1, 5, 6, generator=generator, dtype=torch.float64)
    targets[0] = 0.0  # an empty mask
    targets[1, 0, 0, :3] = 1.0  # some hard pixels
    z, q = logits.numpy().ravel(), targets.numpy().ravel()
    p = 1 / (1 + np.exp(-z))
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(q > 0, q * np.log(q / p), 0.0) + np.where(
            q < 1, (1 - q) * np.log((1 - q) / (1 - p)), 0.0
        )
    assert soft_bce(logits, targets).item() == pytest.approx(kl.mean(), rel=1e-10)
    assert build_loss("soft_bce")(logits, targets).item() == pytest.approx(kl.mean(), rel=1e-10)
    # the gradient is BCE's; hard targets give BCE itself; predicting q costs nothing
    logits.requires_grad_(True)
    soft_grad = torch.autograd.grad(soft_bce(logits, targets), logits)[0]
    bce_grad = torch.autograd.grad(bce(logits, targets), logits)[0]
    torch.testing.assert_close(soft_grad, bce_grad)
    hard = (targets > 0.5).double()
    assert soft_bce(logits, hard).item() == pytest.approx(bce(logits, hard).item(), rel=1e-10)
    inner = targets.clamp(0.01, 0.99)
    assert soft_bce(torch.logit(inner), inner).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        soft_bce(logits, targets * 2)


class Gradient(nn.Module):
    """Logits 6·(image − 0.5): the probability follows the image smoothly."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images[:, :1] - 0.5) * 6.0


def _pool(folder: Path) -> pd.DataFrame:
    """6 PNGs (48×40): a left-to-right ramp with a bright square on the positives."""
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.tile(np.linspace(20, 140, 40), (48, 1))
    rows = []
    for n, label in enumerate([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]):
        image = ramp.copy()
        if label:
            image[8 + n : 24 + n, 12:30] = 235
        path = folder / f"img{n}.png"
        cv2.imwrite(str(path), image.astype(np.uint8))
        rows.append({"image_id": f"img{n}", "path": str(path), "label": label})
    manifest = pd.DataFrame(rows).reindex(columns=list(MANIFEST_COLUMNS))
    manifest["source"] = "chexpert"
    manifest[["fold", "height", "width", "mask_area"]] = [-1, 0, 0, -1]
    manifest[["view", "patient_id"]] = ""
    return manifest


@pytest.fixture(scope="module")
def soft_run(tmp_path_factory: pytest.TempPathFactory):
    pool = _pool(tmp_path_factory.mktemp("pool"))
    predictor = Predictor(Gradient(), tta=(), device="cpu")
    rules = published_rules(0.5, min_area=4096, agree_on_negatives=False)
    out = tmp_path_factory.mktemp("soft")
    result = PseudoLabelFilter(
        predictor, rules, size=32, soft=True, chunk=4, gallery_size=0, progress=False
    ).run(pool, out)
    return pool, predictor, result


def _native_probability(predictor: Predictor, path: str) -> np.ndarray:
    """The teacher's map at the filter's working size (32²), resized to the native image."""
    image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    small = torch.from_numpy(resize_image(image, 32)).float().div(255)[None, None]
    return resize_image(predictor.predict_batch(small).masks[0].numpy(), image.shape)


def test_filter_keeps_probability_maps_of_the_images_it_predicted(soft_run) -> None:
    pool, predictor, result = soft_run
    manifest = result.manifest
    positives = manifest["label"] == 1.0
    assert positives.sum() == 3 and (manifest["label"] == 0.0).sum() == 3
    # published negatives need no prediction, so they keep their hard (empty) mask
    assert manifest["soft"].tolist() == positives.tolist()
    assert result.audit["n_soft"] == 3 and result.audit["settings"]["soft"] is True
    maps = soft_maps_of(manifest)
    assert len(maps) == 3 and maps.path == result.out_dir.resolve() / "masks.h5"
    with h5py.File(result.out_dir / "masks.h5") as file:
        assert all(d.dtype == np.uint8 for d in file["soft"].values())
    for row in manifest[positives].itertuples():
        expected = _native_probability(predictor, row.path)
        stored = maps[row.image_id]
        assert stored.shape == (48, 40) and stored.dtype == np.uint8
        assert np.abs(stored / 255.0 - expected).max() <= 0.5 / 255 + 1e-6
        assert 0.05 < stored.min() / 255 and stored.max() / 255 < 0.99  # not binary


def test_pseudo_dataset_serves_the_stored_probabilities(soft_run, tmp_path: Path) -> None:
    pool, predictor, result = soft_run
    manifest = pd.read_csv(result.out_dir / "pseudo_manifest.csv")  # as the recipe reads it
    maps = soft_maps_of(manifest)
    flip = A.Compose([A.HorizontalFlip(p=1.0)])
    dataset = SoftTargetDataset(manifest, flip, soft_maps=maps, size=(48, 40))
    for index, row in enumerate(manifest.itertuples()):
        sample = dataset[index]
        target = sample["mask"][0].numpy()
        assert sample["mask"].dtype == torch.float32 and target.shape == (48, 40)
        if row.soft:
            expected = _native_probability(predictor, row.path)[:, ::-1]  # flipped with the image
            np.testing.assert_allclose(target, expected, atol=0.5 / 255 + 1e-6)
            assert sample["label"] == float((target > 0.5).any())
        else:
            assert not target.any() and sample["label"] == 0.0
    # the loss trains toward those maps: soft_bce is 0 at logit(target)
    sample = dataset[0]
    inner = sample["mask"].clamp(1e-4, 1 - 1e-4)
    assert soft_bce(torch.logit(inner)[None], inner[None]).item() == pytest.approx(0, abs=1e-6)


def test_soft_rows_need_their_file(soft_run) -> None:
    _, _, result = soft_run
    manifest = result.manifest.copy()
    assert soft_maps_of(manifest.drop(columns=["soft", "soft_masks"])) is None
    manifest.loc[manifest["soft"], "soft_masks"] = "/nowhere/masks.h5"
    with pytest.raises(ValueError, match="nowhere"):
        soft_maps_of(manifest)
