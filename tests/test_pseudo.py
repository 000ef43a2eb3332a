"""Pseudo-label filter: rules on hand-made maps, outputs, resume, bad images, the recipe."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ssl_ptx.data import rle
from ssl_ptx.data.manifest import MANIFEST_COLUMNS
from ssl_ptx.engine.checkpoint import load_checkpoint
from ssl_ptx.engine.logging import read_metrics_csv
from ssl_ptx.engine.pseudo_data import build_training_stream
from ssl_ptx.inference import Predictor
from ssl_ptx.pseudo import (
    ConfidenceBand,
    NegativeRule,
    PositiveAgreementRule,
    PseudoLabelFilter,
    published_rules,
    read_pseudo_masks,
    scaled_min_area,
)

ROOT = Path(__file__).resolve().parents[1]


def _map(side: int, pixels: int, value: float = 0.9) -> np.ndarray:
    probability = np.zeros((side, side), np.float32)
    probability.flat[:pixels] = value
    return probability


def test_min_area_scales_with_the_map_area() -> None:
    assert scaled_min_area(100, (1024, 1024)) == 100
    assert scaled_min_area(100, (128, 128)) == pytest.approx(1.5625)
    assert scaled_min_area(100, (512, 256)) == pytest.approx(12.5)


@pytest.mark.parametrize(
    ("side", "kept_at", "dropped_at"), [(1024, 101, 100), (256, 7, 6), (128, 2, 1)]
)
def test_positive_rule_keeps_more_than_scaled_min_area(
    side: int, kept_at: int, dropped_at: int
) -> None:
    rule = PositiveAgreementRule(threshold=0.5, min_area=100)
    kept = rule.decide(1.0, _map(side, kept_at))
    assert kept.keep and kept.pseudo_label == 1.0 and kept.reason == "model_agrees"
    assert kept.mask.sum() == kept_at and kept.pred_area == kept_at
    np.testing.assert_array_equal(kept.mask, _map(side, kept_at) > 0.5)
    dropped = rule.decide(1.0, _map(side, dropped_at))
    assert not dropped.keep and math.isnan(dropped.pseudo_label) and dropped.mask is None


def test_positive_rule_uses_the_threshold() -> None:
    rule = PositiveAgreementRule(threshold=0.5, min_area=0)
    assert not rule.decide(1.0, _map(64, 50, value=0.5)).keep  # not above 0.5
    assert rule.decide(1.0, _map(64, 50, value=0.51)).keep


def test_negative_rule_published_and_agreement() -> None:
    published = NegativeRule()
    assert not published.needs_prediction(0.0)
    decision = published.decide(0.0, None)
    assert decision.keep and decision.pseudo_label == 0.0
    agreeing = NegativeRule(require_agreement=True, max_area=100)
    assert agreeing.needs_prediction(0.0)
    assert agreeing.decide(0.0, _map(128, 1)).keep  # 1 <= 1.5625
    refused = agreeing.decide(0.0, _map(128, 2))
    assert not refused.keep and refused.reason == "model_finds_lesion"


def test_rules_claim_only_their_label() -> None:
    rules = published_rules()
    assert [r.claims(1.0) for r in rules] == [True, False]
    assert [r.claims(0.0) for r in rules] == [False, True]
    assert not any(r.claims(-1.0) or r.claims(float("nan")) for r in rules)


def test_confidence_band_marks_uncertain_pixels() -> None:
    band = ConfidenceBand(0.3, 0.7)
    probability = np.array([[0.1, 0.3, 0.5, 0.7, 0.9]], np.float32)
    np.testing.assert_array_equal(band.ignore_mask(probability), [[0, 1, 1, 0, 0]])
    with pytest.raises(ValueError):
        ConfidenceBand(0.7, 0.3)


# ------------------------------------------------------------------------------- the filter


class BrightIsLesion(nn.Module):
    """Logits 5·(image − 0.5): probability 0.88 on the bright squares, 0.15 on the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(5.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images[:, :1] - 0.5) * self.scale


class Interrupted(RuntimeError):
    pass


class FailingPredictor(Predictor):
    """Raises on the ``fail_at``-th ``predict_batch`` call (a killed run)."""

    def __init__(self, *args, fail_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls, self.fail_at = 0, fail_at

    def predict_batch(self, images: torch.Tensor):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupted("simulated interruption")
        return super().predict_batch(images)


def _write_pool(folder: Path) -> pd.DataFrame:
    """12 PNGs (64×48) with bright squares of known size, labels of every kind, 2 bad files."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    specs = [  # (label, square side: bright pixels = side² at native size)
        (1.0, 12), (1.0, 0), (1.0, 8), (0.0, 0), (0.0, 10), (-1.0, 12),
        (float("nan"), 12), (1.0, 16), (0.0, 0), (1.0, 1), (0.0, 0), (1.0, 6),
    ]  # fmt: skip
    for n, (label, side) in enumerate(specs):
        image = np.full((64, 48), 40, np.uint8)
        image[10 : 10 + side, 10 : 10 + side] = 230
        path = folder / f"img{n:02d}.png"
        cv2.imwrite(str(path), image)
        rows.append({"image_id": f"img{n:02d}", "path": str(path), "label": label})
    (folder / "empty.png").write_bytes(b"")
    rows.append({"image_id": "bad_empty", "path": str(folder / "empty.png"), "label": 1.0})
    rows.append({"image_id": "bad_missing", "path": str(folder / "nope.png"), "label": 0.0})
    table = pd.DataFrame(rows)
    manifest = pd.DataFrame({c: pd.Series(dtype=t) for c, t in MANIFEST_COLUMNS.items()}).reindex(
        range(len(table))
    )
    manifest[["image_id", "path", "label"]] = table[["image_id", "path", "label"]]
    manifest["source"] = "chexpert"
    manifest[["fold", "height", "width", "mask_area"]] = [-1, 0, 0, -1]
    manifest[["view", "patient_id"]] = ""
    return manifest


def _filter(predictor_cls=Predictor, **kwargs) -> PseudoLabelFilter:
    fail_at = kwargs.pop("fail_at", None)
    extra = {} if fail_at is None else {"fail_at": fail_at}
    predictor = predictor_cls(BrightIsLesion(), tta=(), device="cpu", **extra)
    # working size 64: min_area 100 px at 1024² → 0.39 px; use 4096 px → 16 px at 64²
    rules = published_rules(0.5, min_area=4096)
    return PseudoLabelFilter(
        predictor, rules, size=64, batch_size=2, chunk=4, progress=False, **kwargs
    )


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return _write_pool(tmp_path_factory.mktemp("pool"))


@pytest.fixture(scope="module")
def uninterrupted(pool: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory):
    return _filter().run(pool, tmp_path_factory.mktemp("run"))


def test_filter_decisions_follow_the_rules(uninterrupted) -> None:
    decisions = uninterrupted.decisions.set_index("image_id")
    # squares of side 12, 8, 16, 6 / 0, 1 px at 64×48 → ×4/3 at 64²: above / below 16 px
    manifest = uninterrupted.manifest.set_index("image_id")
    assert set(manifest.index[manifest["label"] == 1.0]) == {"img00", "img02", "img07", "img11"}
    for image_id in ("img00", "img02", "img07", "img11"):
        assert decisions.at[image_id, "pred_area"] > 16
    for image_id in ("img01", "img09"):
        assert decisions.at[image_id, "reason"] == "model_too_small"
        assert decisions.at[image_id, "pred_area"] <= 16
    assert set(manifest.index[manifest["label"] == 0.0]) == {"img03", "img04", "img08", "img10"}
    assert decisions.at["img05", "reason"] == "uncertain_label"
    assert decisions.at["img06", "reason"] == "blank_label"
    assert "img01" not in manifest.index and "img05" not in manifest.index


def test_pseudo_manifest_columns_and_masks(uninterrupted) -> None:
    manifest = uninterrupted.manifest
    assert list(manifest.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert (manifest["source"] == "pseudo").all() and (manifest["origin"] == "chexpert").all()
    row = manifest.set_index("image_id").loc["img07"]
    assert (row["height"], row["width"]) == (64, 48)
    mask = rle.decode(row["rle"], (64, 48))
    truth = np.zeros((64, 48), np.uint8)
    truth[10:26, 10:26] = 1
    assert (mask & truth).sum() / truth.sum() > 0.9 and mask.sum() == row["mask_area"]
    negatives = manifest[manifest["label"] == 0.0]
    assert (negatives["rle"] == "-1").all() and (negatives["mask_area"] == 0).all()
    stored = read_pseudo_masks(uninterrupted.out_dir / "masks.h5")
    np.testing.assert_array_equal(stored["img07"], mask)
    on_disk = pd.read_csv(uninterrupted.out_dir / "pseudo_manifest.csv")
    assert on_disk["image_id"].tolist() == manifest["image_id"].tolist()


def test_bad_images_are_skipped_and_listed(uninterrupted) -> None:
    skipped = pd.read_csv(uninterrupted.out_dir / "skipped.csv")
    assert set(skipped["image_id"]) == {"bad_empty", "bad_missing"}
    assert skipped.set_index("image_id").at["bad_empty", "path"].endswith("empty.png")
    assert skipped["error"].str.len().gt(0).all()
    assert "bad_empty" not in set(uninterrupted.manifest["image_id"])
    audit = json.loads((uninterrupted.out_dir / "audit.json").read_text())
    assert audit["n_skipped"] == 2
    assert audit["counts"]["chexpert"]["uncertain"] == {"dropped": 1}
    assert audit["n_kept"] == len(uninterrupted.manifest)
    for name in ("area_histogram.png", "gallery.png", "decisions.csv"):
        assert (uninterrupted.out_dir / name).stat().st_size > 0


def test_interrupted_run_resumes_to_the_same_outputs(
    pool: pd.DataFrame, uninterrupted, tmp_path: Path
) -> None:
    with pytest.raises(Interrupted):
        _filter(FailingPredictor, fail_at=3).run(pool, tmp_path)
    parts = sorted((tmp_path / "parts").glob("part-*.h5"))
    assert 0 < len(parts) < 4 and not (tmp_path / "pseudo_manifest.csv").exists()
    resumed = _filter().run(pool, tmp_path)
    assert resumed.blocks_reused == len(parts)
    pd.testing.assert_frame_equal(resumed.manifest, uninterrupted.manifest)
    pd.testing.assert_frame_equal(resumed.decisions, uninterrupted.decisions)
    assert not (tmp_path / "parts").exists()


def test_other_settings_refuse_stale_parts(pool: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(Interrupted):
        _filter(FailingPredictor, fail_at=3).run(pool, tmp_path)
    other = PseudoLabelFilter(
        Predictor(BrightIsLesion(), tta=(), device="cpu"), size=64, chunk=4, progress=False
    )
    with pytest.raises(ValueError, match="another manifest or other filter settings"):
        other.run(pool, tmp_path)


def test_band_and_negative_agreement(pool: pd.DataFrame, tmp_path: Path) -> None:
    predictor = Predictor(BrightIsLesion(), tta=(), device="cpu")
    result = PseudoLabelFilter(
        predictor,
        published_rules(0.5, min_area=4096, agree_on_negatives=True),
        size=64,
        band=ConfidenceBand(0.3, 0.7),
        progress=False,
        gallery_size=0,
    ).run(pool, tmp_path)
    decisions = result.decisions.set_index("image_id")
    assert decisions.at["img04", "reason"] == "model_finds_lesion"  # label 0, 133 px
    assert decisions.at["img03", "decision"] == "kept"
    kept = result.manifest.set_index("image_id")
    band = rle.decode(kept.at["img07", "ignore_rle"], (64, 48))
    assert band.any() and band.sum() < 64 * 48 / 4  # the square's resized edge only


# ------------------------------------------------------------------------------- the recipe


def _load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _recipe():
    return _load_recipe("pseudo_chexpert")


def test_recipe_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _recipe().main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--ratio", "--teacher", "--chexpert-dir", "--nih-dir", "--preset", "--nih"):
        assert flag in text


def _tiny_recipe_argv(demo_root: Path, out: Path, cache: Path) -> list[str]:
    return [
        "--demo-dir", str(demo_root), "--out", str(out), "--epochs", "1",
        "--set", "data.size=32", "--set", f"data.cache_dir={cache}",
        "--set", "data.num_workers=0", "--set", "data.batch_size=8",
        "--set", "model.encoder_name=resnet18", "--no-progress",
    ]  # fmt: skip


def test_recipe_end_to_end_tiny_and_resume(demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = _recipe().main(_tiny_recipe_argv(demo_root, out, tmp_path / "cache"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["student_val_dice"] == pytest.approx(run.student_dice)
    assert 0.0 <= run.teacher_dice <= 1.0 and 0.0 <= run.student_dice <= 1.0
    pseudo = pd.read_csv(out / "pseudo" / "pseudo_manifest.csv")
    assert len(pseudo) == run.audit["n_kept"] > 0
    assert set(pseudo["origin"]) == {"chexpert"}
    assert (out / "model.pt").is_file() and (out / "teacher" / "model.pt").is_file()

    # killed after the filter: the student's files are gone; --resume reuses the finished
    # teacher and trains a student equal to the uninterrupted one
    teacher_written = (out / "teacher" / "model.pt").stat().st_mtime_ns
    student = torch.load(out / "model.pt", weights_only=True)["model"]
    for name in ("last.pt", "model.pt", "metrics.csv"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    _recipe().main([*_tiny_recipe_argv(demo_root, out, tmp_path / "cache"), "--resume"])
    assert (out / "teacher" / "model.pt").stat().st_mtime_ns == teacher_written
    resumed = torch.load(out / "model.pt", weights_only=True)["model"]
    assert resumed.keys() == student.keys()
    assert all(torch.equal(resumed[k], student[k]) for k in student)

    # pseudo labels + Mean Teacher: the filter's output joins the Mean Teacher's labelled
    # stream, which then draws as many batches as the pseudo student's
    mean_teacher = _load_recipe("mean_teacher_nih")
    argv = _tiny_recipe_argv(demo_root, tmp_path / "mt", tmp_path / "cache")
    argv += ["--labelled-fraction", "1", "--set", "unlabelled.batch_size=2"]
    with pytest.raises(SystemExit, match="pseudo_manifest.csv does not exist"):
        mean_teacher.main([*argv, "--pseudo", str(tmp_path)])
    mean_teacher.main([*argv, "--pseudo", str(out / "pseudo"), "--ratio", "0.5"])
    config, _ = mean_teacher.build_config(
        mean_teacher.parse_args([*argv, "--pseudo", str(out / "pseudo")])
    )
    loader = build_training_stream(config, None, progress=False)
    n_siim = len(loader.dataset.datasets[0])
    assert any(index >= n_siim for index in loader.sampler)  # pseudo images are drawn
    runs = {"student": out, "mt": tmp_path / "mt"}
    steps = {name: read_metrics_csv(run / "metrics.csv")[-1]["step"] for name, run in runs.items()}
    assert steps["mt"] == steps["student"]
    # a supervised run (or stage) on SIIM + pseudo labels draws the same batches; a folder
    # that is not a filter's output stops it with a message
    supervised = _load_recipe("train_supervised")
    argv = _tiny_recipe_argv(demo_root, tmp_path / "sup", tmp_path / "cache")
    with pytest.raises(SystemExit, match="pseudo_manifest.csv does not exist"):
        supervised.main([*argv, "--set", f"pseudo.dir={tmp_path}"])
    supervised.main([*argv, "--set", f"pseudo.dir={out / 'pseudo'}"])
    assert read_metrics_csv(tmp_path / "sup" / "metrics.csv")[-1]["step"] == steps["student"]
    assert load_checkpoint(tmp_path / "mt" / "last.pt")["config"]["pseudo"] == {
        "dir": str(out / "pseudo"),
        "ratio": 0.5,
    }


# ------------------------------------------------------- the confidence band in the loss


def test_band_pixels_are_left_out_of_the_student_loss(pool: pd.DataFrame, tmp_path: Path) -> None:
    from ssl_ptx.engine.pseudo_data import IgnoreBandDataset, bands_of
    from ssl_ptx.losses import IGNORE_TARGET

    predictor = Predictor(BrightIsLesion(), tta=(), device="cpu")
    result = PseudoLabelFilter(
        predictor,
        published_rules(0.5, min_area=4096),
        size=64,
        band=ConfidenceBand(0.3, 0.7),
        progress=False,
        gallery_size=0,
    ).run(pool, tmp_path)
    bands = bands_of(result.manifest)
    assert "img07" in bands and bands["img07"][1:] == (64, 48)
    dataset = IgnoreBandDataset(result.manifest, None, bands=bands, size=32)
    sample = dataset[dataset.image_ids.index("img07")]
    mask = sample["mask"][0]
    ignored = mask == IGNORE_TARGET
    assert ignored.any() and (mask[~ignored] <= 1).all()
    assert (mask == 1).any() and sample["label"] == 1.0  # the square's core stays foreground
    plain = dataset[dataset.image_ids.index("img03")]  # a label-0 negative: no band
    assert not (plain["mask"] == IGNORE_TARGET).any()
