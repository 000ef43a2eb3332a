"""Predictor: TTA, ensembles, presence heads, checkpoints, lung crop, stores, the recipe."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ssl_ptx.config import DataConfig, ModelConfig, TrainConfig, config_to_dict
from ssl_ptx.data import rle
from ssl_ptx.data.images import read_image
from ssl_ptx.data.siim import find_dicoms, load_siim
from ssl_ptx.engine.checkpoint import CHECKPOINT_FORMAT, CheckpointError, save_checkpoint
from ssl_ptx.inference import (
    Predictor,
    ProbabilityStore,
    average_checkpoints,
    load_model,
    manifest_from_dicom_folder,
)
from ssl_ptx.lung_crop import LungCropper
from ssl_ptx.models import create_model
from ssl_ptx.postprocess import load_rule
from ssl_ptx.submission import check_submission, read_submission

TINY_MODEL = ModelConfig(encoder_name="tu-mobilenetv3_small_050", decoder_channels=[16, 8, 8, 8, 8])


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class Conv(nn.Module):
    """One 3×3 convolution; with ``symmetric`` its kernel is mirror-symmetric left-right, which
    makes the model flip-equivariant: model(flip(x)) = flip(model(x))."""

    def __init__(self, symmetric: bool, seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        weight = torch.randn(1, 1, 3, 3, generator=torch.Generator().manual_seed(seed))
        if symmetric:
            weight = (weight + weight.flip(-1)) / 2
        with torch.no_grad():
            self.conv.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Constant(nn.Module):
    """Mask logit ``logit(p)`` everywhere; with ``presence`` also a presence logit."""

    def __init__(self, p: float, presence: float | None = None) -> None:
        super().__init__()
        self.logit = _logit(p)
        self.presence = None if presence is None else _logit(presence)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        mask = torch.full((len(x), 1, *x.shape[-2:]), self.logit)
        if self.presence is None:
            return mask
        return mask, torch.full((len(x), 1), self.presence)


def test_hflip_tta_of_a_flip_equivariant_model_equals_the_plain_prediction() -> None:
    images = torch.rand(3, 1, 16, 20)
    model = Conv(symmetric=True)
    with_tta = Predictor(model, tta=("hflip",), device="cpu").predict_batch(images).masks
    plain = Predictor(model, tta=(), device="cpu").predict_batch(images).masks
    assert with_tta.shape == (3, 16, 20)
    torch.testing.assert_close(with_tta, plain)


def test_hflip_tta_flips_back_before_averaging() -> None:
    images = torch.rand(2, 1, 16, 16)
    model = Conv(symmetric=False).eval()
    with_tta = Predictor(model, device="cpu").predict_batch(images).masks
    with torch.no_grad():
        plain = torch.sigmoid(model(images))[:, 0]
        mirrored = torch.sigmoid(model(images.flip(-1)))[:, 0].flip(-1)
    torch.testing.assert_close(with_tta, (plain + mirrored) / 2)
    assert (with_tta - plain).abs().max() > 1e-3  # the flip matters for this model


def test_ensemble_weights_are_normalised_and_checked() -> None:
    images = torch.rand(2, 1, 8, 8)
    members = [Constant(0.2), Constant(0.8)]
    for weights in ([0.75, 0.25], [3, 1]):
        masks = Predictor(members, weights=weights, device="cpu").predict_batch(images).masks
        torch.testing.assert_close(masks, torch.full((2, 8, 8), 0.35))
    equal = Predictor(members, device="cpu").predict_batch(images).masks
    torch.testing.assert_close(equal, torch.full((2, 8, 8), 0.5))
    for weights in ([1.0], [1.0, -1.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="weights"):
            Predictor(members, weights=weights, device="cpu")
    with pytest.raises(ValueError, match="unknown TTA"):
        Predictor(members, tta=("vflip",), device="cpu")


def test_presence_is_averaged_over_members_with_a_head() -> None:
    members = [Constant(0.5, presence=0.9), Constant(0.5), Constant(0.5, presence=0.3)]
    prediction = Predictor(members, weights=[1, 1, 2], device="cpu").predict_batch(
        torch.rand(2, 1, 8, 8)
    )
    torch.testing.assert_close(prediction.presence, torch.full((2,), 0.5))
    assert (
        Predictor(Constant(0.5), device="cpu").predict_batch(torch.rand(1, 1, 8, 8)).presence
        is None
    )


def test_maps_come_back_at_the_input_size_and_modes_are_restored() -> None:
    model = Conv(symmetric=False).train()
    predictor = Predictor(model, size=8, device="cpu")
    masks = predictor.predict_batch(torch.rand(2, 1, 24, 24)).masks
    assert masks.shape == (2, 24, 24) and model.training
    masks += 1  # an ordinary tensor, usable in place outside inference mode


def _run_config(size: int = 32) -> dict:
    return config_to_dict(TrainConfig(model=TINY_MODEL, data=DataConfig(size=size)))


def _tiny_checkpoint(path: Path, seed: int, size: int = 32, dice: float = 0.5) -> nn.Module:
    """A Trainer-style weights checkpoint of a tiny UNet-CBAM (random weights)."""
    torch.manual_seed(seed)
    model = create_model(config_to_dict(TINY_MODEL))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so averaging them is visible
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state = {
        "kind": "weights",
        "model": model.state_dict(),
        "epoch": 0,
        "metrics": {"val_dice": dice},
        "config": _run_config(size),
    }
    save_checkpoint(state, path)
    return model.eval()


def test_checkpoint_predictor_matches_the_model_it_was_saved_from(tmp_path: Path) -> None:
    model = _tiny_checkpoint(tmp_path / "a.pt", seed=0)
    predictor = Predictor.from_checkpoints([tmp_path / "a.pt"], tta=(), device="cpu")
    assert predictor.size == 32
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = torch.sigmoid(model(images))[:, 0]
    torch.testing.assert_close(predictor.predict_batch(images).masks, expected)
    loaded, info = load_model(tmp_path / "a.pt")
    assert info["metrics"] == {"val_dice": 0.5} and "model" not in info


def test_checkpoint_weights_are_averaged(tmp_path: Path) -> None:
    first = _tiny_checkpoint(tmp_path / "a.pt", seed=0)
    second = _tiny_checkpoint(tmp_path / "b.pt", seed=1)
    averaged, info = average_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"])
    assert info["averaged"] == [str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]
    for key, value in averaged.state_dict().items():
        a, b = first.state_dict()[key], second.state_dict()[key]
        if value.is_floating_point():
            torch.testing.assert_close(value, (a + b) / 2)
        else:
            assert torch.equal(value, a)
    group = Predictor.from_checkpoints([[tmp_path / "a.pt", tmp_path / "b.pt"]], device="cpu")
    assert len(group.models) == 1
    config = _run_config()
    config["model"]["decoder_channels"] = [16, 16, 8, 8, 8]
    other = create_model(config["model"])
    save_checkpoint({"model": other.state_dict(), "config": config}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not the same model"):
        average_checkpoints([tmp_path / "a.pt", tmp_path / "other.pt"])


class _Unsafe:
    """An object that ``torch.load(weights_only=True)`` refuses to unpickle."""


def test_checkpoint_loading_refuses_unsafe_or_incomplete_files(tmp_path: Path) -> None:
    unsafe = tmp_path / "unsafe.pt"
    torch.save(
        {"format": CHECKPOINT_FORMAT, "model": {}, "config": _run_config(), "x": _Unsafe()},
        unsafe,
    )
    with pytest.raises(CheckpointError, match="weights_only") as caught:
        load_model(unsafe)
    assert str(unsafe) in str(caught.value)
    with pytest.raises(CheckpointError, match="weights_only"):
        Predictor.from_checkpoints([unsafe], device="cpu")
    bare = save_checkpoint({"model": {}, "config": {"trainer": {}}}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="no model config"):
        load_model(bare)
    _tiny_checkpoint(tmp_path / "a32.pt", seed=0, size=32)
    _tiny_checkpoint(tmp_path / "a64.pt", seed=0, size=64)
    with pytest.raises(ValueError, match="different sizes"):
        Predictor.from_checkpoints([tmp_path / "a32.pt", tmp_path / "a64.pt"], device="cpu")


def test_predict_a_dicom_folder_into_an_hdf5_store(demo_root: Path, tmp_path: Path) -> None:
    folder = demo_root / "siim" / "dicom-images-train"
    manifest = manifest_from_dicom_folder(folder)
    assert manifest["image_id"].tolist() == sorted(find_dicoms(folder))
    predictor = Predictor(Conv(symmetric=False), size=64, batch_size=16, device="cpu")
    path = tmp_path / "maps.h5"
    with ProbabilityStore(path) as store:
        predictor.predict(folder, store)
        assert not path.exists()  # renamed onto path only when finished
    with ProbabilityStore.open(path) as stored:
        assert stored.image_ids == manifest["image_id"].tolist()
        first = manifest.iloc[0]
        codes = stored.stored(first.image_id)
        assert codes.dtype == np.uint8 and codes.shape == (128, 128)  # native size
        direct, _ = predictor._predict_arrays([read_image(first.path)])
        assert np.abs(stored[first.image_id] - direct[0]).max() <= 1 / 510 + 1e-6
        assert stored.presence(first.image_id) is None
        assert stored.nbytes == len(manifest) * 128 * 128


def test_store_dtypes_and_failed_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    prob = rng.random((32, 48)).astype(np.float32)
    for dtype, tolerance, itemsize in (("uint8", 1 / 510, 1), ("float16", 5e-4, 2)):
        store = ProbabilityStore(dtype=dtype)
        store.add("a", prob, presence=0.25)
        assert np.abs(store["a"] - prob).max() <= tolerance + 1e-7
        assert store.presence("a") == 0.25 and store.nbytes == prob.size * itemsize
        with pytest.raises(ValueError, match="already"):
            store.add("a", prob)
    path = tmp_path / "maps.h5"
    with pytest.raises(RuntimeError, match="interrupted"):
        with ProbabilityStore(path) as store:
            store.add("a", prob)
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left


def test_predict_a_dataset_at_its_size(demo_root: Path) -> None:
    from ssl_ptx.data.datasets import SegmentationDataset

    manifest = load_siim(demo_root / "siim", progress=False).iloc[:5]
    dataset = SegmentationDataset(manifest, size=32)
    predictor = Predictor([Constant(0.3, presence=0.6)], device="cpu", batch_size=2)
    store = predictor.predict(dataset, output_size=16)
    assert store.image_ids == manifest["image_id"].tolist()
    assert store.stored(store.image_ids[0]).shape == (16, 16)
    assert np.allclose(store[store.image_ids[0]], 0.3, atol=1 / 510)
    assert store.presences() == pytest.approx([0.6] * 5)


class _BoxLung(nn.Module):
    """A 'lung model' whose lungs are rows 8:24, columns 4:28 of its 32×32 input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((len(x), 1, 32, 32), -10.0)
        logits[:, :, 8:24, 4:28] = 10.0
        return logits


def test_lung_crop_segments_the_box_and_pastes_back() -> None:
    cropper = LungCropper(_BoxLung(), input_size=32, margin=0.0, min_box=0.1)
    predictor = Predictor(Constant(0.9), lung_cropper=cropper, size=16, device="cpu")
    maps = predictor.predict_batch(torch.rand(2, 1, 64, 64)).masks
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[16:48, 8:56] = True  # the box scaled to 64²
    assert torch.allclose(maps[:, inside], torch.tensor(0.9), atol=1e-5)
    assert (maps[:, ~inside] == 0).all()
    with pytest.raises(ValueError, match="size="):
        Predictor(Constant(0.9), lung_cropper=cropper, device="cpu")


def _load_recipe():
    path = Path(__file__).resolve().parents[1] / "recipes" / "predict.py"
    spec = importlib.util.spec_from_file_location("predict_recipe", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["predict_recipe"] = module
    spec.loader.exec_module(module)
    return module


def test_recipe_ranks_a_checkpoint_folder_best_first(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, dice in (
        ("best-epoch001.pt", 0.3),
        ("best-epoch002.pt", 0.7),
        ("best-epoch003.pt", 0.5),
    ):
        _tiny_checkpoint(folder / name, seed=0, dice=dice)
    members = _load_recipe().expand_checkpoints([str(folder), "a.pt,b.pt", "c.pt"])
    names = [m.name if isinstance(m, Path) else [p.name for p in m] for m in members]
    assert names == [
        "best-epoch002.pt",
        "best-epoch003.pt",
        "best-epoch001.pt",
        ["a.pt", "b.pt"],
        "c.pt",
    ]


def test_predict_recipe_on_the_validation_fold(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = tmp_path / "best.pt"
    _tiny_checkpoint(checkpoint, seed=0)
    out = tmp_path / "out"
    recipe = _load_recipe()
    args = [str(checkpoint), "--data-dir", str(demo_root / "siim"), "--tune-on-val"]
    lung = LungCropper(_tiny_checkpoint(tmp_path / "unused.pt", seed=1), input_size=32)
    args += ["--lung-crop", str(lung.save(tmp_path / "lung.pt"))]  # random lungs serve here
    code = recipe.main([*args, "--out", str(out), "--overlays", "4", "--no-progress"])
    assert code == 0
    manifest = load_siim(demo_root / "siim", progress=False)
    validation = manifest[manifest["fold"] == 0]
    submission = read_submission(out / "submission.csv")
    assert sorted(submission["ImageId"]) == sorted(validation["image_id"])
    sample = pd.DataFrame({"ImageId": validation["image_id"], "EncodedPixels": "-1"})
    assert check_submission(submission, sample, shape=(128, 128)).ok
    rule = load_rule(out / "rule.json")
    with ProbabilityStore.open(out / "probabilities.h5") as store:
        for image_id, code in zip(submission["ImageId"], submission["EncodedPixels"], strict=True):
            expected = rule(store.stored(image_id))
            assert np.array_equal(rle.decode(code, (128, 128)), expected)
    assert (out / "contact_sheet.png").is_file() and len(list((out / "overlays").iterdir())) == 4
    printed = capsys.readouterr().out
    assert "tuned on" in printed and "p > 0.5: Dice" in printed
